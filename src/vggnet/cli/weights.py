"""``vggnet weights list|fetch|info``: the official torchvision VGG weights, their download, and what a file holds."""

from __future__ import annotations

import argparse
from pathlib import Path

from vggnet.net.report import table
from vggnet.store.weights.official import BASE_URL, OFFICIAL, default_dir, fetch
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
    i.add_argument("file", metavar="FILE", help="a torchvision .pth, timm .safetensors or Keras .h5 file")
    i.add_argument("--json", action="store_true")
    i.set_defaults(run=run_info)


def _home(path: Path) -> str:
    try:
        return "~/" + str(path.relative_to(Path.home()))
    except ValueError:
        return str(path)


def run_list(args: argparse.Namespace) -> int:
    directory = Path(args.dir) if args.dir else default_dir()
    records = [dict(entry.to_dict(), present=(directory / entry.file).is_file()) for entry in OFFICIAL.values()]
    if args.json:
        print_json({"dir": str(directory), "weights": records})
        return 0
    rows = [[r["model"], r["file"], f"{r['top1']:.3f}", f"{r['top5']:.3f}", f"{r['size_mib']:.1f}",
             "yes" if r["present"] else "-"] for r in records]
    print(table(["model", "file (name-SHA256 prefix)", "acc@1 %", "acc@5 %", "MiB", "in dir"], rows, "llrrrl"))
    print(f"ImageNet-1k validation, single 224 crop (torchvision's metadata); files at {BASE_URL}FILE; "
          f"dir: {directory}")
    return 0


def run_fetch(args: argparse.Namespace) -> int:
    path = fetch(args.name, args.to, args.url, progress=not args.no_progress)
    print(f"{path}: SHA-256 verified")
    return 0


def run_info(args: argparse.Namespace) -> int:
    from vggnet.store.weights import read_file

    wf = read_file(args.file)
    prep = wf.card.preprocessing()
    record = {"file": str(wf.path), "format": wf.format, "container": wf.container, "model": wf.arch.name,
              "architecture": wf.arch.describe(), "features_only": wf.features_only, "config": wf.config,
              "classes": len(wf.card.classes), "preprocess": prep.to_dict(),
              "official": wf.official.to_dict() if wf.official else None}
    if args.json:
        print_json(record)
        return 0
    config = wf.config
    head = "none (features only)" if wf.features_only else (f"{config['head']}, {config['num_classes']} outputs"
                                                             f"{' (ImageNet classes)' if wf.card.classes else ''}")
    print(f"{wf.path}: {wf.format} layout in a {wf.container} file")
    print(f"  model: {wf.arch.describe()}, {config['in_channels']} input channels, head {head}")
    print(f"  preprocessing: {prep.channel_order.upper()}, decode at {prep.decode_size} and centre-crop "
          f"{prep.image_size}, mean {[round(m, 5) for m in prep.mean]}, std {[round(s, 5) for s in prep.std]} "
          "(on the [0, 1] scale)")
    if wf.official:
        print(f"  official torchvision weights: ImageNet acc@1 {wf.official.top1:.3f}%, acc@5 {wf.official.top5:.3f}%")
    return 0
