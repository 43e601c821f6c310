"""``vggnet eval SOURCE``: top-1, top-5, per-class accuracy and the confusion matrix on a whole test set, plainly or
with the paper's multi-scale protocols (``--scales``); the work and where its files go are
:func:`vggnet.evaluation.source.evaluate_source`'s."""

from __future__ import annotations

import argparse
import sys

from vggnet.base.errors import ConfigError
from vggnet.evaluation.multiscale import Protocol, parse_crops, parse_scales
from vggnet.evaluation.probe import decide as decide_precision
from vggnet.evaluation.probe import refuse_reprobe
from vggnet.evaluation.source import evaluate_source
from vggnet.net.report import table
from vggnet.runtime import resolve_runtime
from vggnet.base.limits import MAX_IMAGE_SIZE
from vggnet.cli.common import (SOURCE_HELP, add_runtime_options, add_source_options, batch_size_type, numbers_at_most, print_json, user_path)

#: The largest side of a --crops grid (the paper's is 5x5).
MAX_CROPS = 64


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a trained run or a weights file on a test set")
    p.add_argument("source", metavar="SOURCE", help=SOURCE_HELP)
    add_source_options(p)
    p.add_argument("--dataset", help="dataset to evaluate on (run directories: default the run's own; weights files: "
                   "required, e.g. folder:PATH with one subfolder per class in the model's class order)")
    p.add_argument("--data-dir", type=user_path, help="where the dataset files are")
    p.add_argument("--tta", choices=("flip",), help="average with horizontally flipped images")
    p.add_argument("--scales", type=numbers_at_most(MAX_IMAGE_SIZE, "test scales (pixels)"), metavar="Q1,Q2,...",
                   help="the paper's multi-scale test (section 3.2): test scales in "
                   "pixels, the side the test image is rescaled to (an in-memory dataset: the image as preprocessed "
                   "to the training size S; a prepared directory: the original image, its shorter side at Q); Q = S "
                   "is single-scale. Dense evaluation unless --crops is given alone; the probabilities are averaged "
                   "over scales")
    p.add_argument("--dense", action="store_true", help="with --scales: the fully convolutional net on the whole "
                   "rescaled image, class scores averaged over space (the default with --scales)")
    p.add_argument("--crops", type=numbers_at_most(MAX_CROPS, "the grid's rows and columns"), metavar="RxC",
                   help="with --scales: a grid of R x C crops of S x S per scale through "
                   "the original net (5x5 is the paper's); with --dense too, dense and crops are averaged")
    p.add_argument("--flip", action="store_true", help="with --scales: also the horizontally flipped image (dense) "
                   "and each crop's mirror")
    p.add_argument("--batch-size", type=batch_size_type, help="images per batch (default: by image size: 256 at 32x32, "
                   "16 at 224x224); with --scales, network inputs per pass (a crop or a mirror counts as one)")
    add_runtime_options(p, "fp32", "fp32 (default: exact numbers), or bf16/fp16 for speed, or auto: on a CPU with "
                        "native bf16 the faster of fp32 and bf16, measured on a few forward passes of this model "
                        "(bf16 only when at least 5 percent faster; cached in ~/.cache/vggnet/probe.json and recorded "
                        "in the written JSON), fp32 on other CPUs, bf16 or fp16 on a GPU; on the CPU each in the "
                        "channels_last and the NCHW memory layout (NCHW only when at least 5 percent faster)",
                        compile=True)
    p.add_argument("--reprobe", action="store_true", help="with --precision auto: measure the candidates again "
                   "instead of reading the cached decision")
    p.add_argument("--out", metavar="DIR", help="write eval.json and confusion.png into DIR instead of "
                   "RUN/evals/NAME.json and .png (NAME: the protocol, e.g. test, test-flip, scales-32-40-dense); a "
                   "run directory only if it is the evaluated run itself; weights files: written only with --out")
    p.add_argument("--json", action="store_true", help="print {top1, top5, per_class, n, ...} (fractions)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    protocol = _protocol(args)
    refuse_reprobe("eval", args.precision, args.reprobe)
    runtime = resolve_runtime(args.device, args.precision, threads=args.threads, compile=args.compile)
    done = evaluate_source(args.source, runtime, weights=args.weights, model=args.model, dataset=args.dataset,
                           data_dir=args.data_dir, tta=args.tta, protocol=protocol, batch_size=args.batch_size,
                           out=args.out, progress=not args.json, decide=_decide(args))
    if args.json:
        print_json(done.record)
        return 0
    result = done.result
    named = f", {protocol.describe()}" if protocol is not None else ""
    print(f"{done.dataset} test set, {result.n} images{named}: top-1 {100 * result.top1:.2f}%, "
          f"top-5 {100 * result.top5:.2f}%, loss {result.loss:.4f}")
    rows = [[name, f"{100 * acc:.2f}%", str(sum(result.confusion[i]))] for i, (name, acc) in
            enumerate(zip(result.classes, result.per_class))]
    print(table(["class", "accuracy", "images"], rows, "lrr"))
    if done.files is not None:
        print(f"confusion matrix: {done.files[1]} and {done.files[0]}")
    return 0


def _decide(args: argparse.Namespace):
    """evaluate_source's ``decide``: precision auto by measurement once the model is loaded, announced on stderr."""
    def decide(loaded, runtime):
        choice = decide_precision(loaded, runtime, args.precision, args.batch_size, reprobe=args.reprobe, verb="eval")
        if choice.line:
            print(choice.line, file=sys.stderr, flush=True)
        return choice.runtime, choice.record

    return decide if args.precision == "auto" else None


def _protocol(args: argparse.Namespace) -> Protocol | None:
    """The multi-scale protocol of ``--scales``/``--dense``/``--crops``/``--flip``, or ``None`` for plain eval."""
    if args.scales is None:
        given = [flag for flag, on in (("--dense", args.dense), ("--crops", args.crops is not None),
                                       ("--flip", args.flip)) if on]
        if given == ["--flip"]:
            raise ConfigError("--flip belongs to multi-scale evaluation: for plain evaluation with the mirrored "
                              "images use --tta flip, or add --scales Q1,Q2,... (e.g. --scales 32,40,48)")
        if given:
            verb = "need" if len(given) > 1 else "needs"
            raise ConfigError(f"{' and '.join(given)} {verb} the test scales: add --scales Q1,Q2,... (image sides in "
                              "pixels, e.g. --scales 32,40,48 for a model trained at 32)")
        return None
    if args.tta:
        raise ConfigError("--tta flip is plain evaluation's flip; with --scales use --flip instead")
    crops = parse_crops(args.crops) if args.crops is not None else None
    return Protocol(parse_scales(args.scales), dense=args.dense or crops is None, crops=crops, flip=args.flip)
