"""The ``contention`` section (issue 13): ``vggnet train``'s training throughput beside one other CPU-bound process.

Three one-epoch runs of the default recipe on the same Fashion-MNIST subset, in this process
(:func:`vggnet.training.fit`, as ``vggnet train --epochs 1 --subset N`` runs): on the quiet machine with the default
threads; beside a busy-looping process (``python -c "while True: pass"``, one core's worth of work, like a second
training or a browser tab) with ``--threads`` set to every core, what vggnet did before; and beside it with the
default threads, which follow the other processes' load (:class:`vggnet.runtime.AdaptiveThreads`). The busy
throughput with default threads as a share of the quiet one is the target (>= 50%).
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from vggnet.bench.config import TARGETS, BenchConfig
from vggnet.bench.runs import fit_quietly, make_run
from vggnet.runtime import available_cores, set_threads

#: The competitor: one process that keeps one core busy until it is killed.
BUSY_LOOP = "while True: pass"


@contextlib.contextmanager
def busy_process() -> Iterator[subprocess.Popen]:
    """One CPU-bound process beside the block (started, given a moment to be scheduled, killed after)."""
    proc = subprocess.Popen([sys.executable, "-c", BUSY_LOOP])
    try:
        time.sleep(0.5)
        yield proc
    finally:
        proc.kill()
        proc.wait()


def epoch_throughput(cfg: BenchConfig, subset: int, threads: int | None, **overrides: Any) -> dict[str, Any]:
    """One epoch of ``vggnet train`` on ``subset`` images with ``threads`` (None: the default, which adapts)."""
    before = torch.get_num_threads()  # what the bench set (run() sets cfg.threads, or every core)
    try:
        with tempfile.TemporaryDirectory(prefix="vggnet-bench-") as tmp:
            run = make_run(cfg, Path(tmp) / "run", subset=subset, threads=threads, **overrides)
            adapts = run.threads is not None
            record = fit_quietly(run)["history"][-1]
    finally:
        set_threads(before)  # an adapting run leaves its last count behind; the next section gets the bench's own
    return {"train_images_per_second": record["train_images_per_second"], "train_seconds": record["epoch_seconds"],
            "threads_given": threads, "adapts": adapts, "threads_at_end": record["threads"]}


def bench_contention(cfg: BenchConfig, results: dict[str, Any]) -> dict[str, Any]:
    cores = available_cores()
    subset = cfg.e2e_subset if cfg.e2e_subset is not None else cfg.pick(20480, 512)
    overrides = {"batch_size": cfg.pick(256, 64)}
    cfg.log(f"contention: vggnet train --epochs 1 --subset {subset}, quiet machine")
    idle = epoch_throughput(cfg, subset, None, **overrides)
    with busy_process():
        cfg.log(f"contention: beside one busy process, --threads {cores}")
        fixed = epoch_throughput(cfg, subset, cores, **overrides)
        cfg.log("contention: beside one busy process, default threads")
        adaptive = epoch_throughput(cfg, subset, None, **overrides)
    rate = idle["train_images_per_second"]
    return {"idle": idle, "busy_all_cores": fixed, "busy_default": adaptive, "cores": cores, "subset": subset,
            "batch_size": overrides["batch_size"], "competitor": f"{Path(sys.executable).name} -c {BUSY_LOOP!r}",
            "share_default": adaptive["train_images_per_second"] / rate,
            "share_all_cores": fixed["train_images_per_second"] / rate,
            "share_definition": "busy images/s / quiet images/s (default threads on the quiet machine)",
            "target_share": TARGETS["contention_share"]}
