"""vggnet's state-dict layout (torchvision's): the architecture read from keys and shapes, and strict loading.

The layout, which every reader in this package maps its file onto:

- ``features.{i}.weight|bias``: a convolution (4-D weight, ``(out, in, k, k)``), in ``make_layers`` order; a BN
  layer right after it adds ``features.{i+1}.weight|bias|running_mean|running_var|num_batches_tracked``; the
  parameterless ReLU, max-pool and LRN modules leave gaps in ``i``;
- ``classifier.0/.3/.6``: FC1, FC2, FC3 -- Linear (2-D) for the ``classic`` and ``fitted`` heads, convolutions (4-D)
  for ``dense``; ``classifier.1`` alone: the ``gap`` head's one Linear; no ``classifier`` key: features only.

:func:`detect` reads an :class:`Architecture` from such a state: convolution channels and kernels (3x3, or config C's
1x1), BN or not, pools (one parameterless module between two convolutions, two for config A-LRN's LRN + pool, and
one after the last convolution), input channels, head, hidden width and classes; then it names the registry model
(also at a reduced ``width``) or falls back to ``custom`` with the architecture spelled out. :func:`check_fits` and
:func:`load_strict` compare a state with a model position by position and fail in one line naming the first
difference with both shapes.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


from vggnet.net.configs import CFGS, parse_arch, scale_width
from vggnet.base.errors import CheckpointError
from vggnet.net.models import MODELS, SkipInit, create_model

PARAM_ORDER = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
SECTIONS = ("features", "classifier")
_KEY = re.compile(r"^(features|classifier)\.(\d+)\.(\w+)$")


def sort_key(key: str) -> tuple:
    """Module order: features before classifier, by index, then weight, bias, running stats."""
    match = _KEY.match(key)
    if not match:
        return (len(SECTIONS), 0, 0, key)
    section, index, param = match.groups()
    rank = PARAM_ORDER.index(param) if param in PARAM_ORDER else len(PARAM_ORDER)
    return (SECTIONS.index(section), int(index), rank, key)


def shape_text(tensor: torch.Tensor | None) -> str:
    return "absent" if tensor is None else str(tuple(tensor.shape))


@dataclass
class Architecture:
    """What a state dict says about its model: a registry ``name`` (or ``custom``) and the keyword arguments of
    :func:`vggnet.create_model` that rebuild it (``arch`` and ``batch_norm`` only for ``custom``)."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    features_only: bool = False  # no classifier in the file: the head is the model's own, freshly initialised

    def shape_kwargs(self) -> dict[str, Any]:
        """The keywords that size a model (channels, classes, head, width, input size), for another model name."""
        return {k: v for k, v in self.kwargs.items() if k not in ("arch", "batch_norm")}

    def describe(self) -> str:
        width = self.kwargs.get("width", 1.0)
        text = self.name if self.name != "custom" else "a custom VGG"
        text += f" at width {width:g}" if width != 1.0 else ""
        return text + (" (features only)" if self.features_only else "")

    def config(self) -> dict[str, Any]:
        """The model's ``config`` (for ``model.json`` / :func:`vggnet.model_from_config`), built on the meta device."""
        return empty_model(self.name, **self.kwargs).config


def empty_model(name: str, **kwargs: Any) -> nn.Module:
    """``create_model(name, **kwargs)`` on the meta device without running its initialisation: a skeleton whose
    every tensor a file will replace (initialising a VGG-16 costs seconds, on the CPU and, the first time, on meta)."""
    with torch.device("meta"), SkipInit():
        return create_model(name, **kwargs)


def _conv_tokens(state: dict[str, torch.Tensor], where: str | os.PathLike):
    """Walk ``features.*``: arch tokens, BN flag, input channels and the last conv's output channels."""
    modules: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        match = _KEY.match(key)
        if match and match.group(1) == "features":
            modules.setdefault(int(match.group(2)), {})[match.group(3)] = value
    if not modules:
        raise CheckpointError(f"{where} has no convolution weights (features.0.weight): it is not a VGG state dict")
    indices = sorted(modules)
    tokens: list[Any] = []
    bn_flags: list[bool] = []
    channels: int | None = None
    in_channels = 0
    expected, i = 0, 0
    while i < len(indices):
        index = indices[i]
        weight = modules[index].get("weight")
        if weight is None or weight.dim() != 4:
            raise CheckpointError(f"{where}: features.{index} should be a convolution (a 4-D weight) but holds "
                                  f"{sorted(modules[index])} {shape_text(weight)}: not a VGG layout vggnet reads")
        gap = index - expected
        if not tokens and gap:
            raise CheckpointError(f"{where}: the first convolution is features.{index}, expected features.0")
        if gap == 1:
            tokens.append("M")
        elif gap == 2:
            tokens += ["LRN", "M"]  # config A-LRN: conv, ReLU, LRN, pool
        elif gap > 2:
            raise CheckpointError(f"{where}: {gap} parameterless layers between features.{expected - 1} and "
                                  f"features.{index}; vggnet reads pools and A-LRN's LRN + pool only")
        out, cin, kh, kw = (int(s) for s in weight.shape)
        if channels is None:
            in_channels = cin
        elif cin != channels:
            raise CheckpointError(f"{where}: features.{index}.weight {shape_text(weight)} takes {cin} channels, the "
                                  f"layer before gives {channels}")
        if kh != kw or kh % 2 == 0:
            raise CheckpointError(f"{where}: features.{index}.weight {shape_text(weight)} has a {kh}x{kw} kernel; "
                                  "VGG convolutions are square with an odd side")
        tokens.append(out if kh == 3 else f"conv{kh}-{out}")
        following = modules.get(index + 1, {})
        has_bn = "running_mean" in following or (following.get("weight") is not None
                                                  and following["weight"].dim() == 1)
        bn_flags.append(has_bn)
        i += 2 if has_bn else 1
        expected = index + (3 if has_bn else 2)
        channels = out
    tokens.append("M")  # every VGG ends its features with a pool
    if len(set(bn_flags)) > 1:
        raise CheckpointError(f"{where}: {sum(bn_flags)} of {len(bn_flags)} convolutions are followed by batch norm; "
                              "a VGG has it after every convolution or after none")
    return tokens, bn_flags[0], in_channels, channels


def _head(state: dict[str, torch.Tensor], channels: int, pools: int, where: str | os.PathLike) -> dict[str, Any]:
    """Head keywords (``head``, ``num_classes``, ``hidden``, ``input_size``) from ``classifier.*``; {} for none."""
    layers: dict[int, torch.Tensor] = {}
    for key, value in state.items():
        match = _KEY.match(key)
        if match and match.group(1) == "classifier" and match.group(3) == "weight":
            layers[int(match.group(2))] = value
    if not layers:
        return {}
    if set(layers) == {1} and layers[1].dim() == 2:
        if layers[1].shape[1] != channels:
            raise CheckpointError(f"{where}: classifier.1.weight {shape_text(layers[1])} takes {layers[1].shape[1]} "
                                  f"features, the last convolution gives {channels}")
        return {"head": "gap", "num_classes": int(layers[1].shape[0])}
    if set(layers) != {0, 3, 6}:
        raise CheckpointError(f"{where}: classifier layers {sorted(layers)} match none of vggnet's heads (classic, "
                              "fitted and dense: 0, 3, 6; gap: 1)")
    fc1, fc2, fc3 = layers[0], layers[3], layers[6]
    if fc1.dim() not in (2, 4) or fc2.dim() not in (2, 4) or fc3.dim() not in (2, 4):
        raise CheckpointError(f"{where}: classifier weights {shape_text(fc1)}, {shape_text(fc2)}, {shape_text(fc3)} are "
                              "not linear (out, in) or convolutional (out, in, kh, kw) layers")
    hidden, classes = int(fc1.shape[0]), int(fc3.shape[0])
    if fc1.dim() == 4:  # the dense head: FC1 is a k x k convolution over the last feature map
        head = {"head": "dense", "input_size": [int(fc1.shape[2]) << pools, int(fc1.shape[3]) << pools]}
        if fc1.shape[1] != channels:
            raise CheckpointError(f"{where}: classifier.0.weight {shape_text(fc1)} takes {fc1.shape[1]} channels, "
                                  f"the last convolution gives {channels}")
    else:
        inputs = int(fc1.shape[1])
        side = math.isqrt(inputs // channels) if inputs % channels == 0 else 0
        if inputs == channels * 49:
            head = {"head": "classic"}
        elif side and side * side * channels == inputs:
            head = {"head": "fitted", "input_size": [side << pools, side << pools]}
        else:
            raise CheckpointError(f"{where}: classifier.0.weight {shape_text(fc1)} takes {inputs} features, which "
                                  f"is not {channels} channels times a square feature map")
    flat = [t.reshape(t.shape[0], -1) if t.dim() == 4 else t for t in (fc2, fc3)]
    if tuple(flat[0].shape) != (hidden, hidden) or tuple(flat[1].shape) != (classes, hidden):
        raise CheckpointError(f"{where}: classifier.3.weight {shape_text(fc2)} and classifier.6.weight "
                              f"{shape_text(fc3)} do not follow FC1's {hidden} outputs")
    return {**head, "num_classes": classes, "hidden": hidden}


def _registry_name(tokens: list[Any], batch_norm: bool) -> tuple[str, float] | None:
    """The registry model (and width) whose architecture equals ``tokens``, if any."""
    layers = parse_arch(tokens)
    for name, (letter, bn) in MODELS.items():
        if bn != batch_norm:
            continue
        base = parse_arch(CFGS[letter])
        width = layers[0].channels / base[0].channels
        if scale_width(base, width) == layers:
            return name, (1.0 if width == 1 else width)
    return None


def detect(state: dict[str, torch.Tensor], where: str | os.PathLike) -> Architecture:
    """The architecture of a state dict in vggnet's layout (see the module docstring); CheckpointError naming the
    first key that does not fit a VGG."""
    other = sorted((k for k in state if not k.startswith(("features.", "classifier."))), key=sort_key)
    if other:
        raise CheckpointError(f"{where} is not a VGG state dict: it holds {other[0]} {shape_text(state[other[0]])}"
                              f"{f' and {len(other) - 1} more keys' if len(other) > 1 else ''} outside features/"
                              "classifier (vggnet reads torchvision's, timm's and Keras' VGG layouts)")
    tokens, batch_norm, in_channels, channels = _conv_tokens(state, where)
    pools = tokens.count("M")
    head = _head(state, channels, pools, where)
    kwargs: dict[str, Any] = {"in_channels": in_channels, **head}
    match = _registry_name(tokens, batch_norm)
    if match is None:
        name = "custom"
        kwargs.update(arch=tokens, batch_norm=batch_norm)
    else:
        name, width = match
        if width != 1.0:
            kwargs["width"] = width
    return Architecture(name, kwargs, features_only=not head)


# ------------------------------------------------------------------------------------------------ strict loading
def complete_batch_norm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add ``num_batches_tracked`` (0) to BN layers saved without it (files from PyTorch before 0.4.1)."""
    out = dict(state)
    for key in state:
        if key.endswith(".running_mean"):
            counter = key[: -len("running_mean")] + "num_batches_tracked"
            out.setdefault(counter, torch.tensor(0, dtype=torch.long))
    return out


def check_fits(model: nn.Module, state: dict[str, torch.Tensor], where: str | os.PathLike, what: str,
               prefix: str = "", hint: str = "") -> None:
    """Fail unless ``state`` has exactly ``model``'s keys (those under ``prefix``) with its shapes. Both are walked in
    module order; the message names the first position where they differ, with both keys and shapes."""
    expected = [(k, v) for k, v in model.state_dict().items() if k.startswith(prefix)]
    got = sorted(((k, v) for k, v in state.items() if k.startswith(prefix)), key=lambda item: sort_key(item[0]))
    for position in range(max(len(expected), len(got))):
        ek, ev = expected[position] if position < len(expected) else (None, None)
        gk, gv = got[position] if position < len(got) else (None, None)
        if ek == gk and ev.shape == gv.shape:
            continue
        if ek == gk:
            detail = f"{ek} is {shape_text(ev)} in {what} but {shape_text(gv)} in the file"
        elif gk is None:
            detail = f"the file ends where {what} has {ek} {shape_text(ev)}"
        elif ek is None:
            detail = f"the file has {gk} {shape_text(gv)} after the last tensor of {what}"
        else:
            detail = f"{what} has {ek} {shape_text(ev)} where the file has {gk} {shape_text(gv)}"
        raise CheckpointError(f"{where} does not fit {what}: {detail}{hint}")


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], where: str | os.PathLike, what: str,
                hint: str = "") -> None:
    """:func:`check_fits`, then load. A model on the meta device takes the file's tensors as they are
    (``assign=True``: no copy, no initialisation spent on weights that are replaced)."""
    check_fits(model, state, where, what, hint=hint)
    on_meta = any(p.is_meta for p in model.parameters())
    model.load_state_dict(state, strict=True, assign=on_meta)
