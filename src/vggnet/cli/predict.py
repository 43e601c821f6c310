"""``vggnet predict RUN_DIR IMAGE...``: top-k classes with probabilities, using the run's saved preprocessing."""

from __future__ import annotations

import argparse
import sys

from ..checkpoint import load
from ..predict import predict_files
from .common import positive_int, print_json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="classify image files with a trained run")
    p.add_argument("run_dir", help="run directory written by vggnet train")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any format Pillow reads)")
    p.add_argument("--top-k", type=positive_int, default=5, metavar="K")
    p.add_argument("--weights", choices=("model", "best"), default="model")
    p.add_argument("--tta", choices=("flip",))
    p.add_argument("--json", action="store_true", help='print [{"file", "top": [{"index", "class", "prob"}]}]')
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    loaded = load(args.run_dir, f"{args.weights}.safetensors")
    results = predict_files(loaded, args.images, args.top_k, tta=args.tta)
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
