""":func:`run`: the chosen sections in order under a CPU-load monitor, then the peak again and every share of it.

``--device cuda`` runs the GPU sections (:mod:`.gpu`) and the shared ``memory`` section in the same way, after the
GPU's context is created and what it is recorded in ``conditions``."""

from __future__ import annotations

import time
from typing import Any, Callable

from vggnet.base.cpuload import CpuMonitor
from vggnet.bench.ablation import bench_ablation, bench_profile
from vggnet.bench.conditions import machine_info, other_load, wait_for_quiet
from vggnet.bench.contention import bench_contention
from vggnet.bench.data import bench_data
from vggnet.bench.config import ALL_SECTIONS, SCHEMA, BenchConfig, device_targets, is_cuda
from vggnet.bench.e2e import bench_e2e
from vggnet.bench.gpu import bench_gpu_epoch, bench_gpu_infer, bench_gpu_step, start_gpu
from vggnet.bench.infer import bench_infer
from vggnet.bench.memory import bench_memory
from vggnet.bench.peak import apply_peak, bench_peak, keep_best
from vggnet.bench.render import summarize_targets
from vggnet.bench.runs import fashion_mnist
from vggnet.bench.train import bench_train
from vggnet.runtime import set_threads

RUNNERS: dict[str, Callable[[BenchConfig, dict[str, Any]], dict[str, Any]]] = {
    "peak": bench_peak, "train": bench_train, "infer": bench_infer, "e2e": bench_e2e, "data": bench_data,
    "memory": bench_memory,
    "contention": bench_contention,
    "ablation": bench_ablation, "profile": bench_profile,
    "gpu_epoch": bench_gpu_epoch, "gpu_step": bench_gpu_step, "gpu_infer": bench_gpu_infer,
}
assert tuple(RUNNERS) == ALL_SECTIONS


def run(cfg: BenchConfig) -> dict[str, Any]:
    """Run the chosen sections; returns one JSON-able dict (see docs/BENCHMARKS.md for the keys)."""
    cfg.validate()
    threads = set_threads(cfg.threads)
    load_before = wait_for_quiet(cfg.wait_idle, log=cfg.log) if cfg.wait_idle else other_load(cfg.pick(1.0, 0.2))
    results: dict[str, Any] = {"schema": SCHEMA, "quick": cfg.quick, "targets": device_targets(cfg.device),
                               "conditions": {**machine_info(threads), "other_load_cores_before": load_before}}
    if is_cuda(cfg.device):
        results["conditions"].update(start_gpu(cfg.device))
    loads: dict[str, float | None] = {}
    sections = list(cfg.sections)
    if "peak" not in sections and any(s in sections for s in ("train", "infer", "ablation")):
        sections.insert(0, "peak")  # every share of peak needs it
    try:
        for section in sections:
            cfg.log(f"{section} ...")
            start = time.perf_counter()
            with CpuMonitor() as mon:
                results[section] = RUNNERS[section](cfg, results)
            results[section]["section_seconds"] = time.perf_counter() - start
            loads[section] = mon.other_cores
            if mon.other_cores is not None and mon.other_cores > 0.2:
                cfg.log(f"warning: other processes used {mon.other_cores:.2f} cores during {section}; "
                        "its timings are not reliable")
    finally:
        fashion_mnist.cache_clear()  # the data set the sections' runs shared
    if "peak" in results and len(sections) > 1:
        # Measured again at the end, keeping the best: a peak taken during a moment of contention would flatter
        # every share of it.
        keep_best(results["peak"], bench_peak(cfg))
        apply_peak(results, results["peak"])  # the one place every share of peak is set
    results["conditions"]["other_load_cores"] = loads
    results["summary"] = summarize_targets(results)
    return results
