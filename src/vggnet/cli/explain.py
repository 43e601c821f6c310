"""``vggnet explain SOURCE IMAGE... --out DIR``: Grad-CAM heat maps of image files, one PNG each and explain.json.

The images are decoded and preprocessed as ``vggnet predict`` does; the work is :func:`vggnet.use.explain.explain_files`.
"""

from __future__ import annotations

import argparse
import sys

from vggnet.base.errors import ConfigError
from vggnet.use.explain import check_out_dir, explain_files
from vggnet.runtime import resolve_runtime
from vggnet.cli.common import SOURCE_HELP, add_runtime_options, add_source_options, load_source, one_line, unit_interval


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("explain", help="Grad-CAM: where in each image the model found its evidence for a class",
                       description="Grad-CAM (Selvaraju et al. 2017): the gradient of the class score (the logit) "
                       "weights the channels of one layer's maps; their ReLU'd weighted sum, upsampled to the input "
                       "and scaled to [0, 1], is drawn over the image the model saw.")
    p.add_argument("source", metavar="SOURCE", help=SOURCE_HELP)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any format Pillow reads)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output folder (created): DIR/<stem>.png per image (-2, -3 ... when stems repeat) and "
                        "DIR/explain.json")
    p.add_argument("--layer", metavar="NAME",
                   help="layer whose maps are weighted, by name (conv4_2, relu4_2, pool4 ...; an unknown name lists "
                        "them). Default: the last relu, the last conv's rectified output: the most class-specific "
                        "maps that still have a spatial layout (the next pool halves it, the head discards it) and "
                        "without the negative responses the network itself cuts off. Earlier layers give finer, "
                        "less class-specific maps")
    p.add_argument("--class", dest="target", metavar="K",
                   help="class to explain, by index or name from the model's classes (default: each image's top-1)")
    p.add_argument("--alpha", type=unit_interval, default=0.5, metavar="A",
                   help="weight of the heat map in the blend, 0..1 (default 0.5)")
    add_source_options(p)
    add_runtime_options(p, precision="fp32", precision_help="fp32 (default; auto means fp32 here): gradients are "
                        "computed in float32")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.precision not in ("auto", "fp32"):
        raise ConfigError(f"vggnet explain computes in fp32 (gradients in {args.precision} are too coarse for "
                          "the maps), got --precision {args.precision}: leave --precision out")
    check_out_dir(args.out, args.images, create=False)  # a file in the way, or an input, fails before the model loads
    runtime = resolve_runtime(args.device, "fp32", threads=args.threads)
    loaded = load_source(args, runtime.device)
    result = explain_files(loaded, args.images, args.out, args.layer, args.target, args.alpha, runtime,
                           progress=args.progress, source=str(args.source))
    h, w = result.map_size or (0, 0)
    for e in result.images:
        if e.error is not None:
            continue
        what = f"{e.name} {100 * e.prob:.1f}%"
        if e.predicted["index"] != e.index:
            what += f" (predicted {e.predicted['class']} {100 * e.predicted['prob']:.1f}%)"
        where = (f"peak at row {e.peak[0]}, col {e.peak[1]}" if e.peak is not None
                 else "all-zero map: no positive evidence for this class at this layer")
        print(f"{e.file}: {what}, {result.layer} ({h}x{w}) {where} -> {e.png}")
    for e in result.failed:
        print(one_line(f"vggnet explain: error: {e.error}"), file=sys.stderr)
    explained = len(result.images) - len(result.failed)
    if explained:
        print(f"{explained} image(s) explained -> {result.json_path}")
    else:
        print(f"vggnet explain: error: none of the {len(result.failed)} image file(s) could be read: nothing written",
              file=sys.stderr)
    return 2 if result.failed else 0
