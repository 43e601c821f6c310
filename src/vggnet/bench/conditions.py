"""The conditions of a bench run: other processes' CPU use, waiting for a quiet machine, what the machine is.

Other processes' CPU use during each section is recorded (``other_load_cores``): with 2 cores, any load there makes
OpenMP timings unreliable. A measurement that needs bf16 convolutions on a CPU that cannot run them at all (no
AVX512BW / AVX-NE-CONVERT: oneDNN refuses them) is recorded as :func:`bf16_skip` says instead of being made.
"""

from __future__ import annotations

import os
import platform
import re
import time
from typing import Any, Callable

import torch

BF16_UNSUPPORTED = "bf16 convolutions are not supported by this CPU"


class CpuMonitor:
    """CPU time that *other* processes used during a block, in cores (busy time of /proc/stat minus our own).

    Our own time includes reaped children (DataLoader workers, the memory subprocesses).
    """

    def __enter__(self) -> "CpuMonitor":
        self.start = (proc_stat_busy(), own_cpu(), time.perf_counter())
        self.other_cores: float | None = None
        return self

    def __exit__(self, *exc: Any) -> None:
        busy0, own0, t0 = self.start
        busy1, own1, t1 = proc_stat_busy(), own_cpu(), time.perf_counter()
        if busy0 is None or busy1 is None or t1 <= t0:
            return
        self.other_cores = max(0.0, ((busy1 - busy0) - (own1 - own0)) / (t1 - t0))


def proc_stat_busy() -> float | None:
    """Seconds of non-idle CPU time of the whole machine since boot (None where /proc/stat is missing)."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = f.readline().split()[1:]
    except OSError:
        return None
    ticks = [int(v) for v in fields[:8]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = ticks
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu() -> float:
    """CPU seconds of this process and its reaped children."""
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def other_load(seconds: float = 1.0) -> float | None:
    """Average cores used by other processes over the next ``seconds``."""
    with CpuMonitor() as mon:
        time.sleep(seconds)
    return mon.other_cores


def wait_for_quiet(max_seconds: float, threshold: float = 0.15, log: Callable[[str], None] = lambda m: None) -> float:
    """Wait (up to ``max_seconds``) until other processes use less than ``threshold`` cores; returns the last load."""
    deadline = time.monotonic() + max_seconds
    load = other_load(1.0) or 0.0
    while load > threshold and time.monotonic() < deadline:
        log(f"other processes use {load:.2f} cores; waiting for a quiet machine")
        time.sleep(4.0)
        load = other_load(1.0) or 0.0
    return load


def bf16_skip() -> dict[str, str] | None:
    """``{"skipped": reason}`` where bf16 convolutions cannot run on this CPU at all, else None."""
    from ..runtime import cpu_runs_bf16

    return None if cpu_runs_bf16() else {"skipped": BF16_UNSUPPORTED}


def machine_info(threads: int) -> dict[str, Any]:
    from .. import __version__
    from ..runtime import available_cores, cpu_has_bf16, cpu_runs_bf16

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            cpuinfo = f.read()
    except OSError:
        cpuinfo = ""
    name = re.search(r"^model name\s*:\s*(.*?)\s*$", cpuinfo, re.M)
    model = name.group(1) if name else model
    isa = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if re.search(rf"\b{f}\b", cpuinfo)]
    return {"cpu": model, "cores": available_cores(), "threads": threads, "isa": isa, "bf16_native": cpu_has_bf16(),
            "bf16_convolutions": cpu_runs_bf16(),
            # What ATen dispatched to, and oneDNN's ISA cap when one is set (unset: oneDNN uses the best it finds).
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA"),
            "torch": torch.__version__, "vggnet": __version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
