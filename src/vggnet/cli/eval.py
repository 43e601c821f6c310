"""``vggnet eval SOURCE``: top-1, top-5, per-class accuracy and the confusion matrix on a whole test set.

SOURCE is a run directory (evaluated on its own dataset by default) or a weights file (:mod:`vggnet.store.weights`), which
has no dataset of its own: ``--dataset`` is required, and the results are written only with ``--out``.

Where the results go: beside a run's own files, never over training's eval.json and confusion.png:
``RUN/evals/NAME.json`` and ``RUN/evals/NAME.png``, NAME naming what was measured (:func:`eval_name`: ``test``,
``test-flip``, ``best-test``, ``scales-32-40-dense-crops-5x5-flip``, ``test-on-cifar10``, ...). ``--out DIR`` writes
``DIR/eval.json`` and ``DIR/confusion.png`` instead, unless DIR is a run directory: then only the evaluated run itself
(its evals/), never another run.

``--scales Q1,Q2,...`` switches to the paper's test protocols (:mod:`vggnet.evaluation.multiscale`): dense evaluation (the
default, or ``--dense``), a grid of crops (``--crops 5x5``), or both averaged, with ``--flip`` for the mirrored
images; eval.json then records the protocol under ``"protocol"`` beside the numbers."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from vggnet.base.errors import ConfigError, DataError
from vggnet.evaluation.metrics import check_fits, evaluate, load_test_set
from vggnet.evaluation.multiscale import Protocol, check_protocol, evaluate_multiscale, parse_crops, parse_scales
from vggnet.net.report import table
from vggnet.store.rundir import RunDir, write_evaluation
from vggnet.runtime import resolve_runtime
from vggnet.base.limits import MAX_IMAGE_SIZE
from vggnet.cli.common import (SOURCE_HELP, add_runtime_options, add_source_options, batch_size_type, load_source,
                     numbers_at_most, print_json, user_path)

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
                   "pixels, the side the test image (as preprocessed to the training size S) is rescaled to; Q = S is "
                   "single-scale. Dense evaluation unless --crops is given alone; the probabilities are averaged "
                   "over scales")
    p.add_argument("--dense", action="store_true", help="with --scales: the fully convolutional net on the whole "
                   "Q x Q image, class scores averaged over space (the default with --scales)")
    p.add_argument("--crops", type=numbers_at_most(MAX_CROPS, "the grid's rows and columns"), metavar="RxC",
                   help="with --scales: a grid of R x C crops of S x S per scale through "
                   "the original net (5x5 is the paper's); with --dense too, dense and crops are averaged")
    p.add_argument("--flip", action="store_true", help="with --scales: also the horizontally flipped image (dense) "
                   "and each crop's mirror")
    p.add_argument("--batch-size", type=batch_size_type, help="images per batch (default: by image size: 256 at 32x32, "
                   "16 at 224x224); with --scales, network inputs per pass (a crop or a mirror counts as one)")
    add_runtime_options(p, "fp32", "fp32 (default: exact numbers), or auto/bf16/fp16 for speed", compile=True)
    p.add_argument("--out", metavar="DIR", help="write eval.json and confusion.png into DIR instead of "
                   "RUN/evals/NAME.json and .png (NAME: the protocol, e.g. test, test-flip, scales-32-40-dense); a "
                   "run directory only if it is the evaluated run itself; weights files: written only with --out")
    p.add_argument("--json", action="store_true", help="print {top1, top5, per_class, n, ...} (fractions)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    is_run = Path(args.source).is_dir()
    if not is_run and Path(args.source).is_file() and not args.dataset:
        raise DataError(f"{args.source} is a weights file, which has no dataset of its own: name one with --dataset "
                        "(fashion-mnist, cifar10, cifar100 or folder:PATH, one subfolder per class in the model's "
                        "class order)")
    protocol = _protocol(args)
    in_run = _writes_into_run(args, is_run)  # refused before any work when --out is someone else's run
    if protocol is not None and args.compile:
        raise ConfigError("--compile applies to plain evaluation; the multi-scale protocols (--scales) run eagerly: "
                          "drop one of them")
    runtime = resolve_runtime(args.device, args.precision, threads=args.threads, compile=args.compile)
    loaded = load_source(args, runtime.device)
    card, prep = loaded.card, loaded.preprocess
    if protocol is not None:
        check_protocol(loaded.model, prep, protocol)  # before the test set is read
    dataset = args.dataset or card.dataset or "fashion-mnist"
    test = load_test_set(loaded, dataset, args.data_dir)
    check_fits(test, loaded.model, dataset, args.source)
    if protocol is None:
        result = evaluate(loaded.model, test, prep, runtime.device, runtime.precision, args.batch_size,
                          tta=args.tta, channels_last=runtime.channels_last, progress=not args.json,
                          compile=runtime.compile)
    else:
        result = evaluate_multiscale(loaded.model, test, prep, protocol, runtime.device, runtime.precision,
                                     args.batch_size, progress=not args.json, channels_last=runtime.channels_last)
    result.classes = loaded.classes or test.classes
    record = dict(result.to_dict(), dataset=dataset, weights=(args.weights or "model") if is_run else str(args.source),
                  tta=args.tta, precision=runtime.precision)
    named = f", {protocol.describe()}" if protocol is not None else ""
    if protocol is not None:
        record["protocol"] = protocol.to_dict()
    title = f"{card.model.get('name', 'model')} on {dataset}{named}: top-1 {100 * result.top1:.2f}%"
    if in_run:
        name = eval_name(protocol, args.tta, args.weights or "model", dataset, card.dataset)
        where = (RunDir(args.source).evals / f"{name}.json", RunDir(args.source).evals / f"{name}.png")
    else:
        where = (Path(args.out) / "eval.json", Path(args.out) / "confusion.png") if args.out else None
    if where is not None:
        write_evaluation(record, title, *where)
    if args.json:
        print_json(record)
        return 0
    print(f"{dataset} test set, {result.n} images{named}: top-1 {100 * result.top1:.2f}%, "
          f"top-5 {100 * result.top5:.2f}%, loss {result.loss:.4f}")
    rows = [[name, f"{100 * acc:.2f}%", str(sum(result.confusion[i]))] for i, (name, acc) in
            enumerate(zip(result.classes, result.per_class))]
    print(table(["class", "accuracy", "images"], rows, "lrr"))
    if where is not None:
        print(f"confusion matrix: {where[1]} and {where[0]}")
    return 0


def _writes_into_run(args: argparse.Namespace, is_run: bool) -> bool:
    """Whether the results go into the evaluated run's evals/ (a run without --out, or with --out naming the run
    itself); a ConfigError when ``--out`` is another run directory, which eval never writes into."""
    if args.out is None:
        return is_run
    if is_run and _same_folder(args.out, args.source):
        return True
    if RunDir(args.out).is_run():
        raise ConfigError(f"--out {args.out} is another run directory: vggnet eval writes into a run only when it "
                          f"evaluates it (its evals/ folder); choose a folder that is not a run")
    return False


def _same_folder(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()


def eval_name(protocol: Protocol | None, tta: str | None, weights: str, dataset: str, own: str | None) -> str:
    """The name of an evaluation's files in RUN/evals/: its protocol (``test``, ``test-flip``,
    ``scales-32-40-dense-crops-5x5-flip``), after ``best-`` for the best weights and before ``-on-DATASET`` for a
    dataset that is not the run's own; so that different measurements never overwrite each other."""
    if protocol is None:
        parts = ["test"] + (["flip"] if tta == "flip" else [])
    else:
        parts = (["scales", *map(str, protocol.scales)] + (["dense"] if protocol.dense else [])
                 + ([f"crops-{protocol.crops[0]}x{protocol.crops[1]}"] if protocol.crops else [])
                 + (["flip"] if protocol.flip else []))
    if weights == "best":
        parts.insert(0, "best")
    if dataset != own:
        parts += ["on", re.sub(r"[^A-Za-z0-9.]+", "-", dataset).strip("-.")[:80] or "dataset"]
    return "-".join(parts)


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
