"""``vggnet data fetch NAME``, ``vggnet data info NAME``: get a dataset, or say where it is and what it holds;
``vggnet data prepare folder:PATH --to DIR`` and ``vggnet data verify DIR``: write an image folder as a prepared
(sharded) data set, and check one against its manifest."""

from __future__ import annotations

import argparse
import os
import sys

from vggnet.data import DATASETS, fetch, load_dataset
from vggnet.data.folder import DEFAULT_TEST_FRACTION
from vggnet.data.shards import (DEFAULT_MAX_SIDE, DEFAULT_SHARD_SAMPLES, MANIFEST, SHARD_SAMPLES, TEST_FRACTION,
                                prepare, verify)
from vggnet.base.limits import IMAGE_SIZE
from vggnet.cli.common import in_range, one_line, shown, user_path

#: Unreadable images printed one per line; beyond, a count and the manifest that lists them all.
SHOWN_BAD = 10


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
    pr = verbs.add_parser("prepare", help="write an image folder as a prepared data set: webdataset shards, an index "
                          "and a manifest with checksums (rerun to finish an interrupted prepare)")
    pr.add_argument("source", type=folder_spec, metavar="folder:PATH", help="one subfolder per class, or train/ and "
                    "test/ subfolders of class folders (ImageNet's layout)")
    pr.add_argument("--to", type=user_path, metavar="DIR", required=True, help="a new or empty folder (or one "
                    "holding an unfinished prepare of the same arguments)")
    pr.add_argument("--max-side", type=in_range(IMAGE_SIZE), default=DEFAULT_MAX_SIDE, metavar="N",
                    help=f"larger images are resized to this shorter side (default {DEFAULT_MAX_SIDE}); smaller ones "
                    "are kept as they are")
    pr.add_argument("--shard-size", type=in_range(SHARD_SAMPLES), default=DEFAULT_SHARD_SAMPLES, metavar="N",
                    help=f"images per shard (default {DEFAULT_SHARD_SAMPLES})")
    pr.add_argument("--test-fraction", type=in_range(TEST_FRACTION), default=DEFAULT_TEST_FRACTION, metavar="F",
                    help=f"share of each class held out for test without train/ and test/ (default "
                    f"{DEFAULT_TEST_FRACTION})")
    pr.add_argument("--no-progress", action="store_true", help="no progress bar")
    pr.set_defaults(run=run_prepare)
    v = verbs.add_parser("verify", help="check a prepared data set against its manifest")
    v.add_argument("dir", type=user_path, metavar="DIR", help="a folder written by vggnet data prepare")
    v.add_argument("--deep", action="store_true", help="also check every file's sha256 (reads everything)")
    v.set_defaults(run=run_verify)


def folder_spec(text: str) -> str:
    """``folder:PATH``: the path, ``~`` expanded."""
    if not text.lower().startswith("folder:") or not text[len("folder:"):]:
        raise argparse.ArgumentTypeError(f"must be folder:PATH (a folder of images, one subfolder per class), got "
                                         f"{shown(text)}")
    return user_path(text[len("folder:"):])


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


def _counts(manifest: dict) -> str:
    splits = manifest["splits"]
    return (f"{splits['train']['samples']} training and {splits['test']['samples']} test images of "
            f"{len(manifest['classes'])} classes")


def run_prepare(args: argparse.Namespace) -> int:
    manifest = prepare(args.source, args.to, max_side=args.max_side, shard_samples=args.shard_size,
                       test_fraction=args.test_fraction, progress=not args.no_progress)
    bad = manifest["bad"]
    for entry in bad[:SHOWN_BAD]:
        print(one_line(f"unreadable image, not prepared: {entry['file']}: {entry['reason']}"), file=sys.stderr)
    if len(bad) > SHOWN_BAD:
        print(f"... and {len(bad) - SHOWN_BAD} more unreadable images, all listed under \"bad\" in "
              f"{os.path.join(args.to, MANIFEST)}", file=sys.stderr)
    shards = [s for split in manifest["splits"].values() for s in split["shards"]]
    size = sum(s["bytes"] for s in shards)
    print(f"{args.to}: {_counts(manifest)} in {len(shards)} shards, {size} bytes ({size / 2**20:.1f} MiB); "
          f"{len(bad)} unreadable image(s){' listed in ' + MANIFEST if bad else ''}")
    return 0


def run_verify(args: argparse.Namespace) -> int:
    manifest = verify(args.dir, deep=args.deep)
    shards = sum(len(split["shards"]) for split in manifest["splits"].values())
    how = "sizes, indexes and sha256 checksums" if args.deep else "sizes and indexes (--deep: checksums too)"
    print(f"{args.dir}: {shards} shards match the manifest ({how}); {_counts(manifest)}")
    return 0
