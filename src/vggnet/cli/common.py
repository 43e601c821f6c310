"""Argument types and options shared by several verbs."""

from __future__ import annotations

import argparse
import math
import os
import re
from typing import Any, Callable

from vggnet.net.models import HEADS
from vggnet.base.strictjson import dumps as strict_json
from vggnet.base.limits import (BATCH, DEVICE_NAME, MAX_CHANNELS, MAX_CLASSES, MAX_IMAGE_SIZE, THREADS, WIDTH,
                               Range)

#: Longer than any number anyone types: refused before int() (which gives up past 4300 digits) or float() see it.
MAX_NUMBER_CHARS = 100


#: Characters other than "\n" that end a line (str.splitlines): in a message they come from a name the user gave.
_LINE_ENDS = re.compile("[\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")


def one_line(message: str) -> str:
    """``message`` as one line: its line breaks (and the indentation around them) become single spaces, and any
    other line-ending character (from a file name, say) a backslash escape."""
    message = re.sub(r"\s*\n\s*", " ", message.strip())
    return _LINE_ENDS.sub(lambda end: end.group().encode("unicode_escape").decode("ascii"), message)


def shown(text: str) -> str:
    """``text`` quoted for a one-line message: escapes for newlines and undecodable bytes, long text cut short."""
    return repr(text if len(text) <= 40 else text[:37] + "...")


def _parse_number(text: str, integer: bool) -> int | float:
    if len(text) > MAX_NUMBER_CHARS:
        raise argparse.ArgumentTypeError(f"{shown(text)} is too long for a number")
    try:
        return int(text) if integer else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{shown(text)} is not {'an integer' if integer else 'a number'}") from None


def in_range(allowed: Range) -> Callable[[str], int | float]:
    """An argument type: a number in ``allowed`` (see :class:`vggnet.training.config.Range`), refused at parse time
    with one line (``argument --rounds: must be <= 10000, got 99999``)."""

    def parse(text: str) -> int | float:
        value = _parse_number(text, allowed.integer)
        problem = allowed.problem(value)
        if problem is not None:
            raise argparse.ArgumentTypeError(problem)
        return value

    return parse


def integer(text: str) -> int:
    """Any integer: ``vggnet train``'s options, whose ranges are :data:`vggnet.training.config.RANGES`, checked by
    :func:`~vggnet.training.resolve_config` before any work (and the same for API users and for resumed runs)."""
    return _parse_number(text, integer=True)


def number(text: str) -> float:
    """Any finite number (``nan`` and ``inf`` are refused here); ranges as for :func:`integer`."""
    value = _parse_number(text, integer=False)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {value}")
    return value


def numbers_at_most(limit: int, what: str) -> Callable[[str], str]:
    """An argument type for a list the verb parses itself (``--scales 32,40``, ``--svd fc6=64``): the text, once
    every number in it is at most ``limit`` (``what`` names them in the message); so the verb's parser never meets
    thousands of digits, which ``int`` refuses with a ValueError."""

    def check(text: str) -> str:
        for digits in re.findall(r"\d+", text):
            if len(digits) > len(str(limit)) or int(digits) > limit:
                raise argparse.ArgumentTypeError(f"{shown(text)}: {what} are at most {limit}")
        return text

    return check


def user_path(text: str) -> str:
    """A folder option, ``~`` and ``~user`` expanded here: pathlib's ``expanduser``, which the data and weights code
    call, raises a RuntimeError for a user that does not exist."""
    expanded = os.path.expanduser(text)
    if expanded.startswith("~"):
        raise argparse.ArgumentTypeError(f"{shown(text)}: there is no home folder {shown(text.split('/')[0])}")
    return expanded


def device_name(text: str) -> str:
    """``--device``: auto, cpu, cuda or cuda:N (whether that device exists is :func:`vggnet.runtime.pick_device`'s
    to say)."""
    if DEVICE_NAME.fullmatch(text) is None:
        raise argparse.ArgumentTypeError(f"must be auto, cpu, cuda or cuda:N, got {shown(text)}")
    return text


#: Argument types several verbs share.
batch_size_type = in_range(BATCH)
threads_type = in_range(THREADS)
width_type = in_range(WIDTH)
rounds_type = in_range(Range(1, 10_000, integer=True))  # timed runs of one measurement: beyond, days
fraction = in_range(Range(0, 1, open_high=True))  # dropout, momentum, label smoothing
unit_interval = in_range(Range(0, 1))  # a blend weight, a probability that may be 1


def image_size(text: str) -> tuple[int, int]:
    """``224`` or ``224x160`` (height x width), each side at most :data:`MAX_IMAGE_SIZE` pixels."""
    match = re.fullmatch(r"\s*(\d{1,9})\s*(?:[x,]\s*(\d{1,9}))?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"{shown(text)} is not a size: write N or HxW, e.g. 224 or 224x160")
    h = int(match.group(1))
    w = int(match.group(2) or h)
    if not (1 <= h <= MAX_IMAGE_SIZE and 1 <= w <= MAX_IMAGE_SIZE):
        raise argparse.ArgumentTypeError(f"size must be positive and at most {MAX_IMAGE_SIZE} pixels a side, got "
                                         f"{shown(text)}")
    return (h, w)


def add_model_options(parser: argparse.ArgumentParser, training: bool = False) -> None:
    """Options that shape a model; ``None`` defaults leave the model's own defaults in force. For ``training``,
    input size, channels and classes come from the dataset and are not offered, and the help names the rule of
    :mod:`vggnet.training.config` (the default recipe's shape applies only when no model is named)."""
    parser.add_argument("--arch", help="custom architecture for model 'custom', e.g. '64,M,128,M,256,256,M' "
                        "(conv1-256 for a 1x1 conv, LRN for local response norm)")
    parser.add_argument("--batch-norm", action="store_true", default=None, help="custom models: BN after every conv")
    if training:
        parser.add_argument("--head", choices=HEADS, help="classifier head (default: the named model's classic; "
                            "without --model, the default recipe's gap)")
        parser.add_argument("--width", type=number, metavar="W", help="channel multiplier (default: the named "
                            "model's 1.0; without --model, the default recipe's 0.25)")
        return
    parser.add_argument("--input-size", type=image_size, metavar="H[xW]", help="input size (default 224)")
    parser.add_argument("--in-channels", type=in_range(Range(1, MAX_CHANNELS, integer=True)), metavar="N",
                        help="input channels (default 3)")
    parser.add_argument("--num-classes", type=in_range(Range(1, MAX_CLASSES, integer=True)), metavar="N",
                        help="classes (default 1000)")
    parser.add_argument("--head", choices=HEADS, help="classifier head (default classic)")
    parser.add_argument("--width", type=width_type, metavar="W", help="channel multiplier (default 1.0)")


def model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "arch": args.arch,
        "batch_norm": args.batch_norm,
        "input_size": args.input_size,
        "in_channels": args.in_channels,
        "num_classes": args.num_classes,
        "head": args.head,
        "width": args.width,
    }


def print_json(obj: Any) -> None:
    """``obj`` on stdout as strict JSON (a non-finite number as a string: :mod:`vggnet.base.strictjson`)."""
    print(strict_json(obj, indent=2))


SOURCE_HELP = "run directory written by vggnet train, or a weights file (torchvision .pth, timm .safetensors, Keras .h5)"


def add_source_options(parser: argparse.ArgumentParser) -> None:
    """``--weights`` (run directories: final or best) and ``--model`` (weights files: the architecture to load into)."""
    from vggnet.store.rundir import WEIGHTS

    parser.add_argument("--weights", choices=tuple(WEIGHTS), help="run directories: final weights (default), or the "
                        "best by validation accuracy (runs with --val-split)")
    parser.add_argument("--model", metavar="NAME", help="weights files: the registry model to load the file into "
                        "(default: the architecture read from the file's keys and shapes)")


def add_runtime_options(parser: argparse.ArgumentParser, precision: str = "auto",
                        precision_help: str = "auto (default): bf16 where the hardware runs it natively, else fp32",
                        compile: bool = False) -> None:
    """``--device``, ``--precision``, ``--threads`` (and with ``compile``, ``--compile``): what
    :func:`vggnet.runtime.resolve_runtime` takes."""
    from vggnet.runtime import GPU_HOST_THREADS, PRECISIONS

    parser.add_argument("--device", type=device_name, default="auto", help="auto (default), cpu, cuda, cuda:N")
    parser.add_argument("--precision", choices=PRECISIONS, default=precision, help=precision_help)
    parser.add_argument("--threads", type=threads_type, help="intra-op threads (default: every available core; beside "
                        f"a GPU {GPU_HOST_THREADS})")
    if compile:
        parser.add_argument("--compile", action="store_true", help="torch.compile the network first: the first batch "
                            "pays tens of seconds of compilation, so it pays only on many images (docs/BENCHMARKS.md)")


def load_source(args: argparse.Namespace, device, need_head: bool = True):
    """The model of ``args.source`` (``--weights`` for run directories, ``--model`` for files); with ``need_head``,
    a features-only file (Keras notop) is refused: it has no classifier to use."""
    from vggnet.store.load import load

    loaded = load(args.source, args.weights or "model", device, model=args.model)
    if need_head:
        loaded.require_head(args.source, args.verb)
    return loaded
