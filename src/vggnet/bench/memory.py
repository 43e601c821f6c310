"""The ``memory`` section: the analysis' training-memory estimate against the measured peak of eager SGD training
steps, each case in a fresh subprocess (``python -m vggnet.bench --memory-child``, see ``__main__``).

- On the CPU (``cfg.device == "cpu"``): 3 architectures x 2 batch sizes in fp32. The peak of PyTorch's CPU
  allocator over a fresh model's first two steps, from ``torch.profiler``'s allocation trace, with and without
  the scratch buffers oneDNN allocates and frees inside one convolution call; and the process's peak RSS growth,
  with glibc returning freed blocks to the OS (:data:`GLIBC_RETURNS_MEMORY`: the resident memory of what is
  allocated, which the estimate predicts) and, in a second process, under glibc's defaults. The difference, glibc's
  retained heap, depends on the order of allocations, not only on the shapes, and is reported, not estimated.
- On CUDA: the cases of issue #12 (224x224 VGG-16/11-BN/19, 32x32 VGG-16-BN at batch 256), in fp32 and in bf16
  autocast; ``torch.cuda.max_memory_allocated`` over a fresh model's first two steps.
"""

from __future__ import annotations

import bisect
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from vggnet.bench.config import TARGETS, BenchConfig, is_cuda
from vggnet.net.analysis import summarize
from vggnet.net.memory import training_memory
from vggnet.net.models import create_model

MEMORY_CASES = (("vgg11_bn", 32, "gap"), ("vgg16_bn", 64, "fitted"), ("vgg19", 32, "classic"))
MEMORY_BATCHES = (32, 128)
# Issue #12's CUDA cases: (model, input size, head, batch); each in fp32 and bf16.
CUDA_MEMORY_CASES = (("vgg16", 224, "classic", 16), ("vgg16", 224, "classic", 32), ("vgg11_bn", 224, "classic", 32),
                     ("vgg19", 224, "classic", 16), ("vgg16_bn", 32, "classic", 256))
CUDA_PRECISIONS = ("fp32", "bf16")
# glibc's malloc serves a block below its mmap threshold from its heap and keeps the pages when it is freed; the
# threshold starts at 128 KiB and rises to each freed mmapped block's size (up to 32 MiB), so after one training
# step most activations come from the heap, and RSS keeps what fragmentation strands there. Fixing both thresholds
# at 128 KiB (environment variables, read when the process starts) maps every block of 128 KiB or more on its own
# and unmaps it when it is freed: the RSS growth is then the allocator's peak (measured: within 0.5 MiB).
GLIBC_RETURNS_MEMORY = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def status_bytes(key: str) -> int:
    """A ``kB`` field of /proc/self/status (``VmRSS``, ``VmHWM``), in bytes."""
    text = Path("/proc/self/status").read_text(encoding="ascii")
    return int(re.search(rf"^{key}:\s+(\d+) kB", text, re.M).group(1)) * 1024


def _builder(name: str, size: int, head: str, batch: int, device: str, precision: str):
    """A function that builds a fresh model, batch and SGD-with-momentum optimizer and returns them with ``step``,
    one training step as ``vggnet train`` runs it (autocast around the forward only; the loss in fp32;
    ``zero_grad(set_to_none=True)`` between forward and backward)."""
    def build():
        torch.manual_seed(0)
        model = create_model(name, num_classes=10, input_size=size, head=head).to(device)
        x = torch.randn(batch, 3, size, size, device=device)
        y = torch.randint(0, 10, (batch,), device=device)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step() -> None:
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return model, opt, step

    return build


def _free() -> None:
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _allocator_peaks(trace: dict[str, Any]) -> tuple[int, int]:
    """Peak live bytes of the CPU allocator in a chrome trace of ``profile(profile_memory=True)``: all blocks, and
    all blocks but those allocated and freed inside one convolution call (oneDNN's scratch buffers)."""
    events = trace["traceEvents"]
    memory = sorted((e["ts"], e["args"]["Bytes"], e["args"]["Addr"]) for e in events
                    if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0)
    convs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("ph") == "X"
                   and e.get("name") in ("aten::convolution", "aten::convolution_backward"))
    starts = [start for start, _ in convs]

    def conv_of(t: float) -> int | None:  # the convolution call running at time t (they do not overlap)
        i = bisect.bisect_right(starts, t) - 1
        return i if i >= 0 and t <= convs[i][1] else None

    born: dict[int, int] = {}
    scratch: set[int] = set()
    for i, (t, nbytes, addr) in enumerate(memory):
        if nbytes > 0:
            born[addr] = i
        elif addr in born:
            j = born.pop(addr)
            conv = conv_of(memory[j][0])
            if conv is not None and conv == conv_of(t):
                scratch.update((i, j))
    live = peak = live_tensors = peak_tensors = 0
    for i, (_, nbytes, _) in enumerate(memory):
        live += nbytes
        peak = max(peak, live)
        if i not in scratch:
            live_tensors += nbytes
            peak_tensors = max(peak_tensors, live_tensors)
    return peak, peak_tensors


def _cpu_child(build, trace: bool = True) -> dict[str, Any]:
    """- ``rss_peak_bytes``: the peak RSS growth over two steps, against the RSS after a warm-up step of the same
      shapes was run and freed (so library code pages, oneDNN's primitives and the threads are not counted);
    - unless ``trace`` is false: ``alloc_peak_bytes``: the peak of PyTorch's CPU allocator (every tensor and
      kernel buffer) over a fresh model's first two steps (the second is the steady state: last step's gradients
      and the momentum exist), from the allocation trace of ``torch.profiler`` started before the model was built;
      ``tensor_peak_bytes``: the same without the scratch buffers allocated and freed inside one convolution call."""
    model, opt, step = build()
    step()  # warm-up: page in kernels, build oneDNN primitives
    del model, opt, step
    _free()
    base = status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")  # reset VmHWM to the current RSS
    model, opt, step = build()
    step()
    step()
    rss_peak = status_bytes("VmHWM") - base
    del model, opt, step
    _free()
    if not trace:
        return {"rss_peak_bytes": rss_peak}
    return {**_traced_peaks(build), "rss_peak_bytes": rss_peak}


def _traced_peaks(build) -> dict[str, int]:
    """``tensor_peak_bytes`` and ``alloc_peak_bytes`` of a fresh model's first two steps (see :func:`_cpu_child`)."""
    from torch.profiler import profile

    with profile(profile_memory=True) as prof:
        model, opt, step = build()
        step()
        step()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path, encoding="utf-8") as f:
            alloc_peak, tensor_peak = _allocator_peaks(json.load(f))
    return {"tensor_peak_bytes": tensor_peak, "alloc_peak_bytes": alloc_peak}


def _cuda_child(build, device: str) -> dict[str, Any]:
    """- ``tensor_peak_bytes``: ``torch.cuda.max_memory_allocated`` over a fresh model's first two steps (every
      block of PyTorch's caching allocator: tensors and the cuDNN/cuBLAS workspaces it hands out);
    - ``rss_peak_bytes``: the host process's peak RSS growth over the same two steps (not compared)."""
    if torch.device(device).index is not None:  # plain "cuda" is the current device (set_device needs an index)
        torch.cuda.set_device(device)
    model, opt, step = build()
    torch.cuda.synchronize()
    base = status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")
    torch.cuda.reset_peak_memory_stats()
    step()
    step()
    torch.cuda.synchronize()
    return {"tensor_peak_bytes": torch.cuda.max_memory_allocated(), "rss_peak_bytes": status_bytes("VmHWM") - base}


def memory_child(name: str, size: int, head: str, batch: int, threads: int, device: str = "cpu",
                 precision: str = "fp32", trace: bool = True) -> dict[str, Any]:
    """Measure eager SGD training steps of one case on ``device``; runs in a fresh process (see
    :func:`bench_memory`, and :func:`_cpu_child` / :func:`_cuda_child` for the keys). ``trace``: false for the
    CPU's second process, which measures only the RSS under glibc's defaults."""
    torch.set_num_threads(threads)
    build = _builder(name, size, head, batch, device, precision)
    return _cuda_child(build, device) if is_cuda(device) else _cpu_child(build, trace)


def _cases(cfg: BenchConfig) -> list[tuple[str, int, str, int, str]]:
    """(model, input size, head, batch, precision) of each measurement on ``cfg.device``."""
    if is_cuda(cfg.device):
        return [(*case, precision) for case in cfg.pick(CUDA_MEMORY_CASES, CUDA_MEMORY_CASES[:1])
                for precision in cfg.pick(CUDA_PRECISIONS, ("fp32",))]
    return [(name, size, head, batch, "fp32") for name, size, head in cfg.pick(MEMORY_CASES, MEMORY_CASES[:1])
            for batch in cfg.pick(MEMORY_BATCHES, (8,))]


def _child(args: list[Any], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run :func:`memory_child` with ``args`` in a fresh ``python -m vggnet.bench`` process and return its record.
    Its environment is this process's without the :data:`GLIBC_RETURNS_MEMORY` variables, plus ``env``."""
    environ = {k: v for k, v in os.environ.items() if k not in GLIBC_RETURNS_MEMORY}
    proc = subprocess.run([sys.executable, "-m", "vggnet.bench", "--memory-child", json.dumps(args)],
                          capture_output=True, text=True, check=False, env={**environ, **(env or {})})
    if proc.returncode != 0:
        raise RuntimeError(f"memory measurement {args} failed: {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _measure(args: list[Any], device: str) -> dict[str, Any]:
    """One case's measurements. On the CPU two processes: the allocator trace and the RSS growth with glibc
    returning freed blocks (:data:`GLIBC_RETURNS_MEMORY`), then the RSS growth under glibc's defaults
    (``rss_glibc_default_peak_bytes``), with the two named differences: ``onednn_scratch_bytes`` (allocator peak -
    tensor peak) and ``glibc_retained_bytes`` (RSS under the defaults - RSS with freed blocks returned)."""
    if device == "cuda":
        return _child(args)
    measured = _child(args, GLIBC_RETURNS_MEMORY)
    default = _child([*args, False])["rss_peak_bytes"]
    return {**measured, "rss_glibc_default_peak_bytes": default,
            "onednn_scratch_bytes": measured["alloc_peak_bytes"] - measured["tensor_peak_bytes"],
            "glibc_retained_bytes": default - measured["rss_peak_bytes"]}


def compare(estimate: int, measured: dict[str, Any], device: str) -> dict[str, float]:
    """``<name>_error`` = estimate / measured - 1 for each peak compared on ``device`` (CUDA: the allocator's;
    the CPU: the tensors, the allocator, RSS with freed blocks returned and RSS under glibc's defaults)."""
    keys = ("tensor",) if device == "cuda" else ("tensor", "alloc", "rss", "rss_glibc_default")
    return {f"{key}_error": estimate / measured[f"{key}_peak_bytes"] - 1 for key in keys
            if measured.get(f"{key}_peak_bytes")}


def bench_memory(cfg: BenchConfig, results: dict[str, Any]) -> dict[str, Any]:
    threads = results["conditions"]["threads"]  # what run() set
    device = "cuda" if is_cuda(cfg.device) else "cpu"
    rows = []
    for name, size, head, batch, precision in _cases(cfg):
        cfg.log(f"memory: {name} {head} head, {size}x{size}, batch {batch}, {precision} on {cfg.device}")
        with torch.device("meta"):
            summary = summarize(create_model(name, num_classes=10, input_size=size, head=head))
        estimate = training_memory(summary, batch, "sgd", precision, device)
        measured = _measure([name, size, head, batch, threads, cfg.device, precision], device)
        rows.append({"model": name, "head": head, "input_size": size, "batch": batch, "precision": precision,
                     "estimate_bytes": estimate.total, "estimate": estimate.to_dict(), **measured,
                     **compare(estimate.total, measured, device)})
    measured_with = ("torch.cuda.max_memory_allocated over a fresh model's first two steps" if device == "cuda" else
                     "CPU allocator peak over a fresh model's first two steps (torch.profiler allocation trace), "
                     "without oneDNN's per-convolution scratch")
    out = {"rows": rows, "device": cfg.device, "precision": ", ".join(sorted({r["precision"] for r in rows})),
           "layout": "NCHW", "optimizer": "sgd (momentum)", "measured_with": measured_with,
           "error_definition": "estimate / measured - 1", "target_abs_error": TARGETS["memory_error"]}
    if device == "cpu":
        out["rss_measured_with"] = (
            "rss_peak_bytes: peak RSS growth over two steps in a process started with "
            + " ".join(f"{k}={v}" for k, v in GLIBC_RETURNS_MEMORY.items())
            + " (glibc returns every freed block of 128 KiB or more); rss_glibc_default_peak_bytes: the same "
            "under glibc's defaults; glibc_retained_bytes: their difference")
    return out
