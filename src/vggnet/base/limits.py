"""The bounds every verb shares: the largest networks, images, batches and rates vggnet accepts, and :class:`Range`,
the one check of a numeric option (the CLI's argument types, TrainConfig.validate and the card's checks use it).
Beyond these a number is a typo or a forgery, not a request (and it overflows deep inside torch)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

#: The largest architectures accepted: beyond them a number is a typo, not a network (and overflows tensor sizes).
MAX_CHANNELS = 8192  # channels of one convolution (VGG's widest is 512)
MAX_KERNEL = 15  # side of a convolution's kernel (VGG's are 3 and 1)
MAX_WIDTH = 16.0  # channel multiplier (scale_width)
MAX_CLASSES = 100_000  # classes of a model or a data set (ImageNet-21k has 21,841)
MAX_IMAGE_SIZE = 8192  # pixels of an image or input side

MAX_EPOCHS = 10**6
MAX_BATCH = 2**20  # images in one batch
MAX_IMAGES = 2**31 - 1  # images of a data set
#: Far beyond any useful rate (1e4 already diverges in the tests' tiny run): the bound stops float overflows, and a
#: rate that is merely too large is for the training loop's divergence check to report ("lower --lr").
MAX_LR = 1e6
#: torch seeds are 64-bit and the loop seeds each epoch with seed * 1_000_003 + epoch * 7919 + rank: 32 bits keep
#: that in range.
MAX_SEED = 2**32 - 1
MAX_THREADS = 1024
#: The devices a run may name (vggnet.runtime.pick_device's forms), with an index torch can parse.
DEVICE_NAME = re.compile(r"auto|(cpu|cuda)(:[0-9]{1,4})?")


def _shown(value: Any) -> str:
    """``value`` as a message shows it: a huge integer (JSON allows any) by its size, not by thousands of digits
    (which ``str`` refuses past 4300)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 100:
        return f"an integer of about {round(value.bit_length() * math.log10(2))} digits"
    return repr(value)


def _plain(number: float) -> str:
    """``1000000`` rather than ``1e+06`` or ``1000000.0``: how a bound reads in a message."""
    return str(int(number)) if float(number).is_integer() else repr(number)


@dataclass(frozen=True)
class Range:
    """The sane values of a numeric option: ``low`` to ``high`` (``open_low``/``open_high``: that end excluded),
    whole numbers only with ``integer``. Beyond them a value is a typo, or it overflows deep inside torch. The CLI's
    argument types (:mod:`vggnet.cli.common`) and :meth:`TrainConfig.validate` check the same ranges."""

    low: float
    high: float
    integer: bool = False
    open_low: bool = False
    open_high: bool = False

    def problem(self, value: Any) -> str | None:
        """What is wrong with ``value`` (``"must be >= 1, got 0"``), or ``None`` when it is in range."""
        if isinstance(value, bool) or not isinstance(value, int if self.integer else (int, float)):
            return f"must be {'an integer' if self.integer else 'a number'}, got {_shown(value)}"
        if isinstance(value, float) and not math.isfinite(value):
            return f"must be a finite number, got {value}"
        below = value < self.low or (self.open_low and value == self.low)
        above = value > self.high or (self.open_high and value == self.high)
        if (self.low, self.high) == (0, 1) and (below or above):  # a fraction: its interval says it best
            return f"must be in {'(' if self.open_low else '['}0, 1{')' if self.open_high else ']'}, got {value}"
        if below:
            return f"must be {'>' if self.open_low else '>='} {_plain(self.low)}, got {_shown(value)}"
        if above:
            return f"must be {'<' if self.open_high else '<='} {_plain(self.high)}, got {_shown(value)}"
        return None


#: Ranges of options that several verbs take (training's others are its own: vggnet.training.config.RANGES).
THREADS = Range(1, MAX_THREADS, integer=True)  # intra-op threads
WIDTH = Range(0, MAX_WIDTH, open_low=True)  # channel multiplier
IMAGE_SIZE = Range(1, MAX_IMAGE_SIZE, integer=True)  # pixels of an image side
IMAGES = Range(1, MAX_IMAGES, integer=True)  # images of a (sub)set
BATCH = Range(1, MAX_BATCH, integer=True)  # images per batch
