"""``vggnet predict SOURCE IMAGE...``: top-k classes with probabilities, with the model's own preprocessing.

SOURCE is a run directory (``vggnet train``) or a weights file (torchvision ``.pth``, timm ``.safetensors``, Keras
``.h5``; :mod:`vggnet.store.weights`), whose ImageNet class names and preprocessing come with it."""

from __future__ import annotations

import argparse
import sys

from vggnet.evaluation.probe import decide, refuse_reprobe
from vggnet.use.predict import predict_files
from vggnet.runtime import resolve_runtime
from vggnet.base.limits import MAX_CLASSES, Range
from vggnet.cli.common import SOURCE_HELP, add_runtime_options, add_source_options, in_range, load_source, one_line, print_json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="classify image files with a trained run or a weights file")
    p.add_argument("source", metavar="SOURCE", help=SOURCE_HELP)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any format Pillow reads)")
    p.add_argument("--top-k", type=in_range(Range(1, MAX_CLASSES, integer=True)), default=5, metavar="K",
                   help="how many classes to show per image, the most probable first (default %(default)s)")
    add_source_options(p)
    p.add_argument("--tta", choices=("flip",), help="flip: average the probabilities with those of the mirrored "
                   "image (default: none)")
    add_runtime_options(p, precision_help="auto (default): on a CPU with native bf16 the faster of fp32 and bf16, "
                        "measured on a few forward passes of this model (bf16 only when at least 5 percent faster; "
                        "cached in ~/.cache/vggnet/probe.json), fp32 on other CPUs, bf16 or fp16 on a GPU; on the CPU "
                        "each in the channels_last and the NCHW memory layout (NCHW only when at least 5 percent "
                        "faster)", compile=True)
    p.add_argument("--reprobe", action="store_true", help="with --precision auto: measure the candidates again "
                   "instead of reading the cached decision")
    p.add_argument("--json", action="store_true", help='print [{"file", "top": [{"index", "class", "prob"}]}]')
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    refuse_reprobe("predict", args.precision, args.reprobe)
    runtime = resolve_runtime(args.device, args.precision, threads=args.threads, compile=args.compile)
    loaded = load_source(args, runtime.device)
    choice = decide(loaded, runtime, args.precision, images=len(args.images), reprobe=args.reprobe, verb="predict")
    results = predict_files(loaded, args.images, args.top_k, choice.runtime, tta=args.tta)
    failed = [r for r in results if r.error]
    if args.json:
        print_json([r.to_dict() for r in results])
    else:
        for r in results:
            if r.top is not None:
                ranked = ", ".join(f"{t['class']} {100 * t['prob']:.1f}%" for t in r.top)
                print(f"{r.file}: {ranked}")
    for r in failed:
        print(one_line(f"vggnet predict: error: {r.error}"), file=sys.stderr)
    if choice.line and not failed:  # precision auto's choice; an error stays the one line on stderr
        print(choice.line, file=sys.stderr)
    return 2 if failed else 0
