"""``vggnet export SOURCE --format onnx|torchscript|exported --out FILE``: a file other runtimes load, checked.

The work is :func:`vggnet.use.export.export_checked`: export the eager fp32 model, load the file back in its own runtime,
compare it with the eager model on real images (the run's test set, or ``--check-images``; random pixels only when
there are none, and the output says so), and write the file and ``FILE.json`` (input spec, classes, preprocessing,
check results) only when the check passes."""

from __future__ import annotations

import argparse

from vggnet.evaluation.metrics import auto_batch_size
from vggnet.use.export import (DEFAULT_TOLERANCE, EXTENSIONS, FORMATS, check_images_of, check_out, export_checked,
                               human_size, require_onnx)
from vggnet.base.limits import Range
from vggnet.cli.common import SOURCE_HELP, add_source_options, batch_size_type, in_range, load_source


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a trained model to ONNX, TorchScript or torch.export, checked against "
                       "the eager model")
    p.add_argument("source", metavar="SOURCE", help=SOURCE_HELP)
    p.add_argument("--format", required=True, choices=FORMATS, dest="fmt",
                   help="onnx (needs the onnx extra: pip install -e '.[onnx]' in a clone), torchscript (torch.jit.trace) or exported "
                        "(torch.export, a .pt2 file)")
    p.add_argument("--out", required=True, metavar="FILE",
                   help="the file to write (usually " + ", ".join(f"{e} for {f}" for f, e in EXTENSIONS.items())
                   + "); its JSON card goes to FILE.json")
    p.add_argument("--dynamic-batch", action="store_true", help="any batch size (default: batch 1)")
    p.add_argument("--any-size", action="store_true",
                   help="export the fully convolutional form (vggnet.to_dense), taking any height and width at least "
                        "the training size (gap heads: at least 2**pools); default: the training size only")
    p.add_argument("--tolerance", type=in_range(Range(0, 1, open_low=True)), default=DEFAULT_TOLERANCE,
                   metavar="T",
                   help="the check passes when max |file - eager| / max |eager logit| <= T (default "
                        f"{DEFAULT_TOLERANCE:g}, fp32 against fp32) and every top-1 class agrees, except images whose "
                        "eager top-2 margin is below the max abs error; otherwise nothing is written (exit 2)")
    p.add_argument("--check-images", nargs="+", metavar="IMAGE",
                   help="image files to check on, decoded as vggnet predict decodes them (default: the first "
                        "--check-count images of a run's test set; random images when there is none)")
    p.add_argument("--check-count", type=batch_size_type, metavar="N",
                   help="test images to check on (default by input size, as eval's batch: 256 at 32x32, 16 at "
                        "224x224, so that a batch-1 export of VGG-16 checks in seconds, not minutes)")
    add_source_options(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    check_out(args.out, [args.source, *(args.check_images or [])])  # a bad --out or no ONNX fails before any work
    if args.fmt == "onnx":
        require_onnx()
    loaded = load_source(args, "cpu")
    size = loaded.preprocess.image_size
    images, note, random = check_images_of(loaded, args.source, args.check_images,
                                           args.check_count or auto_batch_size(size, size))
    result = export_checked(loaded, args.fmt, args.out, images=images, images_note=note, random=random,
                            dynamic_batch=args.dynamic_batch, any_size=args.any_size, tolerance=args.tolerance,
                            source=args.source)
    spec, check = result.spec, result.check
    shape = "(" + ", ".join(str(d) for d in spec.shape()) + ")"
    opset = f", opset {result.card['opset']}" if "opset" in result.card else ""
    print(f"exported {result.path} ({args.fmt}{opset}, input {shape} float32 NCHW, {human_size(result.size_bytes)}) "
          f"in {result.export_seconds:.1f} s")
    if check.random:
        print(f"warning: checked on {note}; the errors below are on noise, not on real images")
    else:
        print(f"checked on {note}")
    for s in check.sizes:
        batches = " and ".join(str(b) for b in s.batch_sizes)
        print(f"  {s.size[0]}x{s.size[1]}, batch {batches}: max abs error {s.max_abs_error:.3g}, relative "
              f"{s.rel_error:.3g} (tolerance {check.tolerance:g}), top-1 agreement {100 * s.top1_agreement:.2f}% "
              f"({s.top1_agree}/{s.images})")
    print(f"card: {result.card_path}")
    return 0
