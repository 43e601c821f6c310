"""``vggnet compress SOURCE --out RUN``: a smaller run directory (SVD, int8 and/or float16 weights), measured against
the original.

The work is :func:`vggnet.use.compress.compress_run`; this module parses the options and prints the comparison: weights
file size, parameters, test accuracy and CPU latency (batch 1, fp32) of the original and the compressed model."""

from __future__ import annotations

import argparse

from vggnet.use.compress import compress_run, parse_ranks
from vggnet.net.report import human_bytes, table
from vggnet.runtime import resolve_runtime
from vggnet.base.limits import Range
from vggnet.cli.common import (SOURCE_HELP, add_source_options, batch_size_type, in_range, numbers_at_most, print_json,
                     rounds_type, threads_type, user_path)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compress", help="make a smaller copy of a model: low-rank (SVD), int8 and/or float16 weights")
    p.add_argument("source", metavar="SOURCE", help=SOURCE_HELP)
    p.add_argument("--out", required=True, metavar="RUN", help="the new run directory (must not exist, or be empty)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--svd", type=numbers_at_most(10**6, "ranks"), metavar="LAYER=RANK,...",
                     help="factorise FC layers at these ranks, e.g. fc6=1024,fc7=256 (classic/fitted heads: fc6, "
                     "fc7, fc8; gap head: fc)")
    how.add_argument("--svd-energy", type=in_range(Range(0, 1, open_low=True)), metavar="E",
                     help="factorise every FC layer at the smallest rank keeping the fraction E of sum(s^2), e.g. "
                     "0.95; layers whose factors would not be smaller stay whole")
    p.add_argument("--int8", action="store_true", help="int8 weights (per-output-channel scale) for every FC layer, "
                   "run by torch's fbgemm/x86 dynamic-int8 kernel on the CPU")
    p.add_argument("--half", action="store_true", help="store floating tensors as float16 (loaded as float32)")
    add_source_options(p)
    p.add_argument("--dataset", metavar="D", help="test set for the accuracies (run directories: default the run's "
                   "own; weights files: none unless given)")
    p.add_argument("--data-dir", type=user_path, metavar="DIR", help="where the dataset files are")
    p.add_argument("--no-eval", dest="evaluate", action="store_false", help="skip the accuracies")
    p.add_argument("--batch-size", type=batch_size_type, metavar="N", help="evaluation batch (default: by image size); "
                   "int8 layers quantise their input per batch, so it can move the int8 accuracy slightly")
    p.add_argument("--rounds", type=rounds_type, default=10, metavar="N", help="timed runs per model for the "
                   "latency (median; default 10)")
    p.add_argument("--threads", type=threads_type, metavar="N", help="intra-op threads for the latency and the "
                   "evaluation (default: one per core that other processes leave free, decided before the timing and "
                   "checked between rounds and batches; the SVD uses every core)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    ranks = parse_ranks(args.svd) if args.svd is not None else None
    resolve_runtime("cpu", "fp32")  # every core for the SVD; evaluation and latency follow the load unless --threads
    report = compress_run(args.source, args.out, ranks, args.svd_energy, args.int8, args.half,
                          weights=args.weights or "model", model=args.model, dataset=args.dataset,
                          data_dir=args.data_dir, evaluate=args.evaluate, rounds=args.rounds, threads=args.threads,
                          batch_size=args.batch_size, progress=not args.json)
    if args.json:
        print_json(report.to_dict())
        return 0
    print(f"compressed {args.source} -> {report.out} ({report.record.describe()})")
    for layer in report.layers:
        print(f"  {layer.describe()}")
    original, compressed = report.original, report.compressed
    rows = []
    for row in (original, compressed):
        accuracy = f"{100 * row.top1:.2f}%" if row.top1 is not None else report.accuracy_note.split(":")[0]
        rows.append([row.name, f"{row.file_bytes:,} ({human_bytes(row.file_bytes)})", f"{row.params:,}", accuracy,
                     f"{1000 * row.latency_s:.2f} ms"])
    rows.append(["ratio", f"{compressed.file_bytes / original.file_bytes:.3f}x",
                 f"{compressed.params / original.params:.3f}x",
                 f"{100 * (compressed.top1 - original.top1):+.2f} points" if compressed.top1 is not None else "",
                 f"{compressed.latency_s / original.latency_s:.3f}x"])
    print(table(["model", "weights file (bytes)", "parameters", "test top-1", "CPU latency"], rows, "lrrrr"))
    where = (f"{report.dataset} test set, {report.test_images:,} images" if report.dataset is not None
             else report.accuracy_note)
    print(f"accuracy: {where}; latency: batch 1, fp32, median of {report.rounds} runs, {report.threads} thread(s)")
    return 0
