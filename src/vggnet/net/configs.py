"""The VGG family as data: the paper's Table 1 and a parser for custom architectures.

An architecture is a list of layer tokens, read left to right:

- ``64``: a 3x3 convolution (stride 1, padding 1) with 64 output channels, then ReLU;
- ``(256, 1)`` or ``"conv1-256"``: a convolution with an explicit kernel size (config C's 1x1 convs);
  ``"conv3-64"`` is the paper's spelling of ``64``;
- ``"M"``: a 2x2 max-pool with stride 2;
- ``"LRN"``: local response normalisation as in AlexNet (size 5, alpha 1e-4, beta 0.75, k 2; PyTorch divides alpha by the size, as Caffe does), config A-LRN.

The d2l block form ``((num_convs, channels), ...)`` is also accepted: each block is ``num_convs`` 3x3 convs
followed by a max-pool.  :func:`parse_arch` turns either form into a tuple of :class:`Conv`, :class:`Pool` and
:class:`LRN` records; :func:`arch_to_json` gives the canonical JSON-able list stored in checkpoints.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

from vggnet.base.limits import MAX_CHANNELS, MAX_KERNEL, MAX_WIDTH
from vggnet.base.errors import ConfigError

# Table 1 of Simonyan & Zisserman (arXiv:1409.1556). Keys are the paper's letters.
CFGS: dict[str, list[Any]] = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "A-LRN": [64, "LRN", "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "B": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "C": [64, 64, "M", 128, 128, "M", 256, 256, (256, 1), "M", 512, 512, (512, 1), "M", 512, 512, (512, 1), "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "E": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}

# d2l's VGG-11 in block form (num_convs, channels); equals config A.
D2L_VGG11_BLOCKS = ((1, 64), (1, 128), (2, 256), (2, 512), (2, 512))



@dataclass(frozen=True)
class Conv:
    """A convolution (then ReLU): ``channels`` outputs, ``kernel`` x ``kernel``, padding ``kernel // 2``."""

    channels: int
    kernel: int = 3


@dataclass(frozen=True)
class Pool:
    """A 2x2 max-pool with stride 2."""


@dataclass(frozen=True)
class LRN:
    """local response normalisation as in AlexNet (size 5, alpha 1e-4, beta 0.75, k 2; PyTorch divides alpha by the size, as Caffe does)."""


Layer = Conv | Pool | LRN

_CONV_WORD = re.compile(r"^conv(\d{1,9})-(\d{1,9})$")


def _is_int_pair(item: Any) -> bool:
    return isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(v, int) for v in item)


def _is_block_spec(arch: Sequence[Any]) -> bool:
    """True for the d2l form: every item a pair of ints and no pool marker."""
    return len(arch) > 0 and all(_is_int_pair(item) for item in arch)


def blocks_to_arch(blocks: Sequence[Sequence[int]]) -> list[Any]:
    """Expand d2l's ``((num_convs, channels), ...)`` into the paper-style token list."""
    arch: list[Any] = []
    for num_convs, channels in blocks:
        arch += [channels] * num_convs + ["M"]
    return arch


def _parse_token(token: Any) -> Layer:
    if isinstance(token, (Conv, Pool, LRN)):
        return token
    if isinstance(token, bool):
        raise ConfigError(f"architecture token {token!r} is not a layer: use a channel count, (channels, kernel), 'M' or 'LRN'")
    if isinstance(token, int):
        return Conv(token)
    if _is_int_pair(token):
        return Conv(token[0], token[1])
    if isinstance(token, str):
        word = token.strip()
        if word.upper() in ("M", "MAXPOOL", "POOL"):
            return Pool()
        if word.upper() == "LRN":
            return LRN()
        if word.isdecimal() and len(word) <= 9:  # longer: far beyond MAX_CHANNELS (and int() refuses thousands)
            return Conv(int(word))
        match = _CONV_WORD.match(word.lower())
        if match:
            return Conv(int(match.group(2)), int(match.group(1)))
    raise ConfigError(
        f"architecture token {token!r} is not a layer: use a channel count (64), (channels, kernel) or 'conv1-256', "
        "'M' for max-pool, 'LRN'"
    )


def parse_arch(arch: str | Sequence[Any]) -> tuple[Layer, ...]:
    """Parse a paper letter (``"D"``), a paper-style token list, a comma-separated string or d2l blocks."""
    if isinstance(arch, str):
        if arch in CFGS:
            arch = CFGS[arch]
        else:
            arch = [tok for tok in arch.replace(" ", "").split(",") if tok]
    if _is_block_spec(arch):
        arch = blocks_to_arch(arch)
    layers = tuple(_parse_token(tok) for tok in arch)
    convs = [layer for layer in layers if isinstance(layer, Conv)]
    if not convs:
        raise ConfigError(f"architecture {list(arch)!r} has no convolution")
    for conv in convs:
        if not 1 <= conv.channels <= MAX_CHANNELS or not 1 <= conv.kernel <= MAX_KERNEL or conv.kernel % 2 == 0:
            raise ConfigError(f"convolution {conv.channels} channels, kernel {conv.kernel}: channels must be >= 1 and "
                              f"<= {MAX_CHANNELS}, the kernel odd and <= {MAX_KERNEL}")
    if isinstance(layers[0], LRN):
        raise ConfigError("architecture starts with LRN: put it after a convolution")
    return layers


def arch_to_json(layers: Sequence[Layer]) -> list[Any]:
    """Canonical JSON form: ints for 3x3 convs, ``"convK-C"`` strings for others, "M", "LRN".

    Strings rather than ``[channels, kernel]`` pairs, so a list of only non-3x3 convs is never mistaken for d2l
    blocks when it is parsed again."""
    out: list[Any] = []
    for layer in layers:
        if isinstance(layer, Conv):
            out.append(layer.channels if layer.kernel == 3 else f"conv{layer.kernel}-{layer.channels}")
        else:
            out.append("M" if isinstance(layer, Pool) else "LRN")
    return out


def scale_width(layers: Sequence[Layer], width: float) -> tuple[Layer, ...]:
    """Multiply every conv's channel count by ``width`` (d2l's quarter-width VGG-11 is ``width=0.25``)."""
    if not width > 0:
        raise ConfigError(f"width must be > 0, got {width}")
    if not width <= MAX_WIDTH:
        raise ConfigError(f"width must be <= {MAX_WIDTH:g} (a channel multiplier), got {width}")
    return tuple(
        Conv(max(1, int(round(layer.channels * width))), layer.kernel) if isinstance(layer, Conv) else layer
        for layer in layers
    )


def num_pools(layers: Sequence[Layer]) -> int:
    return sum(isinstance(layer, Pool) for layer in layers)
