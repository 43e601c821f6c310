"""Per-layer analysis computed from the model itself: shapes, activation memory, parameters, multiply-adds.

Counting conventions (also printed under every table):

- **MACs**: one multiply-add = one MAC. Convolutions count ``out_h * out_w * out_c * (in_c / groups) * kh * kw``,
  linear layers ``in * out``. Biases, batch norm, ReLU, pooling, LRN and dropout count 0 MACs; any other leaf
  module type is listed in ``Summary.unsupported`` instead of silently counting as 0.
- **activations**: values a layer newly materialises for one image. A layer whose output shares storage with its
  input (in-place ReLU, eval-mode dropout, flatten) counts 0: its values are already counted where they were made.
  The input image is the first row. **activation_bytes** = activations x the element size of ``dtype``.
- **params**: parameters held directly by the layer; ``trainable`` excludes those with ``requires_grad=False``.

The training-memory estimate (:meth:`Summary.training_memory`) adds, for a batch size and an optimizer: fp32
weights, their gradients, the optimizer state (SGD with momentum: 1 buffer; Adam/AdamW: 2; plain SGD: 0), the
activations kept for backward (every row's activations plus max-pool indices and dropout masks and outputs in
training mode) and the backward pass's transient gradient buffers (twice the largest activation).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from typing import Any, Sequence

import torch
from torch import nn

from .errors import ConfigError
from .models import size_pair

# Optimizer name -> fp32 state buffers per trainable parameter.
OPTIMIZER_STATE = {"sgd": 1, "sgd-nomomentum": 0, "adam": 2, "adamw": 2}

_ZERO_MAC_TYPES = (
    nn.BatchNorm2d,
    nn.SyncBatchNorm,
    nn.GroupNorm,
    nn.ReLU,
    nn.MaxPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AvgPool2d,
    nn.LocalResponseNorm,
    nn.Dropout,
    nn.Flatten,
    nn.Identity,
)


@dataclass
class LayerRecord:
    """One row: a leaf module's call on one image."""

    name: str
    type: str
    output_shape: list[int]
    activations: int
    activation_bytes: int
    params: int
    macs: int
    module: str = ""
    trainable_params: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainingMemory:
    """Bytes needed to train with ``batch_size`` images per step (see module docstring for what is counted)."""

    batch_size: int
    optimizer: str
    weights: int
    gradients: int
    optimizer_state: int
    activations: int
    backward_workspace: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer_state + self.activations + self.backward_workspace

    def to_dict(self) -> dict[str, Any]:
        return dict(asdict(self), total=self.total)


@dataclass
class Summary:
    """Records for every layer, their totals, and memory estimates derived from them."""

    model_name: str
    input_shape: list[int]
    dtype: str
    layers: list[LayerRecord]
    unsupported: list[str] = field(default_factory=list)
    uncalled: list[str] = field(default_factory=list)
    # Per image, training mode only: max-pool indices (int64) and dropout outputs + masks.
    train_extra_bytes: int = 0

    @property
    def totals(self) -> dict[str, int]:
        params = sum(r.params for r in self.layers)
        trainable = sum(r.trainable_params for r in self.layers)
        return {
            "params": params,
            "trainable_params": trainable,
            "frozen_params": params - trainable,
            "macs": sum(r.macs for r in self.layers),
            "activations": sum(r.activations for r in self.layers),
            "activation_bytes": sum(r.activation_bytes for r in self.layers),
        }

    @property
    def frozen_params(self) -> int:
        """Parameters with ``requires_grad=False``."""
        return self.totals["frozen_params"]

    def training_memory(self, batch_size: int = 1, optimizer: str = "sgd") -> TrainingMemory:
        if optimizer not in OPTIMIZER_STATE:
            raise ConfigError(f"unknown optimizer {optimizer!r}: choose one of {', '.join(OPTIMIZER_STATE)}")
        if batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {batch_size}")
        totals = self.totals
        trainable = totals["trainable_params"]
        largest = max(r.activation_bytes for r in self.layers)
        return TrainingMemory(
            batch_size=batch_size,
            optimizer=optimizer,
            weights=4 * totals["params"],
            gradients=4 * trainable,
            optimizer_state=4 * trainable * OPTIMIZER_STATE[optimizer],
            activations=batch_size * (totals["activation_bytes"] + self.train_extra_bytes),
            backward_workspace=batch_size * 2 * largest,
        )

    def max_batch_size(self, budget_bytes: int, optimizer: str = "sgd") -> int:
        """The largest batch whose training-memory estimate fits ``budget_bytes`` (0 if not even one image)."""
        fixed = self.training_memory(1, optimizer)
        per_image = fixed.activations + fixed.backward_workspace
        static = fixed.total - per_image
        return max(0, (budget_bytes - static) // per_image)

    def to_dict(self, batch_size: int | None = None, optimizer: str = "sgd", budget: int | None = None) -> dict:
        out: dict[str, Any] = {
            "model": self.model_name,
            "input_shape": self.input_shape,
            "dtype": self.dtype,
            "mac_convention": "1 MAC = one multiply-add; conv and linear layers only",
            "layers": [r.to_dict() for r in self.layers],
            "totals": dict(self.totals, train_extra_bytes_per_image=self.train_extra_bytes),
            "unsupported": self.unsupported,
            "uncalled": self.uncalled,
        }
        if batch_size is not None:
            out["training_memory"] = self.training_memory(batch_size, optimizer).to_dict()
        if budget is not None:
            out["memory_budget"] = budget
            out["max_batch_size"] = self.max_batch_size(budget, optimizer)
        return out


def _friendly_names(model: nn.Module) -> dict[str, str]:
    """Module path -> readable layer name (conv1_1, pool1, fc6, ...) for vggnet models; paths elsewhere."""
    names: dict[str, str] = {}
    for name, index in getattr(model, "layer_names", {}).items():
        names[f"features.{index}"] = name
    classifier = getattr(model, "classifier", None)
    if isinstance(classifier, nn.Sequential):
        if len(classifier) == 7:
            labels = ["fc6", "relu6", "drop6", "fc7", "relu7", "drop7", "fc8"]
        else:
            labels = ["drop", "fc"][-len(classifier):]
        for i, label in enumerate(labels):
            names[f"classifier.{i}"] = label
    return names


def _macs(module: nn.Module, output: torch.Tensor) -> int | None:
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return output[0].numel() * (module.in_channels // module.groups) * kh * kw
    if isinstance(module, nn.Linear):
        return module.in_features * module.out_features
    if isinstance(module, _ZERO_MAC_TYPES):
        return 0
    return None


def _train_extra(module: nn.Module, output: torch.Tensor, dtype_bytes: int) -> int:
    """Per-image bytes a training-mode forward keeps beyond the eval-mode outputs."""
    if isinstance(module, nn.MaxPool2d):
        return output[0].numel() * 8  # int64 argmax indices
    if isinstance(module, nn.Dropout) and module.p > 0:
        return output[0].numel() * (dtype_bytes + 1)  # a new output plus a bool mask
    return 0


def _storages(tensors: Sequence[Any]) -> set[int]:
    # The StorageImpl's address: equal for views and in-place results, and defined on the meta device too.
    return {t.untyped_storage()._cdata for t in tensors if isinstance(t, torch.Tensor)}


@torch.no_grad()
def summarize(
    model: nn.Module,
    input_size: int | Sequence[int] | None = None,
    in_channels: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> Summary:
    """Run one image through ``model`` (eval mode, on its device) and record every leaf module's call.

    A model built on the meta device (``with torch.device("meta"): create_model(...)``) is analysed without
    allocating or computing anything.

    ``input_size`` defaults to the model's own ``input_size``; ``in_channels`` to its ``in_channels``.
    """
    if input_size is None:
        input_size = getattr(model, "input_size", 224)
    h, w = size_pair(input_size)
    channels = in_channels or getattr(model, "in_channels", 3)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype_bytes = torch.empty(0, dtype=dtype).element_size()
    friendly = _friendly_names(model)
    records: list[LayerRecord] = [
        LayerRecord("input", "Input", [channels, h, w], channels * h * w, channels * h * w * dtype_bytes, 0, 0)
    ]
    summary = Summary(getattr(model, "name", type(model).__name__), [channels, h, w], str(dtype).replace("torch.", ""), records)
    leaves = {path: m for path, m in model.named_modules() if not list(m.children())}
    called: set[str] = set()

    def hook(path: str):
        def record(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            called.add(path)
            macs = _macs(module, output)
            if macs is None:
                summary.unsupported.append(f"{path} ({type(module).__name__})")
                macs = 0
            shares_input = bool(_storages([output]) & _storages(inputs))
            values = 0 if shares_input else output[0].numel()
            own = list(module.parameters(recurse=False))
            records.append(
                LayerRecord(
                    name=friendly.get(path, path),
                    type=type(module).__name__,
                    output_shape=list(output.shape[1:]),
                    activations=values,
                    activation_bytes=values * dtype_bytes,
                    params=sum(p.numel() for p in own),
                    macs=macs,
                    module=path,
                    trainable_params=sum(p.numel() for p in own if p.requires_grad),
                )
            )
            summary.train_extra_bytes += _train_extra(module, output, dtype_bytes)

        return record

    handles = [m.register_forward_hook(hook(path)) for path, m in leaves.items()]
    was_training = model.training
    try:
        model.eval()
        model(torch.zeros(1, channels, h, w, device=device))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    summary.uncalled = [p for p in leaves if p not in called and list(leaves[p].parameters(recurse=False))]
    counted = sum(r.params for r in records)
    total = sum(p.numel() for p in model.parameters())
    if counted != total:
        summary.unsupported.append(f"{total - counted} parameters outside the recorded layers")
    return summary


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)b?\s*$", re.IGNORECASE)


def parse_bytes(text: str) -> int:
    """``"11GiB"`` -> 11 * 2**30; ``"11GB"`` -> 11e9; a bare ``"11G"`` means GiB; plain numbers are bytes."""
    match = _SIZE.match(str(text))
    if not match or (match.group(3) and not match.group(2)):  # "11iB": a binary marker with no unit
        raise ConfigError(f"memory size {text!r} is not a size: write e.g. 11GiB, 11GB, 512MiB or 8G")
    # Decimal, not float: float("8.2") * 1000**2 is 8199999.999..., which would floor to one byte short.
    number, unit, binary = Decimal(match.group(1)), match.group(2).lower(), match.group(3)
    power = "kmgt".index(unit) + 1 if unit else 0
    decimal_suffix = text.strip().lower().endswith(unit + "b") and not binary and unit
    base = 1000 if decimal_suffix else 1024
    return int(number * base**power)  # exact; int() truncates, i.e. floors a non-negative size
