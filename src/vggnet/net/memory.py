"""The training-memory estimate: one steady-state training step simulated over the calls that
:func:`vggnet.net.analysis.summarize` recorded, on the meta device like the analysis itself.

:func:`training_memory` simulates the step the way ``vggnet train`` runs it (forward with last step's gradients
still allocated; ``zero_grad(set_to_none=True)``; backward layer by layer from the last; ``optimizer.step()``) and
returns the largest sum of live tensors over its moments: fp32 weights, optimizer state, the gradients allocated so
far, the tensors autograd saved for the layers not yet back-propagated (per layer type, see :func:`_saved`), the
batch, and the gradient buffers in flight. Under autocast (``precision="bf16"``/``"fp16"``) conv and linear layers
write 2-byte outputs and keep 2-byte weight copies. ``device`` (cuda or cpu) picks the kernels the estimate follows
where they differ: dropout's mask, Adam's temporaries, group norm under autocast. docs/ANALYSIS.md lists what each
layer keeps and what is left out: the backends' scratch (oneDNN's reorder copies and weight-gradient buffers, cuDNN
and cuBLAS workspaces), which depends on the kernel the backend picks for the machine, and the C library's
retained heap (glibc's, under its defaults), which depends on the order of allocations; neither is a function of
the shapes alone. :func:`parse_bytes` reads a memory budget.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from decimal import Decimal
from typing import Any, Hashable

from vggnet.base.errors import ConfigError
from vggnet.net.analysis import LayerCall, Summary

# Optimizer name -> fp32 state buffers per trainable parameter.
OPTIMIZER_STATE = {"sgd": 1, "sgd-nomomentum": 0, "adam": 2, "adamw": 2}
# Training precision -> bytes per value that conv and linear layers write (bf16/fp16: torch.autocast).
PRECISIONS = {"fp32": 4, "bf16": 2, "fp16": 2}
# Backends whose kernels the estimate follows where they differ (dropout's mask, Adam's temporaries).
DEVICES = ("cuda", "cpu")


@dataclass
class TrainingMemory:
    """The simulated peak of one training step with ``batch_size`` images, split by what is alive at that moment.

    ``peak_at`` names the moment: ``forward <layer>`` (last step's gradients still allocated), ``loss``,
    ``backward <layer>`` (gradients of the layers after it allocated, the activations saved by the layers before
    it still kept) or ``optimizer step``. ``activations``: the batch, every tensor autograd keeps for backward and
    the layer's input and output being made; ``weight_copies``: autocast's 2-byte weight copies (0 in fp32);
    ``backward_workspace``: buffers in flight, i.e. the layer's output and input gradients during backward, the
    optimizer's temporaries during its step. ``total`` is their sum with the weights, gradients and state.
    ``device`` is the device type the estimate is for (cuda or cpu)."""

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


# ------------------------------------------------------------------------------------------------ the public API
def training_memory(summary: Summary, batch_size: int = 1, optimizer: str = "sgd", precision: str = "fp32",
                    device: str = "cuda") -> TrainingMemory:
    """The peak of live tensor bytes over one simulated training step (see :class:`TrainingMemory`).

    ``precision``: fp32, or bf16/fp16 for a forward under ``torch.autocast`` (fp32 weights, gradients and
    optimizer state). ``device``: cuda or cpu (``cuda:N`` counts as cuda), whose kernels differ in dropout's mask,
    Adam's temporaries and group norm under autocast."""
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    moments = _moments(summary, optimizer, precision, device)
    peak = max(moments, key=lambda m: m.per_image * batch_size + m.per_batch)  # the first of equal maxima
    return TrainingMemory(batch_size, optimizer, precision, _device_type(device), peak.where, **peak.at(batch_size))


def max_batch_size(summary: Summary, budget_bytes: int, optimizer: str = "sgd", precision: str = "fp32",
                   device: str = "cuda") -> int:
    """The largest batch whose training-memory estimate fits ``budget_bytes`` (0 if not even one image).

    Every moment of the step is linear in the batch size and the peak is their maximum, so a batch fits when
    it fits at every moment: the smallest of the per-moment limits."""
    moments = _moments(summary, optimizer, precision, device)
    return max(0, min((budget_bytes - m.per_batch) // m.per_image for m in moments))


def saved_bytes(summary: Summary, batch_size: int = 1, precision: str = "fp32", device: str = "cuda") -> int:
    """Bytes autograd keeps for backward at the end of the forward, parameters themselves excluded: the
    activations, max-pool indices, dropout masks, norm statistics and autocast's weight copies."""
    _check_precision(precision)
    low = PRECISIONS[precision]
    stages, _, _ = _stages(summary, low, precision != "fp32", _device_type(device))
    saved = {key: size for stage in stages for key, size in stage.saved.items()}
    return sum(per_image * batch_size + per_batch for per_image, per_batch in saved.values())


def summary_dict(summary: Summary, batch_size: int | None = None, optimizer: str = "sgd", budget: int | None = None,
                 precision: str = "fp32", device: str = "cuda") -> dict[str, Any]:
    """``summary.to_dict()`` with ``training_memory`` (when ``batch_size`` is given) and ``memory_budget`` and
    ``max_batch_size`` (when ``budget`` is given) for ``optimizer``, ``precision`` and ``device``."""
    out = summary.to_dict()
    if batch_size is not None:
        out["training_memory"] = training_memory(summary, batch_size, optimizer, precision, device).to_dict()
    if budget is not None:
        out["memory_budget"] = budget
        out["max_batch_size"] = max_batch_size(summary, budget, optimizer, precision, device)
    return out


def _moments(summary: Summary, optimizer: str, precision: str, device: str) -> list[_Moment]:
    if optimizer not in OPTIMIZER_STATE:
        raise ConfigError(f"unknown optimizer {optimizer!r}: choose one of {', '.join(OPTIMIZER_STATE)}")
    _check_precision(precision)
    return _simulate(summary, optimizer, precision, _device_type(device))


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


# -------------------------------------------------------------------------------------------- memory budgets
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
