"""``vggnet eval RUN_DIR``: top-1, top-5, per-class accuracy and the confusion matrix on a whole test set."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..checkpoint import atomic_write_json, load
from ..data import load_dataset
from ..errors import DataError
from ..evaluation import evaluate
from ..hardware import pick_device, pick_precision, set_threads
from ..report import table
from .common import positive_int, print_json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a trained run on a test set")
    p.add_argument("run_dir", help="run directory written by vggnet train")
    p.add_argument("--weights", choices=("model", "best"), default="model", help="final or best-epoch weights")
    p.add_argument("--dataset", help="dataset to evaluate on (default: the run's own)")
    p.add_argument("--data-dir", help="where the dataset files are")
    p.add_argument("--tta", choices=("flip",), help="average with horizontally flipped images")
    p.add_argument("--batch-size", type=positive_int, help="images per batch (default: by image size: 256 at 32x32, "
                   "16 at 224x224)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--out", metavar="DIR", help="where eval.json and confusion.png go (default: the run directory)")
    p.add_argument("--json", action="store_true", help="print {top1, top5, per_class, n, ...} (fractions)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..plots import plot_confusion

    set_threads()
    device = pick_device(args.device)
    loaded = load(args.run_dir, f"{args.weights}.safetensors", device)
    dataset = args.dataset or loaded.meta.get("dataset", "fashion-mnist")
    data_dir = args.data_dir or loaded.meta.get("train_config", {}).get("data_dir")  # the run's own copy first
    _, test = load_dataset(dataset, data_dir, loaded.meta.get("image_size"))
    if test.images.shape[1] != loaded.model.in_channels or len(test.classes) != loaded.model.num_classes:
        raise DataError(f"{dataset} has {test.images.shape[1]} channel(s) and {len(test.classes)} classes; the model "
                        f"in {args.run_dir} expects {loaded.model.in_channels} and {loaded.model.num_classes}")
    result = evaluate(loaded.model, test, loaded.preprocess, device, pick_precision(device, args.precision),
                      args.batch_size, tta=args.tta, progress=not args.json)
    result.classes = loaded.classes or test.classes
    out = Path(args.out or args.run_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = dict(result.to_dict(), dataset=dataset, weights=args.weights, tta=args.tta)
    atomic_write_json(out / "eval.json", record)
    plot_confusion(result.confusion, result.classes, out / "confusion.png",
                   f"{loaded.meta['model']['name']} on {dataset}: top-1 {100 * result.top1:.2f}%")
    if args.json:
        print_json(record)
        return 0
    print(f"{dataset} test set, {result.n} images: top-1 {100 * result.top1:.2f}%, top-5 {100 * result.top5:.2f}%, "
          f"loss {result.loss:.4f}")
    rows = [[name, f"{100 * acc:.2f}%", str(sum(result.confusion[i]))] for i, (name, acc) in
            enumerate(zip(result.classes, result.per_class))]
    print(table(["class", "accuracy", "images"], rows, "lrr"))
    print(f"confusion matrix: {out / 'confusion.png'} and {out / 'eval.json'}")
    return 0
