"""The ``memory`` section: the analysis' training-memory estimate against the measured peak of a fp32 eager
training step, for 3 architectures x 2 batch sizes, each in a fresh subprocess (``python -m vggnet.bench
--memory-child``, see ``__main__``): tensor memory from ``torch.profiler``'s memory timeline, and the process's
peak RSS growth.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .config import TARGETS, BenchConfig

MEMORY_CASES = (("vgg11_bn", 32, "gap"), ("vgg16_bn", 64, "fitted"), ("vgg19", 32, "classic"))
MEMORY_BATCHES = (32, 128)


def status_bytes(key: str) -> int:
    """A ``kB`` field of /proc/self/status (``VmRSS``, ``VmHWM``), in bytes."""
    text = Path("/proc/self/status").read_text(encoding="ascii")
    return int(re.search(rf"^{key}:\s+(\d+) kB", text, re.M).group(1)) * 1024


def memory_child(name: str, size: int, head: str, batch: int, threads: int) -> dict[str, Any]:
    """Measure one fp32 eager NCHW SGD training step; runs in a fresh process (see :func:`bench_memory`).

    - ``tensor_peak_bytes``: the peak of live tensor memory over one step (weights, gradients, momentum, input,
      activations, temporaries), from ``torch.profiler``'s memory timeline.
    - ``rss_peak_bytes``: the peak RSS growth over two steps, against the RSS after a warm-up step of the same
      shapes was run and freed (so library code pages and oneDNN's caches are not counted).
    """
    import ctypes
    import gc

    from ..models import create_model

    torch.set_num_threads(threads)

    def build():
        torch.manual_seed(0)
        model = create_model(name, num_classes=10, input_size=size, head=head)
        x = torch.randn(batch, 3, size, size)
        y = torch.randint(0, 10, (batch,))
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step() -> None:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return model, opt, step

    model, opt, step = build()
    step()  # warm-up: page in kernels, build oneDNN primitives
    del model, opt, step
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    base = status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")  # reset VmHWM to the current RSS
    model, opt, step = build()
    step()
    step()
    rss_peak = status_bytes("VmHWM") - base

    tensor_peak = None
    try:
        from torch.profiler import profile
        from torch.profiler._memory_profiler import MemoryProfileTimeline

        with profile(profile_memory=True, record_shapes=True, with_stack=True) as prof:
            step()
        _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline("cpu")
        tensor_peak = int(max(sum(s) for s in sizes))
    except Exception as err:  # noqa: BLE001 - a private API of torch; report RSS only when it changes
        print(f"tensor timeline unavailable: {err}", file=sys.stderr)
    return {"rss_peak_bytes": rss_peak, "tensor_peak_bytes": tensor_peak}


def bench_memory(cfg: BenchConfig, results: dict[str, Any]) -> dict[str, Any]:
    from ..analysis import summarize
    from ..models import create_model

    cases = cfg.pick(MEMORY_CASES, MEMORY_CASES[:1])
    batches = cfg.pick(MEMORY_BATCHES, (8,))
    threads = results["conditions"]["threads"]  # what run() set
    rows = []
    for name, size, head in cases:
        with torch.device("meta"):
            summary = summarize(create_model(name, num_classes=10, input_size=size, head=head))
        for batch in batches:
            cfg.log(f"memory: {name} {head} head, {size}x{size}, batch {batch}")
            estimate = summary.training_memory(batch, "sgd")
            args = json.dumps([name, size, head, batch, threads])
            proc = subprocess.run([sys.executable, "-m", "vggnet.bench", "--memory-child", args],
                                  capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise RuntimeError(f"memory measurement for {name} batch {batch} failed: {proc.stderr.strip()[-500:]}")
            measured = json.loads(proc.stdout.strip().splitlines()[-1])
            row = {"model": name, "head": head, "input_size": size, "batch": batch,
                   "estimate_bytes": estimate.total, "estimate": estimate.to_dict(), **measured}
            for key in ("tensor_peak_bytes", "rss_peak_bytes"):
                if measured.get(key):
                    row[key.replace("_peak_bytes", "_error")] = estimate.total / measured[key] - 1
            rows.append(row)
    return {"rows": rows, "precision": "fp32", "layout": "NCHW", "optimizer": "sgd (momentum)",
            "error_definition": "estimate / measured - 1", "target_abs_error": TARGETS["memory_error"]}
