"""Device, precision and thread choices for the machine at hand."""

from __future__ import annotations

import contextlib
import os
from functools import lru_cache

import torch


@lru_cache(maxsize=None)
def cpu_has_bf16() -> bool:
    """True when the CPU runs bf16 natively (AVX512_BF16 or AMX); bf16 autocast is slower without it."""
    try:
        flags = open("/proc/cpuinfo", encoding="ascii", errors="ignore").read()
    except OSError:
        flags = ""
    if "avx512_bf16" in flags or "amx_bf16" in flags:
        return True
    is_supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(is_supported()) if is_supported is not None and not flags else False


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def pick_precision(device: torch.device, requested: str = "auto") -> str:
    """``bf16`` on CPUs with native bf16 and on CUDA GPUs that support it, ``fp16`` on older GPUs, else ``fp32``."""
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_bf16() else "fp32"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def set_threads(threads: int | None = None) -> int:
    """Use every core this process may run on (or ``threads``) for intra-op parallelism."""
    n = threads or available_cores()
    torch.set_num_threads(n)
    return n
