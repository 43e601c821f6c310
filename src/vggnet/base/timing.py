"""The timing harness: interleaved rounds, one timed thing (:class:`Timing`), reference-vs-vggnet comparisons.

Counting: FLOPs = 2 x MACs (one multiply-add = 2 FLOPs), MACs from :func:`vggnet.summarize` (conv and linear
layers, padding taps included); a training step counts 3 x the forward FLOPs. Times are medians over rounds that
alternate reference and vggnet, after warm-up; on CUDA each timed call is bracketed by
``torch.cuda.synchronize`` (:func:`synchronize`).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable


def synchronize(device: Any = None) -> None:
    """Wait until ``device`` has finished the work queued on it: CUDA runs kernels asynchronously, so a call
    returns before its work is done and only a synchronised clock times it. Nothing to wait for on the CPU."""
    if device is None:
        return
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int, warmup: int = 2, device: Any = None
                ) -> dict[str, list[float]]:
    """Seconds per call of each function: warm-up calls, then ``rounds`` rounds that call each function once.

    ``device``: where the functions run; on CUDA the clock is read only after the device finished (before the start
    and after the call)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


@dataclass
class Timing:
    """One timed thing: ``images`` per call, seconds of every timed call, FLOPs per call, same-precision peak."""

    name: str
    precision: str
    images: int
    seconds: list[float]
    flops: float | None = None
    peak: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def to_dict(self) -> dict[str, Any]:
        median = self.median
        flop_s = self.flops / median if self.flops else None
        return {
            "name": self.name,
            "precision": self.precision,
            "images_per_call": self.images,
            "seconds_median": median,
            "seconds_min": min(self.seconds),
            "seconds_max": max(self.seconds),
            "rounds": len(self.seconds),
            "images_per_second": self.images / median,
            "flop_per_second": flop_s,
            "peak_share": flop_s / self.peak if flop_s and self.peak else None,
            **self.extra,
        }


def comparison(reference: Timing, fast: Timing, **extra: Any) -> dict[str, Any]:
    """Reference and vggnet side by side; ``ratio``: vggnet's images/s over the reference's."""
    ref, vgg = reference.to_dict(), fast.to_dict()
    return {"reference": ref, "vggnet": vgg, "ratio": vgg["images_per_second"] / ref["images_per_second"], **extra}


def rows_against(times: dict[str, list[float]], reference: str, precisions: dict[str, str], images: int,
                 flops: float) -> list[dict[str, Any]]:
    """One :class:`Timing` record per timed function (in ``times``' order), each with ``ratio``: its images/s over
    the ``reference`` function's, timed in the same rounds."""
    ref_ips = images / statistics.median(times[reference])
    return [dict(Timing(name, precisions[name], images, seconds, flops).to_dict(),
                 ratio=images / statistics.median(seconds) / ref_ips) for name, seconds in times.items()]
