"""``vggnet features SOURCE IMAGE... --layer NAME --out FILE``: named layers' maps of image files, saved to a file.

The images are decoded and preprocessed as ``vggnet predict`` does; the work is :func:`vggnet.use.features.extract_features`
and :func:`vggnet.use.features.save_features`.
"""

from __future__ import annotations

import argparse
import sys

from vggnet.use.features import FORMATS, POOLS, check_output, extract_features, save_features
from vggnet.runtime import resolve_runtime
from vggnet.cli.common import SOURCE_HELP, add_runtime_options, add_source_options, batch_size_type, load_source, one_line


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("features", help="save the feature maps of named layers for image files")
    p.add_argument("source", metavar="SOURCE", help=SOURCE_HELP)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any format Pillow reads)")
    p.add_argument("--layer", action="append", required=True, dest="layers", metavar="NAME",
                   help="layer name (relu4_2, conv4_1, pool3 ...; repeat for several); an unknown name lists them")
    p.add_argument("--pool", choices=POOLS, default="none",
                   help="none (default): each map (N, C, H, W); avg or max over space: (N, C)")
    p.add_argument("--out", required=True, metavar="FILE",
                   help=f"output, by extension: {' or '.join(FORMATS)} (one layer in .npy, with FILE.json beside it; "
                        "one tensor per layer in .safetensors, metadata in its header)")
    p.add_argument("--batch-size", type=batch_size_type, metavar="N",
                   help="images per batch (default: by image size, 256 at 32x32, 16 at 224x224)")
    add_source_options(p)
    add_runtime_options(p, precision_help="auto (default): bf16 where the hardware runs it natively, else fp32; the "
                        "maps are float32")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    check_output(args.out, len(dict.fromkeys(args.layers)), args.images)  # a bad --out fails before any work
    runtime = resolve_runtime(args.device, args.precision, threads=args.threads)
    loaded = load_source(args, runtime.device, need_head=False)  # features need no classifier
    result = extract_features(loaded, args.images, args.layers, args.pool, runtime, args.batch_size,
                              progress=args.progress)
    result.source = args.source
    for _, message in result.failed:
        print(one_line(f"vggnet features: error: {message}"), file=sys.stderr)
    if result.maps:
        written = save_features(args.out, result)
        shapes = ", ".join(f"{name} {tuple(result.maps[name].shape)}" for name in result.layers)
        print(f"{len(result.files)} image(s), pool {result.pool}: {shapes} -> {', '.join(map(str, written))}")
    else:
        print(f"vggnet features: error: none of the {len(result.failed)} image file(s) could be read: nothing written",
              file=sys.stderr)
    return 2 if result.failed else 0
