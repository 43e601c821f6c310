"""``vggnet data fetch NAME`` and ``vggnet data info NAME``: get a dataset, or say where it is and what it holds."""

from __future__ import annotations

import argparse

from vggnet.data import DATASETS, fetch, load_dataset
from vggnet.base.limits import IMAGE_SIZE
from vggnet.cli.common import in_range, user_path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="download (with checksums) or inspect datasets")
    verbs = p.add_subparsers(dest="data_verb", metavar="ACTION", required=True, parser_class=type(p))
    f = verbs.add_parser("fetch", help="download a dataset from its official address, verifying checksums")
    f.add_argument("name", choices=sorted(DATASETS))
    f.add_argument("--to", type=user_path, metavar="DIR", help="destination (default $VGGNET_DATA or ~/.cache/vggnet/data/NAME)")
    f.add_argument("--url", help="another location (directory URL for fashion-mnist, archive URL for CIFAR); "
                   "file:// works")
    f.set_defaults(run=run_fetch)
    i = verbs.add_parser("info", help="load a dataset and print its size and classes")
    i.add_argument("name", help="fashion-mnist, cifar10, cifar100 or folder:PATH")
    i.add_argument("--data-dir", type=user_path)
    i.add_argument("--image-size", type=in_range(IMAGE_SIZE), help="folder: decode size (default 64)")
    i.set_defaults(run=run_info)


def run_fetch(args: argparse.Namespace) -> int:
    where = fetch(args.name, args.to, args.url)
    print(f"{args.name}: verified files in {where}")
    return 0


def run_info(args: argparse.Namespace) -> int:
    train, test = load_dataset(args.name, args.data_dir, args.image_size)
    c, h, w = train.images.shape[1:]
    print(f"{args.name}: {len(train)} training and {len(test)} test images, {c}x{h}x{w} uint8, "
          f"{len(train.classes)} classes: {', '.join(train.classes)}")
    return 0
