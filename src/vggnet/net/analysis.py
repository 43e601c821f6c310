"""Per-layer analysis computed from the model itself: shapes, activation memory, parameters, multiply-adds.

Counting conventions (also printed under every table):

- **MACs**: one multiply-add = one MAC. Convolutions count ``out_h * out_w * out_c * (in_c / groups) * kh * kw``,
  linear layers ``in * out``. Biases, batch norm, ReLU, pooling, LRN and dropout count 0 MACs; any other leaf
  module type is listed in ``Summary.unsupported`` instead of silently counting as 0.
- **activations**: values a layer newly materialises for one image. A layer whose output shares storage with its
  input (in-place ReLU, eval-mode dropout, flatten) counts 0: its values are already counted where they were made.
  The input image is the first row. **activation_bytes** = activations x the element size of ``dtype``.
- **params**: parameters held directly by the layer; ``trainable`` excludes those with ``requires_grad=False``.

The training-memory estimate (:meth:`Summary.training_memory`) simulates one steady-state training step the way
``vggnet train`` runs it (forward with last step's gradients still allocated; ``zero_grad(set_to_none=True)``; backward
layer by layer from the last; ``optimizer.step()``) and returns the largest sum of live tensors over its moments:
fp32 weights, optimizer state, the gradients allocated so far, the tensors autograd saved for the layers not yet
back-propagated (per layer type, see :func:`_saved`), the batch, and the gradient buffers in flight. Under
autocast (``precision="bf16"``/``"fp16"``) conv and linear layers write 2-byte outputs and keep 2-byte weight
copies. docs/ANALYSIS.md lists what each layer keeps and what is left out (workspaces, allocator rounding).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from typing import Any, Hashable, Sequence

import torch
from torch import nn

from vggnet.base.errors import ConfigError
from vggnet.net.models import size_pair

# Optimizer name -> fp32 state buffers per trainable parameter.
OPTIMIZER_STATE = {"sgd": 1, "sgd-nomomentum": 0, "adam": 2, "adamw": 2}
# Training precision -> bytes per value that conv and linear layers write (bf16/fp16: torch.autocast).
PRECISIONS = {"fp32": 4, "bf16": 2, "fp16": 2}
# Backends whose kernels the estimate follows where they differ (dropout's mask, Adam's temporaries).
DEVICES = ("cuda", "cpu")

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
    equal numbers mean an in-place result or a view. ``kind`` selects the rule in :func:`_saved`."""

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
class TrainingMemory:
    """The simulated peak of one training step with ``batch_size`` images, split by what is alive at that moment.

    ``peak_at`` names the moment: ``forward <layer>`` (last step's gradients still allocated), ``loss``,
    ``backward <layer>`` (gradients of the layers after it allocated, the activations saved by the layers before
    it still kept) or ``optimizer step``. ``activations``: the batch, every tensor autograd keeps for backward and
    the layer's input and output being made; ``weight_copies``: autocast's 2-byte weight copies (0 in fp32);
    ``backward_workspace``: buffers in flight, i.e. the layer's output and input gradients during backward, the
    optimizer's temporaries during its step. ``total`` is their sum with the weights, gradients and state."""

    batch_size: int
    optimizer: str
    precision: str
    device: str
    peak_at: str
    weights: int
    gradients: int
    optimizer_state: int
    activations: int
    weight_copies: int
    backward_workspace: int

    @property
    def total(self) -> int:
        return (self.weights + self.gradients + self.optimizer_state + self.activations + self.weight_copies
                + self.backward_workspace)

    def to_dict(self) -> dict[str, Any]:
        return dict(asdict(self), total=self.total)


_Bytes = tuple[int, int]  # (per image, per batch): b images take per_image * b + per_batch bytes


@dataclass
class _Moment:
    """One instant of the simulated step: live bytes by TrainingMemory field."""

    where: str
    parts: dict[str, _Bytes]

    def at(self, batch: int) -> dict[str, int]:
        return {name: per_image * batch + per_batch for name, (per_image, per_batch) in self.parts.items()}

    @property
    def per_image(self) -> int:
        return sum(p for p, _ in self.parts.values())

    @property
    def per_batch(self) -> int:
        return sum(f for _, f in self.parts.values())


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

    def training_memory(self, batch_size: int = 1, optimizer: str = "sgd", precision: str = "fp32",
                        device: str = "cuda") -> TrainingMemory:
        """The peak of live tensor bytes over one simulated training step (see :class:`TrainingMemory`).

        ``precision``: fp32, or bf16/fp16 for a forward under ``torch.autocast`` (fp32 weights, gradients and
        optimizer state). ``device``: cuda or cpu, whose kernels differ in dropout's mask and Adam's temporaries."""
        if batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {batch_size}")
        moments = self._moments(optimizer, precision, device)
        peak = max(moments, key=lambda m: m.per_image * batch_size + m.per_batch)  # the first of equal maxima
        return TrainingMemory(batch_size, optimizer, precision, _device_type(device), peak.where,
                              **peak.at(batch_size))

    def max_batch_size(self, budget_bytes: int, optimizer: str = "sgd", precision: str = "fp32",
                       device: str = "cuda") -> int:
        """The largest batch whose training-memory estimate fits ``budget_bytes`` (0 if not even one image).

        Every moment of the step is linear in the batch size and the peak is their maximum, so a batch fits when
        it fits at every moment: the smallest of the per-moment limits."""
        moments = self._moments(optimizer, precision, device)
        return max(0, min((budget_bytes - m.per_batch) // m.per_image for m in moments))

    def saved_bytes(self, batch_size: int = 1, precision: str = "fp32", device: str = "cuda") -> int:
        """Bytes autograd keeps for backward at the end of the forward, parameters themselves excluded: the
        activations, max-pool indices, dropout masks, norm statistics and autocast's weight copies."""
        _check_precision(precision)
        low = PRECISIONS[precision]
        stages, _, _ = _stages(self, low, precision != "fp32", _device_type(device))
        saved = {key: size for stage in stages for key, size in stage.saved.items()}
        return sum(per_image * batch_size + per_batch for per_image, per_batch in saved.values())

    def _moments(self, optimizer: str, precision: str, device: str) -> list[_Moment]:
        if optimizer not in OPTIMIZER_STATE:
            raise ConfigError(f"unknown optimizer {optimizer!r}: choose one of {', '.join(OPTIMIZER_STATE)}")
        _check_precision(precision)
        return _simulate(self, optimizer, precision, _device_type(device))

    def to_dict(self, batch_size: int | None = None, optimizer: str = "sgd", budget: int | None = None,
                precision: str = "fp32", device: str = "cuda") -> dict:
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
            out["training_memory"] = self.training_memory(batch_size, optimizer, precision, device).to_dict()
        if budget is not None:
            out["memory_budget"] = budget
            out["max_batch_size"] = self.max_batch_size(budget, optimizer, precision, device)
        return out


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")


def _device_type(device: str) -> str:
    kind = str(device).split(":")[0]
    if kind not in DEVICES:
        raise ConfigError(f"unknown device {device!r} for the memory estimate: choose cuda or cpu")
    return kind


# ------------------------------------------------------------------------------------ the simulated training step
@dataclass
class _Stage:
    """A layer call in training mode: the storages it reads and writes, their element sizes, what it saves."""

    call: LayerCall
    source: Hashable  # the storage it reads
    target: Hashable  # the storage it writes (== source: in place or a view)
    in_size: int  # bytes per element
    out_size: int
    in_grad: bool  # its input requires grad: backward writes an input gradient
    recorded: bool  # its output requires grad: autograd records it, keeps its saved tensors, runs its backward
    saved: dict[Hashable, _Bytes]


def _out_size(call: LayerCall, in_size: int, low: int, autocast: bool, device: str) -> int:
    """Element size of a call's output. Autocast runs conv/linear in ``low`` precision; LRN's pow/avg-pool and
    (on CUDA) group norm run in fp32; batch norm, ReLU, pooling and dropout keep their input's dtype."""
    if call.kind in ("conv", "linear"):
        return low if autocast else in_size
    if call.kind == "lrn" or (call.kind == "groupnorm" and autocast and device == "cuda"):
        return 4
    return in_size


def _saved(index: int, stage: _Stage, low: int, autocast: bool, device: str) -> dict[Hashable, _Bytes]:
    """What autograd keeps for backward from one recorded call, by storage, in bytes (per image, per batch).

    Per PyTorch's derivative formulas: conv keeps its input and weight; linear its input (if the weight needs a
    gradient) and weight (if the input does); batch norm its input and per-channel mean and inverse std; ReLU its
    output; max-pool its input and int64 indices; adaptive average pooling its input unless the output is 1x1
    (then it is a mean, which keeps nothing); dropout its mask (CUDA: bool; CPU: a noise tensor of the input's
    dtype) while its new output is kept by the next layer; views nothing. Parameters themselves are not listed
    (they are the weights); autocast's 2-byte weight copies are. Unknown layer types: input and output."""
    c, saved = stage.call, {}

    def keep_input() -> None:
        if autocast and c.kind in ("conv", "linear") and stage.in_size != low:  # autocast casts, keeps the copy
            saved[("cast", index)] = (c.in_values * low, 0)
        elif c.kind == "groupnorm" and autocast and device == "cuda" and stage.in_size != 4:
            saved[("cast", index)] = (c.in_values * 4, 0)
        else:
            saved[stage.source] = (c.in_values * stage.in_size, 0)

    def keep_output() -> None:
        saved[stage.target] = (c.out_values * stage.out_size, 0)

    if c.kind == "conv":
        keep_input()
        if autocast:
            saved[("weight", index)] = (0, c.weight_values * low)
    elif c.kind == "linear":
        if c.weight_trainable:
            keep_input()
        if autocast and stage.in_grad:
            saved[("weight", index)] = (0, c.weight_values * low)
    elif c.kind in ("batchnorm", "groupnorm", "lrn"):
        keep_input()
        saved[("stats", index)] = (4 * c.fp32_per_image, 4 * c.fp32_fixed)
    elif c.kind == "relu":
        keep_output()
    elif c.kind == "maxpool":
        keep_input()
        saved[("indices", index)] = (8 * c.out_values, 0)
    elif c.kind == "avgpool":
        keep_input()
    elif c.kind == "dropout" and c.p > 0:
        mask = 1 if device == "cuda" and not c.inplace else stage.in_size
        saved[("mask", index)] = (c.out_values * mask, 0)
    elif c.kind == "other":
        keep_input()
        keep_output()
    return saved


def _stages(summary: Summary, low: int, autocast: bool, device: str) -> tuple[list[_Stage], Hashable, int]:
    """Walk the calls in training mode: storage identities (a training-mode dropout writes a new tensor where the
    analysis run's eval-mode dropout returned its input), element sizes and gradient flow. Returns the stages,
    the logits' storage and its element size."""
    size: dict[Hashable, int] = {0: 4}  # the input batch: fp32
    grad: dict[Hashable, bool] = {0: False}
    alias: dict[int, Hashable] = {}  # analysis-run storage -> the training-mode tensor that replaces it
    last, flowing, stages = 4, False, []  # a storage made outside the leaf calls: as the previous call's output
    for i, c in enumerate(summary.calls):
        source = alias.get(c.input, c.input)
        in_size, in_grad = size.setdefault(source, last), grad.setdefault(source, flowing)
        if c.kind == "dropout" and c.p > 0 and not c.inplace:
            target: Hashable = ("dropout", i)
            alias[c.output] = target
        else:
            target = source if c.output == c.input else c.output
        out_size = _out_size(c, in_size, low, autocast, device)
        size[target], grad[target], last = out_size, in_grad or c.trainable > 0, out_size
        flowing = grad[target]
        stage = _Stage(c, source, target, in_size, out_size, in_grad, grad[target], {})
        if stage.recorded:
            stage.saved = _saved(i, stage, low, autocast, device)
        stages.append(stage)
    logits = alias.get(summary.output, summary.output)
    return stages, logits, size.get(logits, last)


def _is_copy(key: Hashable) -> bool:
    return isinstance(key, tuple) and key[0] in ("weight", "bias")


def _sum(values: list[_Bytes]) -> _Bytes:
    return sum(p for p, _ in values), sum(f for _, f in values)


def _parts(live: dict[Hashable, _Bytes], fixed: dict[str, int], workspace: _Bytes = (0, 0)) -> dict[str, _Bytes]:
    """One moment by TrainingMemory field: live storages split into activations and autocast weight copies, the
    batch-independent terms, the buffers in flight."""
    return {**{name: (0, value) for name, value in fixed.items()},
            "activations": _sum([v for k, v in live.items() if not _is_copy(k)]),
            "weight_copies": _sum([v for k, v in live.items() if _is_copy(k)]),
            "backward_workspace": workspace}


def _simulate(summary: Summary, optimizer: str, precision: str, device: str) -> list[_Moment]:
    """The moments of one steady-state step: each forward call (last step's gradients still allocated), the
    loss, each backward call from the last (gradients so far; saved tensors of the calls before it), the step."""
    low, autocast = PRECISIONS[precision], precision != "fp32"
    stages, logits, logit_size = _stages(summary, low, autocast, device)
    trainable = sum(r.trainable_params for r in summary.layers)
    weights = 4 * sum(r.params for r in summary.layers)
    state = 4 * trainable * OPTIMIZER_STATE[optimizer]
    held: dict[Hashable, _Bytes] = {0: (4 * summary.layers[0].activations, 0), ("labels",): (8, 0)}
    moments, saved, cache = [], {}, {}
    for i, s in enumerate(stages):
        saved.update(s.saved)
        if autocast and s.call.kind in ("conv", "linear") and s.call.weight_trainable:  # cached until forward ends
            cache.update({("weight", i): (0, s.call.weight_values * low), ("bias", i): (0, s.call.bias_values * low)})
        made = {s.source: (s.call.in_values * s.in_size, 0), s.target: (s.call.out_values * s.out_size, 0)}
        live = {**held, **made, **cache, **saved}
        moments.append(_Moment(f"forward {s.call.name}", _parts(live, _static(weights, 4 * trainable, state))))
    loss = {logits: (summary.output_values * logit_size, 0), ("log_probs",): (4 * summary.output_values, 0)}
    if logit_size != 4:
        loss[("logits_fp32",)] = (4 * summary.output_values, 0)  # logits.float() for the loss
    moments.append(_Moment("loss", _parts({**held, **loss, **saved}, _static(weights, 4 * trainable, state))))
    held[logits] = loss[logits]  # the caller keeps the logits (accuracy) through the step
    grads = 0
    for i in reversed(range(len(stages))):
        s = stages[i]
        if not s.recorded or s.call.kind == "view":
            continue
        grads += 4 * s.call.trainable
        # A saved storage is freed once the first call that saved it is back-propagated: here, the calls up to i.
        live = {k: v for st in stages[: i + 1] for k, v in st.saved.items()}
        in_flight = s.call.out_values * s.out_size + (s.call.in_values * s.in_size if s.in_grad else 0)
        low_grads = (s.call.weight_values + s.call.bias_values) * low if autocast and s.call.weight_trainable else 0
        moments.append(_Moment(f"backward {s.call.name}",
                               _parts({**held, **live}, _static(weights, grads, state), (in_flight, low_grads))))
    moments.append(_Moment("optimizer step", _parts(dict(held), _static(weights, 4 * trainable, state),
                                                    (0, _optimizer_temporaries(summary, optimizer, device)))))
    return moments


def _static(weights: int, gradients: int, state: int) -> dict[str, int]:
    return {"weights": weights, "gradients": gradients, "optimizer_state": state}


def _optimizer_temporaries(summary: Summary, optimizer: str, device: str) -> int:
    """Bytes ``step()`` allocates beyond its state, with weight decay 0: SGD updates in place; Adam/AdamW divide by
    sqrt(second moment) into new tensors: all at once on CUDA (foreach), two of the largest tensor on the CPU."""
    if optimizer not in ("adam", "adamw"):
        return 0
    if device == "cuda":
        return 4 * sum(r.trainable_params for r in summary.layers)
    return 2 * 4 * summary.largest_trainable


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
    """The training-memory rule of a leaf module (see :func:`_saved`)."""
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
    """The facts :func:`_simulate` needs about one call on one image (``x``: its input, ``out``: its output)."""
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
    ids: dict[int, int] = {}
    seen: list[torch.Tensor] = []  # every tensor seen stays referenced, so no storage address is reused in the run

    def storage(t: torch.Tensor) -> int:
        seen.append(t)
        return ids.setdefault(t.untyped_storage()._cdata, len(ids))

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
            x = next(t for t in inputs if isinstance(t, torch.Tensor))
            name = friendly.get(path, path)
            summary.calls.append(_call(name, module, _kind(module, output), (storage(x), storage(output)), x, output))
            records.append(
                LayerRecord(
                    name=name,
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
        image = torch.zeros(1, channels, h, w, device=device)
        storage(image)  # storage 0
        logits = model(image)
        summary.output, summary.output_values = storage(logits), logits[0].numel()
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    summary.uncalled = [p for p in leaves if p not in called and list(leaves[p].parameters(recurse=False))]
    counted = sum(r.params for r in records)
    total = sum(p.numel() for p in model.parameters())
    if counted != total:
        summary.unsupported.append(f"{total - counted} parameters outside the recorded layers")
    summary.largest_trainable = max((p.numel() for p in model.parameters() if p.requires_grad), default=0)
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
