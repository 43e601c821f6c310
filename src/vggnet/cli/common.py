"""Argument types and options shared by several verbs."""

from __future__ import annotations

import argparse
import json
import re
from typing import Any

from ..models import HEADS


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _number_in(text: str, top_included: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (0.0 <= value <= 1.0 if top_included else 0.0 <= value < 1.0):
        raise argparse.ArgumentTypeError(f"must be in [0, 1{']' if top_included else ')'}, got {value}")
    return value


def fraction(text: str) -> float:
    """A number in [0, 1): dropout, momentum, label smoothing."""
    return _number_in(text, top_included=False)


def unit_interval(text: str) -> float:
    """A number in [0, 1]: a blend weight, a probability that may be 1."""
    return _number_in(text, top_included=True)


def image_size(text: str) -> tuple[int, int]:
    """``224`` or ``224x160`` (height x width)."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:[x,]\s*(\d+))?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: write N or HxW, e.g. 224 or 224x160")
    h = int(match.group(1))
    w = int(match.group(2) or h)
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
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
        parser.add_argument("--width", type=positive_float, metavar="W", help="channel multiplier (default: the named "
                            "model's 1.0; without --model, the default recipe's 0.25)")
        return
    parser.add_argument("--input-size", type=image_size, metavar="H[xW]", help="input size (default 224)")
    parser.add_argument("--in-channels", type=positive_int, metavar="N", help="input channels (default 3)")
    parser.add_argument("--num-classes", type=positive_int, metavar="N", help="classes (default 1000)")
    parser.add_argument("--head", choices=HEADS, help="classifier head (default classic)")
    parser.add_argument("--width", type=positive_float, metavar="W", help="channel multiplier (default 1.0)")


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
    print(json.dumps(obj, indent=2))


SOURCE_HELP = "run directory written by vggnet train, or a weights file (torchvision .pth, timm .safetensors, Keras .h5)"


def add_source_options(parser: argparse.ArgumentParser) -> None:
    """``--weights`` (run directories: final or best) and ``--model`` (weights files: the architecture to load into)."""
    from ..rundir import WEIGHTS

    parser.add_argument("--weights", choices=tuple(WEIGHTS), help="run directories: final weights (default), or the "
                        "best by validation accuracy (runs with --val-split)")
    parser.add_argument("--model", metavar="NAME", help="weights files: the registry model to load the file into "
                        "(default: the architecture read from the file's keys and shapes)")


def add_runtime_options(parser: argparse.ArgumentParser, precision: str = "auto",
                        precision_help: str = "auto (default): bf16 where the hardware runs it natively, else fp32",
                        compile: bool = False) -> None:
    """``--device``, ``--precision``, ``--threads`` (and with ``compile``, ``--compile``): what
    :func:`vggnet.runtime.resolve_runtime` takes."""
    from ..runtime import PRECISIONS

    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    parser.add_argument("--precision", choices=PRECISIONS, default=precision, help=precision_help)
    parser.add_argument("--threads", type=positive_int, help="intra-op threads (default: every available core)")
    if compile:
        parser.add_argument("--compile", action="store_true", help="torch.compile the network first: the first batch "
                            "pays tens of seconds of compilation, so it pays only on many images (docs/BENCHMARKS.md)")


def load_source(args: argparse.Namespace, device, need_head: bool = True):
    """The model of ``args.source`` (``--weights`` for run directories, ``--model`` for files); with ``need_head``,
    a features-only file (Keras notop) is refused: it has no classifier to use."""
    from ..source import load

    loaded = load(args.source, args.weights or "model", device, model=args.model)
    if need_head:
        loaded.require_head(args.source, args.verb)
    return loaded
