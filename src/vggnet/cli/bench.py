"""``vggnet bench``: vggnet against the plain PyTorch a user would otherwise write, in one process (issue #4)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vggnet.bench import BenchConfig, render, run
from vggnet.bench.config import ALL_SECTIONS, GPU_SECTIONS, SECTIONS
from vggnet.base.files import atomic_write_json, make_dirs
from vggnet.base.guard import json_of, output_file
from vggnet.base.limits import IMAGES, Range
from vggnet.cli.common import device_name, in_range, print_json, rounds_type, threads_type, user_path


def sections(text: str) -> tuple[str, ...]:
    """Known section names; whether they fit ``--device`` is :meth:`BenchConfig.validate`'s (one line, exit 2)."""
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [s for s in names if s not in ALL_SECTIONS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"unknown section(s) {', '.join(unknown) or text!r}: choose from "
                                         f"{', '.join(ALL_SECTIONS)}")
    return names


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmark training, inference and a whole epoch against plain PyTorch",
                       description="Measures, in one process: peak conv FLOP/s (fp32, bf16), a training step, "
                                   "inference, one Fashion-MNIST epoch end to end, and the training-memory "
                                   "estimate against measured memory. With --device cuda, on that GPU: the epoch "
                                   "against the typical GPU pipeline, the VGG-16-BN 224x224 training step, the "
                                   "module's own cost at 32x32, inference, and the memory estimate. See "
                                   "docs/BENCHMARKS.md.")
    p.add_argument("--only", type=sections, metavar="LIST",
                   help=f"comma-separated sections: on the CPU from {','.join(SECTIONS)}, on CUDA from "
                        f"{','.join(GPU_SECTIONS)} (default: all of the device's)")
    p.add_argument("--device", type=device_name, default="cpu", metavar="DEVICE",
                   help="cpu (default): the CPU sections; cuda or cuda:N: the GPU sections (issue #12), vggnet "
                        "against the typical GPU pipeline on that GPU")
    p.add_argument("--quick", action="store_true", help="a small smoke version of every section (seconds)")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object instead of tables")
    p.add_argument("--out", metavar="FILE", help="also write the JSON results to FILE")
    p.add_argument("--data-dir", type=user_path,
                   help="where Fashion-MNIST is (searched alone; default: $VGGNET_DATA, then the usual places)")
    p.add_argument("--threads", type=threads_type, help="intra-op threads (default: every available core)")
    p.add_argument("--rounds", type=rounds_type, help="timed rounds per measurement (default 10, quick 2)")
    p.add_argument("--subset", type=in_range(IMAGES), metavar="N",
                   help="end to end (e2e, gpu_epoch): train on the first N images (default all 60000; quick 1024)")
    p.add_argument("--wait-idle", type=in_range(Range(0, 86400)), default=0.0, metavar="SECONDS",
                   help="first wait up to SECONDS for other processes to stop using the CPU (default 0: no wait)")
    p.set_defaults(run=run_bench)


def bench_results(path: Path) -> bool:
    """Whether ``path`` holds what an earlier ``vggnet bench --out`` wrote (so it may be replaced)."""
    results = json_of(path)
    return isinstance(results, dict) and {"schema", "quick", "targets", "conditions"} <= set(results)


def run_bench(args: argparse.Namespace) -> int:
    cfg = BenchConfig(sections=args.only, quick=args.quick, data_dir=args.data_dir, threads=args.threads,
                      rounds=args.rounds, e2e_subset=args.subset, wait_idle=args.wait_idle, device=args.device,
                      progress=lambda message: print(f"vggnet bench: {message}", file=sys.stderr, flush=True))
    if args.out:  # found unwritable now, not after the whole benchmark
        make_dirs(Path(args.out).parent)
        output_file(args.out, owned=bench_results, example="bench.json", writer="vggnet bench")
    results = run(cfg)
    if args.out:
        atomic_write_json(args.out, results)
    if args.json:
        print_json(results)
    else:
        print(render(results))
    return 0
