"""``vggnet predict RUN_DIR IMAGE...``: top-k classes with probabilities, using the run's saved preprocessing."""

from __future__ import annotations

import argparse
import sys

from ..predict import predict_files
from ..rundir import WEIGHTS, load
from ..runtime import PRECISIONS, resolve_runtime
from .common import positive_int, print_json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="classify image files with a trained run")
    p.add_argument("run_dir", help="run directory written by vggnet train")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any format Pillow reads)")
    p.add_argument("--top-k", type=positive_int, default=5, metavar="K")
    p.add_argument("--weights", choices=tuple(WEIGHTS), default="model",
                   help="final weights, or the best by validation accuracy (runs with --val-split)")
    p.add_argument("--tta", choices=("flip",))
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto (default): bf16 where the hardware runs it natively, else fp32")
    p.add_argument("--threads", type=positive_int, help="intra-op threads (default: every available core)")
    p.add_argument("--json", action="store_true", help='print [{"file", "top": [{"index", "class", "prob"}]}]')
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    runtime = resolve_runtime(args.device, args.precision, threads=args.threads)
    loaded = load(args.run_dir, args.weights, runtime.device)
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
