"""How busy the CPU is with *other* processes: the one reader of ``/proc/stat`` for the run-time thread choice
(:class:`vggnet.runtime.AdaptiveThreads`) and for the bench's conditions (:mod:`vggnet.bench.conditions`).

Other processes' load is the machine's busy CPU time minus this process's own, over a window, in cores: 1.0 means
one core's worth of work was done by someone else. Only the CPUs this process may run on count (its affinity), so
a run pinned with ``taskset`` is not disturbed by work on the other cores. Where ``/proc/stat`` is missing (not
Linux) every reading is ``None`` and nothing adapts.
"""

from __future__ import annotations

import os
import resource
import time
from typing import Any, Callable

PROC_STAT = "/proc/stat"


def affinity() -> set[int] | None:
    """The CPUs this process may run on (None where the platform does not say)."""
    try:
        return set(os.sched_getaffinity(0))
    except AttributeError:
        return None


def busy_seconds(cpus: set[int] | None = None, path: str = PROC_STAT) -> float | None:
    """Seconds of non-idle CPU time since boot, summed over ``cpus`` (every CPU when None); None where ``path``
    cannot be read. Busy means user, nice, system, irq, softirq and steal time; idle and iowait are not busy."""
    try:
        with open(path, encoding="ascii") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    counted = {"cpu"} if cpus is None else {f"cpu{n}" for n in cpus}  # the machine's total line, or cpuN lines
    ticks = 0
    for line in lines:
        name, _, rest = line.partition(" ")
        if name in counted:
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in rest.split()[:8])
            ticks += user + nice + system + irq + softirq + steal
    return ticks / os.sysconf("SC_CLK_TCK")


def own_cpu() -> float:
    """CPU seconds of this process (all its threads) and of its reaped children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class LoadWindow:
    """Other processes' load since the previous :meth:`read` (or since construction), without sleeping: each read
    closes one window and opens the next. ``busy``, ``own`` and ``clock`` are injectable for tests."""

    def __init__(self, cpus: set[int] | None = None, busy: Callable[[], float | None] | None = None,
                 own: Callable[[], float] = own_cpu, clock: Callable[[], float] = time.perf_counter) -> None:
        self._busy = busy if busy is not None else (lambda: busy_seconds(cpus))
        self._own, self._clock = own, clock
        self._last = self._sample()

    def _sample(self) -> tuple[float | None, float, float]:
        return self._busy(), self._own(), self._clock()

    def elapsed(self) -> float:
        """Seconds since the window opened."""
        return self._clock() - self._last[2]

    def read(self) -> float | None:
        """Cores used by other processes, on average, since the window opened (None when it cannot be known)."""
        (busy0, own0, t0), (busy1, own1, t1) = self._last, self._sample()
        self._last = (busy1, own1, t1)
        if busy0 is None or busy1 is None or t1 <= t0:
            return None
        return max(0.0, ((busy1 - busy0) - (own1 - own0)) / (t1 - t0))


class CpuMonitor:
    """Other processes' load during a ``with`` block, in cores (``other_cores``; None when it cannot be known)."""

    def __enter__(self) -> "CpuMonitor":
        self._window = LoadWindow(affinity())
        self.other_cores: float | None = None
        return self

    def __exit__(self, *exc: Any) -> None:
        self.other_cores = self._window.read()


def other_load(seconds: float = 1.0) -> float | None:
    """Average cores used by other processes over the next ``seconds``."""
    with CpuMonitor() as mon:
        time.sleep(seconds)
    return mon.other_cores
