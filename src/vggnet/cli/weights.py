"""``vggnet weights list|fetch|info``: the official torchvision VGG weights, their download, and what a file holds."""

from __future__ import annotations

import argparse
from pathlib import Path

from vggnet.net.report import table
from vggnet.store.weights.info import describe, info_lines
from vggnet.store.weights.official import BASE_URL, OFFICIAL, default_dir, fetch, listing
from vggnet.cli.common import print_json, user_path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("weights", help="list, download (SHA-256 checked) or inspect pretrained weights files")
    verbs = p.add_subparsers(dest="weights_verb", metavar="ACTION", required=True, parser_class=type(p))
    where = f"default $VGGNET_WEIGHTS or {_home(default_dir())}"
    ls = verbs.add_parser("list", help="the eight official torchvision VGG weights, and which are in --dir")
    ls.add_argument("--dir", type=user_path, metavar="DIR", help=f"where to look for the files ({where})")
    ls.add_argument("--json", action="store_true", help="print the table as JSON (with URLs)")
    ls.set_defaults(run=run_list)
    f = verbs.add_parser("fetch", help="download official weights, verifying the SHA-256 prefix in their name")
    f.add_argument("name", metavar="NAME", help=f"model or file name: {', '.join(OFFICIAL)}, or e.g. "
                   "vgg16-397923af.pth")
    f.add_argument("--to", type=user_path, metavar="DIR", help=f"destination directory ({where})")
    f.add_argument("--url", help="another address of the same file (a mirror; file:// works)")
    f.add_argument("--no-progress", action="store_true", help="no progress bar")
    f.set_defaults(run=run_fetch)
    i = verbs.add_parser("info", help="what a weights file holds: format, architecture, classes, preprocessing")
    i.add_argument("file", metavar="FILE", help="a torchvision .pth, timm .safetensors, Keras .h5 or vggnet "
                   "model.safetensors file")
    i.add_argument("--json", action="store_true")
    i.set_defaults(run=run_info)


def _home(path: Path) -> str:
    try:
        return "~/" + str(path.relative_to(Path.home()))
    except ValueError:
        return str(path)


def run_list(args: argparse.Namespace) -> int:
    directory = Path(args.dir) if args.dir else default_dir()
    records = listing(directory)
    if args.json:
        print_json({"dir": str(directory), "weights": records})
        return 0
    shown = {"ok": "yes", "missing": "-"}
    rows = [[r["model"], r["file"], f"{r['top1']:.3f}", f"{r['top5']:.3f}", f"{r['size_mib']:.1f}",
             shown.get(r["status"], r["status"])] for r in records]
    print(table(["model", "file (name-SHA256 prefix)", "acc@1 %", "acc@5 %", "MiB", "in dir"], rows, "llrrrl"))
    print(f"ImageNet-1k validation, single 224 crop (torchvision's metadata); files at {BASE_URL}FILE; "
          f"dir: {directory}")
    for r in records:
        if r["reason"]:
            print(r["reason"])
    return 0


def run_fetch(args: argparse.Namespace) -> int:
    path = fetch(args.name, args.to, args.url, progress=not args.no_progress)
    print(f"{path}: SHA-256 verified")
    return 0


def run_info(args: argparse.Namespace) -> int:
    record = describe(args.file)
    if args.json:
        print_json(record)
    else:
        print("\n".join(info_lines(record)))
    return 0
