"""The ``peak`` section: FLOP/s of one large 3x3 convolution (channels_last, forward) in fp32 and in bf16, the
practical limit of this machine and the denominator of every "share of peak".

Where this CPU cannot run bf16 convolutions at all, ``bf16`` is ``{"skipped": reason}`` and nothing has a bf16
share of peak.
"""

from __future__ import annotations

import statistics
from typing import Any

import torch
import torch.nn.functional as F

from vggnet.bench.conditions import bf16_skip
from vggnet.bench.config import BenchConfig
from vggnet.base.timing import interleaved

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def bench_peak(cfg: BenchConfig, results: dict[str, Any] | None = None) -> dict[str, Any]:
    """Best FLOP/s of a large 3x3 convolution (N, C, H, W) -> (N, C, H, W), channels_last, no autograd."""
    n, c, hw = cfg.pick((16, 256, 56), (4, 64, 28))
    flops = 2 * n * c * c * 9 * hw * hw
    out: dict[str, Any] = {"shape": [n, c, hw, hw], "kernel": 3, "flops_per_call": flops}
    for precision, dtype in PRECISIONS.items():
        skipped = bf16_skip() if precision == "bf16" else None
        if skipped:
            out[precision] = skipped
            continue
        x = torch.randn(n, c, hw, hw, dtype=dtype).contiguous(memory_format=torch.channels_last)
        w = (torch.randn(c, c, 3, 3) * 0.05).to(dtype).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            times = interleaved({precision: lambda: F.conv2d(x, w, padding=1)}, rounds=cfg.pick(8, 2), warmup=2)
        best = min(times[precision])
        out[precision] = {"flop_per_second": flops / best, "seconds_min": best,
                          "seconds_median": statistics.median(times[precision])}
    return out


def peak_flops(peak: dict[str, Any], precision: str) -> float | None:
    """The measured peak FLOP/s of ``precision`` (None where it was not measured)."""
    return peak.get(precision, {}).get("flop_per_second")


def keep_best(peak: dict[str, Any], again: dict[str, Any]) -> None:
    """Keep, per precision, the better of two peak measurements (in ``peak``)."""
    for precision in PRECISIONS:
        if (peak_flops(again, precision) or 0) > (peak_flops(peak, precision) or 0):
            peak[precision] = again[precision]


def apply_peak(node: Any, peak: dict[str, Any]) -> None:
    """Recompute every ``peak_share`` in the results from the final peak."""
    if isinstance(node, dict):
        if node.get("flop_per_second") and node.get("precision") in PRECISIONS and "peak_share" in node:
            best = peak_flops(peak, node["precision"])
            node["peak_share"] = node["flop_per_second"] / best if best else None
        for key, value in node.items():
            if key != "peak":
                apply_peak(value, peak)
    elif isinstance(node, list):
        for value in node:
            apply_peak(value, peak)
