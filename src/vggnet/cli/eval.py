"""``vggnet eval RUN_DIR``: top-1, top-5, per-class accuracy and the confusion matrix on a whole test set."""

from __future__ import annotations

import argparse

from ..data import load_dataset
from ..errors import DataError
from ..evaluation import evaluate
from ..report import table
from ..rundir import WEIGHTS, RunDir
from ..runtime import PRECISIONS, resolve_runtime
from .common import positive_int, print_json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a trained run on a test set")
    p.add_argument("run_dir", help="run directory written by vggnet train")
    p.add_argument("--weights", choices=tuple(WEIGHTS), default="model",
                   help="final weights, or the best by validation accuracy (runs with --val-split)")
    p.add_argument("--dataset", help="dataset to evaluate on (default: the run's own)")
    p.add_argument("--data-dir", help="where the dataset files are")
    p.add_argument("--tta", choices=("flip",), help="average with horizontally flipped images")
    p.add_argument("--batch-size", type=positive_int, help="images per batch (default: by image size: 256 at 32x32, "
                   "16 at 224x224)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="fp32 (default: exact numbers), or auto/bf16/fp16 for speed")
    p.add_argument("--threads", type=positive_int, help="intra-op threads (default: every available core)")
    p.add_argument("--out", metavar="DIR", help="where eval.json and confusion.png go (default: the run directory)")
    p.add_argument("--json", action="store_true", help="print {top1, top5, per_class, n, ...} (fractions)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    runtime = resolve_runtime(args.device, args.precision, threads=args.threads)
    rundir = RunDir(args.run_dir)
    loaded = rundir.load(args.weights, runtime.device)
    card = loaded.card
    dataset = args.dataset or card.dataset or "fashion-mnist"
    data_dir = args.data_dir or (card.train_config or {}).get("data_dir")  # the run's own copy first
    _, test = load_dataset(dataset, data_dir, card.image_size)
    if test.images.shape[1] != loaded.model.in_channels or len(test.classes) != loaded.model.num_classes:
        raise DataError(f"{dataset} has {test.images.shape[1]} channel(s) and {len(test.classes)} classes; the model "
                        f"in {args.run_dir} expects {loaded.model.in_channels} and {loaded.model.num_classes}")
    result = evaluate(loaded.model, test, loaded.preprocess, runtime.device, runtime.precision, args.batch_size,
                      tta=args.tta, channels_last=runtime.channels_last, progress=not args.json)
    result.classes = loaded.classes or test.classes
    record = dict(result.to_dict(), dataset=dataset, weights=args.weights, tta=args.tta,
                  precision=runtime.precision)
    title = f"{card.model.get('name', 'model')} on {dataset}: top-1 {100 * result.top1:.2f}%"
    out = rundir.write_eval(record, title, args.out)
    if args.json:
        print_json(record)
        return 0
    print(f"{dataset} test set, {result.n} images: top-1 {100 * result.top1:.2f}%, top-5 {100 * result.top5:.2f}%, "
          f"loss {result.loss:.4f}")
    rows = [[name, f"{100 * acc:.2f}%", str(sum(result.confusion[i]))] for i, (name, acc) in
            enumerate(zip(result.classes, result.per_class))]
    print(table(["class", "accuracy", "images"], rows, "lrr"))
    print(f"confusion matrix: {out / rundir.confusion.name} and {out / rundir.eval.name}")
    return 0
