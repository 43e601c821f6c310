"""The ``contention`` section (issues 13 and 22): ``vggnet train``'s training and ``vggnet eval``'s inference
throughput beside one other CPU-bound process.

Three one-epoch runs of the default recipe on the same Fashion-MNIST subset, in this process
(:func:`vggnet.training.fit`, as ``vggnet train --epochs 1 --subset N`` runs): on the quiet machine with the default
threads; beside a busy-looping process (``python -c "while True: pass"``, one core's worth of work, like a second
training or a browser tab) with ``--threads`` set to every core, what vggnet did before; and beside it with the
default threads, which follow the other processes' load (:class:`vggnet.runtime.AdaptiveThreads`). The busy
throughput with default threads as a share of the quiet one is the target (>= 50%).

The same three conditions for inference (issue 22): the default model's forward passes over Fashion-MNIST test
images as ``vggnet eval`` runs them (:func:`vggnet.evaluation.metrics.predict_logits`: fp32, channels_last, the
default batch), on a fresh :func:`vggnet.runtime.resolve_runtime` each (so default threads adapt between batches,
:attr:`vggnet.runtime.Runtime.adaptive`); same target.
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
from vggnet.evaluation.metrics import auto_batch_size, predict_logits
from vggnet.runtime import available_cores, resolve_runtime, set_threads

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


class EvalPasses:
    """``vggnet eval``'s forward passes of the default model (as ``vggnet train`` builds it, untrained: the speed
    does not depend on the weights) over the first ``images`` Fashion-MNIST test images; warmed up once."""

    def __init__(self, cfg: BenchConfig, images: int) -> None:
        before = torch.get_num_threads()
        try:
            with tempfile.TemporaryDirectory(prefix="vggnet-bench-") as tmp:
                run = make_run(cfg, Path(tmp) / "run", subset=16, batch_size=16, precision="fp32")  # not trained
        finally:
            set_threads(before)  # building a run sets its own thread count; the bench keeps its own
        self.model, self.preprocess = run.model, run.preprocess
        self.images = run.test_set.images[:images]
        self.batch_size = auto_batch_size(*self.images.shape[-2:])
        self.run(None, self.images[:self.batch_size])  # oneDNN builds its kernels on the first batch; not timed

    def run(self, threads: int | None, images: torch.Tensor | None = None) -> dict[str, Any]:
        """One timed pass with ``threads`` (None: the default, which adapts); the bench's thread count after."""
        images = self.images if images is None else images
        before = torch.get_num_threads()
        try:
            runtime = resolve_runtime("cpu", "fp32", threads=threads)  # the load's window opens here, as in the CLI
            start = time.perf_counter()
            predict_logits(self.model, images, self.preprocess, runtime.device, runtime.precision,
                           channels_last=runtime.channels_last, threads=runtime.adaptive)
            seconds = time.perf_counter() - start
            at_end = torch.get_num_threads()
        finally:
            set_threads(before)
        return {"images_per_second": len(images) / seconds, "seconds": seconds, "threads_given": threads,
                "adapts": runtime.adaptive is not None, "threads_at_end": at_end}


def bench_contention(cfg: BenchConfig, results: dict[str, Any]) -> dict[str, Any]:
    cores = available_cores()
    subset = cfg.e2e_subset if cfg.e2e_subset is not None else cfg.pick(20480, 512)
    overrides = {"batch_size": cfg.pick(256, 64)}
    cfg.log(f"contention: vggnet train --epochs 1 --subset {subset}, quiet machine")
    idle = epoch_throughput(cfg, subset, None, **overrides)
    passes = EvalPasses(cfg, cfg.pick(2048, 256))
    cfg.log(f"contention: eval-style forward passes over {len(passes.images)} test images, quiet machine")
    infer = {"idle": passes.run(None)}
    with busy_process():
        cfg.log(f"contention: beside one busy process, --threads {cores}")
        fixed = epoch_throughput(cfg, subset, cores, **overrides)
        cfg.log("contention: beside one busy process, default threads")
        adaptive = epoch_throughput(cfg, subset, None, **overrides)
        cfg.log(f"contention: inference beside one busy process, --threads {cores}, then default threads")
        infer.update(busy_all_cores=passes.run(cores), busy_default=passes.run(None))
    rate, infer_rate = idle["train_images_per_second"], infer["idle"]["images_per_second"]
    infer.update(images=len(passes.images), batch_size=passes.batch_size, precision="fp32",
                 share_default=infer["busy_default"]["images_per_second"] / infer_rate,
                 share_all_cores=infer["busy_all_cores"]["images_per_second"] / infer_rate)
    return {"idle": idle, "busy_all_cores": fixed, "busy_default": adaptive, "cores": cores, "subset": subset,
            "batch_size": overrides["batch_size"], "competitor": f"{Path(sys.executable).name} -c {BUSY_LOOP!r}",
            "share_default": adaptive["train_images_per_second"] / rate,
            "share_all_cores": fixed["train_images_per_second"] / rate,
            "share_definition": "busy images/s / quiet images/s (default threads on the quiet machine)",
            "target_share": TARGETS["contention_share"], "infer": infer}
