"""The paper's Tables 3-5 on Fashion-MNIST: single-scale, multi-scale, dense vs multi-crop vs combined.

Usage: python scripts/paper_tables.py NAME=RUN_DIR:Q1,Q2,... [NAME=RUN_DIR:Q...] [--crops 5x5] [--out FILE.md]

Every number comes from :func:`vggnet.evaluation.multiscale.multiscale_log_probs` (what ``vggnet eval --scales`` runs; equal
by test), one call per run, scale and protocol (dense + flip; R x C crops + flip). Protocols mix linearly in
probability (the mean over scales of the mean over dense and crops), so the multi-scale and combined rows are means
of these per-scale probabilities; each row also gives the ``vggnet eval`` command that prints the same top-1.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from vggnet.evaluation.testset import load_test_set
from vggnet.evaluation.multiscale import Protocol, multiscale_log_probs
from vggnet.store.rundir import load


def top1(probs: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * (probs.argmax(1) == labels).double().mean().item()


def per_scale(loaded, test, scales, crops):
    """{(q, "dense"|"crops"): probabilities (N, K)} and the seconds each took."""
    out, seconds = {}, {}
    for q in scales:
        for kind, protocol in (("dense", Protocol((q,), dense=True, flip=True)),
                               ("crops", Protocol((q,), crops=crops, flip=True))):
            start = time.perf_counter()
            log_p = multiscale_log_probs(loaded.model, test.images, loaded.preprocess, protocol, "cpu")
            seconds[q, kind] = time.perf_counter() - start
            out[q, kind] = log_p.exp().double()
            print(f"  Q={q} {kind}: top-1 {top1(out[q, kind], test.labels):.2f}% ({seconds[q, kind]:.0f} s)",
                  flush=True)
    return out, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="NAME=RUN_DIR:Q1,Q2,...")
    parser.add_argument("--crops", default="5x5")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    crops = tuple(int(v) for v in args.crops.split("x"))
    lines = ["| training | test scales Q | dense + flip | multi-crop " + args.crops + " + flip | combined |",
             "|---|---|---|---|---|"]
    commands = []
    for spec in args.runs:
        name, rest = spec.split("=", 1)
        run_dir, qs = rest.rsplit(":", 1)
        scales = [int(q) for q in qs.split(",")]
        loaded = load(run_dir)
        test = load_test_set(loaded, loaded.card.dataset)
        labels = test.labels.to(torch.int64)
        print(f"{name}: {run_dir}, scales {scales}", flush=True)
        probs, seconds = per_scale(loaded, test, scales, crops)
        rows = [[q] for q in scales] + [scales]
        for group in rows:
            dense = sum(probs[q, "dense"] for q in group) / len(group)
            crop = sum(probs[q, "crops"] for q in group) / len(group)
            both = (dense + crop) / 2
            label = ",".join(map(str, group))
            lines.append(f"| {name} | {label} | {top1(dense, labels):.2f}% | {top1(crop, labels):.2f}% | "
                         f"{top1(both, labels):.2f}% |")
            commands.append(f"vggnet eval {run_dir} --scales {label} --dense --crops {args.crops} --flip  "
                            f"# {name}, combined")
        total = sum(seconds.values())
        lines.append(f"| {name} | (eval time, all rows) | {math.fsum(v for k, v in seconds.items() if k[1] == 'dense'):.0f}"
                     f" s | {math.fsum(v for k, v in seconds.items() if k[1] == 'crops'):.0f} s | {total:.0f} s |")
    text = "\n".join(lines) + "\n\nCommands (one per row, combined protocol):\n\n" + "\n".join(commands) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
