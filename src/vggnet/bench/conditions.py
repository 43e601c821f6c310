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

from vggnet.base.cpuload import other_load
from vggnet.base.version import __version__
from vggnet.runtime import available_cores, cpu_has_bf16, cpu_runs_bf16

BF16_UNSUPPORTED = "bf16 convolutions are not supported by this CPU"


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
    return None if cpu_runs_bf16() else {"skipped": BF16_UNSUPPORTED}


#: A bf16-capable or fp32 3x3 convolution run with oneDNN's verbose log on, in a fresh process: the log names the ISA
#: oneDNN dispatches to (after ``ONEDNN_MAX_CPU_ISA``) and the convolution implementation it picked.
_ONEDNN_PROBE = """
import sys, torch
dtype = torch.bfloat16 if sys.argv[1] == "bf16" else torch.float32
x = torch.randn(32, 64, 16, 16, dtype=dtype).contiguous(memory_format=torch.channels_last)
w = torch.randn(64, 64, 3, 3, dtype=dtype).contiguous(memory_format=torch.channels_last)
torch.nn.functional.conv2d(x, w, padding=1)
"""


def onednn_dispatch(precision: str = "fp32") -> dict[str, str | None]:
    """``{"isa": "Intel AVX2", "convolution": "brg_conv_fwd:avx2"}``: what oneDNN used for a ``precision`` 3x3
    convolution on this CPU (None for what its log did not say, or where the probe failed)."""
    import subprocess
    import sys

    env = {**os.environ, "ONEDNN_VERBOSE": "1"}
    try:
        log = subprocess.run([sys.executable, "-c", _ONEDNN_PROBE, precision], capture_output=True, text=True,
                             env=env, timeout=120, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        log = ""
    return parse_onednn_log(log)


def parse_onednn_log(log: str) -> dict[str, str | None]:
    """The ISA line and the first convolution's implementation of a oneDNN verbose log (see :func:`onednn_dispatch`)."""
    isa = re.search(r"^onednn_verbose,(?:v\d+,)?info,cpu,isa:(.*?)\s*$", log, re.M)
    conv = re.search(r"^onednn_verbose,(?:v\d+,)?primitive,exec,cpu,convolution,([^,]+),", log, re.M)
    return {"isa": isa.group(1) if isa else None, "convolution": conv.group(1) if conv else None}


def machine_info(threads: int) -> dict[str, Any]:
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
            # What oneDNN actually used (its verbose log): the AMX and the non-AMX columns of docs/BENCHMARKS.md.
            "onednn_fp32": onednn_dispatch("fp32"),
            "onednn_bf16": onednn_dispatch("bf16") if cpu_runs_bf16() else None,
            "torch": torch.__version__, "vggnet": __version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
