"""Per-layer analysis computed from the model itself: shapes, activation memory, parameters, multiply-adds.

Counting conventions (also printed under every table):

- **MACs**: one multiply-add = one MAC. Convolutions count ``out_h * out_w * out_c * (in_c / groups) * kh * kw``,
  linear layers ``in * out``. Biases, batch norm, ReLU, pooling, LRN and dropout count 0 MACs; any other leaf
  module type is listed in ``Summary.unsupported`` instead of silently counting as 0.
- **activations**: values a layer newly materialises for one image. A layer whose output shares storage with its
  input (in-place ReLU, eval-mode dropout, flatten) counts 0: its values are already counted where they were made.
  The input image is the first row. **activation_bytes** = activations x the element size of ``dtype``.
- **params**: parameters held directly by the layer; ``trainable`` excludes those with ``requires_grad=False``.

:func:`summarize` also records, per leaf call, what the training-memory estimate needs (:class:`LayerCall`); the
estimate itself (a simulated training step) lives in :mod:`vggnet.net.memory`, which builds on this module.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from vggnet.net.models import size_pair

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
class LayerCall:
    """What the training-memory simulation needs to know about one leaf call (values are per image).

    ``input`` and ``output`` number the storages the call read and wrote in the analysis run (0: the input image);
    equal numbers mean an in-place result or a view. ``kind`` selects the rule in
    :func:`vggnet.net.memory._saved`."""

    name: str
    kind: str  # conv linear batchnorm groupnorm relu maxpool avgpool mean dropout lrn view other
    input: int
    output: int
    in_values: int
    out_values: int
    trainable: int  # trainable parameters: their fp32 gradients are written when this call is back-propagated
    weight_trainable: bool = False  # conv/linear: the weight requires grad (autocast caches its copy)
    weight_values: int = 0  # conv/linear weight elements
    bias_values: int = 0  # conv/linear bias elements
    fp32_fixed: int = 0  # fp32 values saved once per batch: batch norm's mean and inverse std, 2 x channels
    fp32_per_image: int = 0  # fp32 values saved per image: group norm's statistics, LRN's intermediates
    p: float = 0.0  # dropout probability
    inplace: bool = False  # dropout(inplace=True)



@dataclass
class Summary:
    """Records for every layer and their totals; :mod:`vggnet.net.memory` derives the training-memory estimate."""

    model_name: str
    input_shape: list[int]
    dtype: str
    layers: list[LayerRecord]
    unsupported: list[str] = field(default_factory=list)
    uncalled: list[str] = field(default_factory=list)
    # Per image, training mode only: max-pool indices (int64) and dropout outputs + masks.
    train_extra_bytes: int = 0
    calls: list[LayerCall] = field(default_factory=list, repr=False)
    output: int = 0  # storage number of the model's output (the logits)
    output_values: int = 0
    largest_trainable: int = 0  # elements of the largest trainable parameter tensor

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

    def to_dict(self) -> dict[str, Any]:
        """The records and totals (:func:`vggnet.net.memory.summary_dict` adds the training-memory estimate)."""
        return {
            "model": self.model_name,
            "input_shape": self.input_shape,
            "dtype": self.dtype,
            "mac_convention": "1 MAC = one multiply-add; conv and linear layers only",
            "layers": [r.to_dict() for r in self.layers],
            "totals": dict(self.totals, train_extra_bytes_per_image=self.train_extra_bytes),
            "unsupported": self.unsupported,
            "uncalled": self.uncalled,
        }


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


def _kind(module: nn.Module, output: torch.Tensor) -> str:
    """The training-memory rule of a leaf module (see :func:`vggnet.net.memory._saved`)."""
    kinds = ((nn.Conv2d, "conv"), (nn.Linear, "linear"), ((nn.BatchNorm2d, nn.SyncBatchNorm), "batchnorm"),
             (nn.GroupNorm, "groupnorm"), (nn.ReLU, "relu"), (nn.MaxPool2d, "maxpool"), (nn.AvgPool2d, "avgpool"),
             (nn.LocalResponseNorm, "lrn"), ((nn.Flatten, nn.Identity), "view"))
    if isinstance(module, nn.AdaptiveAvgPool2d):  # ATen computes a 1x1 output as a mean, which saves nothing
        return "mean" if tuple(output.shape[-2:]) == (1, 1) else "avgpool"
    if isinstance(module, nn.Dropout):
        return "dropout" if module.p > 0 else "view"  # p = 0 returns its input
    return next((kind for types, kind in kinds if isinstance(module, types)), "other")


def _call(name: str, module: nn.Module, kind: str, ids: tuple[int, int], x: torch.Tensor,
          out: torch.Tensor) -> LayerCall:
    """The facts the training-memory simulation needs about one call on one image (``x``: its input, ``out``: its
    output)."""
    own = list(module.parameters(recurse=False))
    call = LayerCall(name, kind, ids[0], ids[1], x[0].numel(), out[0].numel(),
                     trainable=sum(p.numel() for p in own if p.requires_grad))
    if kind in ("conv", "linear"):
        call.weight_trainable = module.weight.requires_grad
        call.weight_values = module.weight.numel()
        call.bias_values = module.bias.numel() if module.bias is not None else 0
    elif kind == "batchnorm":
        call.fp32_fixed = 2 * module.num_features  # save_mean, save_invstd
    elif kind == "groupnorm":
        call.fp32_per_image = 2 * module.num_groups  # mean, rstd
    elif kind == "lrn":  # the zero-padded squares (C + size - 1 channels) and two output-sized fp32 tensors
        channels, h, w = x.shape[1], x.shape[-2], x.shape[-1]
        call.fp32_per_image = (channels + module.size - 1) * h * w + 2 * out[0].numel()
    elif kind == "dropout":
        call.p, call.inplace = module.p, module.inplace
    return call


def _storages(tensors: Sequence[Any]) -> set[int]:
    # The StorageImpl's address: equal for views and in-place results, and defined on the meta device too.
    return {t.untyped_storage()._cdata for t in tensors if isinstance(t, torch.Tensor)}


class _Recorder:
    """The forward hooks of one :func:`summarize` run: a :class:`LayerRecord` and a :class:`LayerCall` per call."""

    def __init__(self, summary: Summary, friendly: dict[str, str], dtype_bytes: int) -> None:
        self.summary, self.friendly, self.dtype_bytes = summary, friendly, dtype_bytes
        self.called: set[str] = set()
        self.ids: dict[int, int] = {}
        self.seen: list[torch.Tensor] = []  # every tensor seen stays referenced: no storage address is reused

    def storage(self, t: torch.Tensor) -> int:
        """The number of ``t``'s storage in this run (0: the input image), equal for views and in-place results."""
        self.seen.append(t)
        return self.ids.setdefault(t.untyped_storage()._cdata, len(self.ids))

    def hook(self, path: str):
        def record(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            self.record(path, module, inputs, output)

        return record

    def record(self, path: str, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        summary = self.summary
        self.called.add(path)
        macs = _macs(module, output)
        if macs is None:
            summary.unsupported.append(f"{path} ({type(module).__name__})")
            macs = 0
        shares_input = bool(_storages([output]) & _storages(inputs))
        values = 0 if shares_input else output[0].numel()
        own = list(module.parameters(recurse=False))
        x = next(t for t in inputs if isinstance(t, torch.Tensor))
        name = self.friendly.get(path, path)
        ids = (self.storage(x), self.storage(output))
        summary.calls.append(_call(name, module, _kind(module, output), ids, x, output))
        summary.layers.append(
            LayerRecord(
                name=name,
                type=type(module).__name__,
                output_shape=list(output.shape[1:]),
                activations=values,
                activation_bytes=values * self.dtype_bytes,
                params=sum(p.numel() for p in own),
                macs=macs,
                module=path,
                trainable_params=sum(p.numel() for p in own if p.requires_grad),
            )
        )
        summary.train_extra_bytes += _train_extra(module, output, self.dtype_bytes)


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
    first = LayerRecord("input", "Input", [channels, h, w], channels * h * w, channels * h * w * dtype_bytes, 0, 0)
    summary = Summary(getattr(model, "name", type(model).__name__), [channels, h, w],
                      str(dtype).replace("torch.", ""), [first])
    leaves = {path: m for path, m in model.named_modules() if not list(m.children())}
    recorder = _Recorder(summary, _friendly_names(model), dtype_bytes)
    _run(model, leaves, recorder, torch.zeros(1, channels, h, w, device=device))
    summary.uncalled = [p for p in leaves if p not in recorder.called and list(leaves[p].parameters(recurse=False))]
    counted = sum(r.params for r in summary.layers)
    total = sum(p.numel() for p in model.parameters())
    if counted != total:
        summary.unsupported.append(f"{total - counted} parameters outside the recorded layers")
    summary.largest_trainable = max((p.numel() for p in model.parameters() if p.requires_grad), default=0)
    return summary


def _run(model: nn.Module, leaves: dict[str, nn.Module], recorder: _Recorder, image: torch.Tensor) -> None:
    """One eval-mode forward of ``image`` with ``recorder``'s hook on every leaf; the model's mode is restored and
    the hooks removed afterwards, also when the forward raises."""
    handles = [m.register_forward_hook(recorder.hook(path)) for path, m in leaves.items()]
    was_training = model.training
    try:
        model.eval()
        recorder.storage(image)  # storage 0
        logits = model(image)
        recorder.summary.output, recorder.summary.output_values = recorder.storage(logits), logits[0].numel()
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
