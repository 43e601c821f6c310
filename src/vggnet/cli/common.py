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
