"""``vggnet predict SOURCE IMAGE...``: top-k classes with probabilities, with the model's own preprocessing.

SOURCE is a run directory (``vggnet train``) or a weights file (torchvision ``.pth``, timm ``.safetensors``, Keras
``.h5``; :mod:`vggnet.weights`), whose ImageNet class names and preprocessing come with it."""

from __future__ import annotations

import argparse
import sys

from ..predict import predict_files
from ..rundir import WEIGHTS
from ..runtime import PRECISIONS, resolve_runtime
from ..source import load
from .common import positive_int, print_json

SOURCE_HELP = "run directory written by vggnet train, or a weights file (torchvision .pth, timm .safetensors, Keras .h5)"
MODEL_HELP = ("weights files: the registry model to load the file into (default: the architecture read from the "
              "file's keys and shapes)")
WEIGHTS_HELP = "run directories: final weights (default), or the best by validation accuracy (runs with --val-split)"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="classify image files with a trained run or a weights file")
    p.add_argument("source", metavar="SOURCE", help=SOURCE_HELP)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any format Pillow reads)")
    p.add_argument("--top-k", type=positive_int, default=5, metavar="K")
    p.add_argument("--weights", choices=tuple(WEIGHTS), help=WEIGHTS_HELP)
    p.add_argument("--model", metavar="NAME", help=MODEL_HELP)
    p.add_argument("--tta", choices=("flip",))
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto (default): bf16 where the hardware runs it natively, else fp32")
    p.add_argument("--threads", type=positive_int, help="intra-op threads (default: every available core)")
    p.add_argument("--json", action="store_true", help='print [{"file", "top": [{"index", "class", "prob"}]}]')
    p.set_defaults(run=run)


def load_source(args: argparse.Namespace, device) -> object:
    """The model of ``args.source`` (``--weights`` for run directories, ``--model`` for files); a features-only
    file (Keras notop) has no classifier to use."""
    loaded = load(args.source, args.weights or "model", device, model=args.model)
    loaded.require_head(args.source, args.verb)
    return loaded


def run(args: argparse.Namespace) -> int:
    runtime = resolve_runtime(args.device, args.precision, threads=args.threads)
    loaded = load_source(args, runtime.device)
    results = predict_files(loaded, args.images, args.top_k, runtime, tta=args.tta)
    failed = [r for r in results if r.error]
    if args.json:
        print_json([r.to_dict() for r in results])
    else:
        for r in results:
            if r.top is not None:
                ranked = ", ".join(f"{t['class']} {100 * t['prob']:.1f}%" for t in r.top)
                print(f"{r.file}: {ranked}")
    for r in failed:
        print(f"vggnet predict: error: {r.error}", file=sys.stderr)
    return 2 if failed else 0
