"""The one runtime decision: device, precision, memory layout and threads, resolved and validated once.

Every verb that runs a model (train, eval, predict, bench) calls :func:`resolve_runtime` and passes the resulting
:class:`Runtime` along; nothing else picks a device or a precision. :func:`uses_cpu_bf16_path` is the one place
that decides whether the CPU-bf16 speed-ups (:mod:`vggnet.net.cpu_bf16` for training, the folded bf16 copy of
:mod:`vggnet.evaluation.inference` for evaluation and prediction) apply.

Precision ``auto`` means: bf16 on CPUs that run it natively (AVX512_BF16 or AMX) and on CUDA GPUs that support
it, fp16 on older GPUs, fp32 elsewhere. On CPUs without native bf16 (AVX2-only, for example), bf16 autocast is far
slower than fp32, and oneDNN's bf16 convolutions may not run at all (:func:`cpu_runs_bf16`). On a CPU with native
bf16, training and inference do not take this rule: they measure which of fp32 and bf16 is faster
(:mod:`vggnet.training.probe`, :mod:`vggnet.evaluation.probe`), and on every CPU which memory layout.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from vggnet.base.cpuload import LoadWindow, affinity
from vggnet.base.errors import ConfigError

#: The precision choices of every verb (``auto`` resolves to one of the others).
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@lru_cache(maxsize=None)
def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            return f.read()
    except OSError:
        return ""


@lru_cache(maxsize=None)
def cpu_has_bf16() -> bool:
    """True when the CPU runs bf16 natively (AVX512_BF16 or AMX); bf16 autocast is slower without it."""
    flags = _cpu_flags()
    if "avx512_bf16" in flags or "amx_bf16" in flags:
        return True
    return cpu_runs_bf16() if not flags else False


#: The CPU features that decide how fast bf16 runs (vggnet.training.probe keys its measurements by them).
BF16_FEATURES = ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_identity() -> dict[str, object]:
    """The CPU model name, which of :data:`BF16_FEATURES` it has, and ``ONEDNN_MAX_CPU_ISA`` (which hides features
    from oneDNN): what a measured speed of this CPU depends on besides the software."""
    info = _cpu_flags()
    name = re.search(r"^model name\s*:\s*(.*?)\s*$", info, re.M)
    flags = re.search(r"^flags\s*:(.*)$", info, re.M)
    features = set(flags.group(1).split()) if flags else set()
    return {"cpu": name.group(1) if name else "unknown", "features": [f for f in BF16_FEATURES if f in features],
            "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA")}


@lru_cache(maxsize=None)
def cpu_runs_bf16() -> bool:
    """True when oneDNN can run bf16 convolutions on this CPU at all (it needs at least AVX512BW/VL/DQ or
    AVX-NE-CONVERT; an AVX2-only CPU cannot, and bf16 convolutions raise there)."""
    is_supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(is_supported()) if is_supported is not None else False


def bf16_candidate(device: torch.device) -> bool:
    """Whether precision ``auto``'s probes measure bf16 on ``device``: a CPU that runs bf16 natively (AVX512_BF16
    or AMX) and where oneDNN can run bf16 convolutions."""
    return device.type == "cpu" and cpu_has_bf16() and cpu_runs_bf16()


def available_cores() -> int:
    cpus = affinity()
    return len(cpus) if cpus is not None else os.cpu_count() or 1  # None: not Linux


#: Intra-op threads by default when a GPU does the work: the host only launches kernels and indexes batches, and
#: every extra OpenMP thread spins between the few CPU ops (16 threads beside an H200 burned 8 minutes of CPU time
#: in a 56-second run; issue 12).
GPU_HOST_THREADS = 2
#: The largest share of a GPU's free memory the training data may take to live there (as uint8) for the whole run.
RESIDENT_SHARE = 0.25


def default_threads(device: torch.device) -> int:
    """Intra-op threads when none were asked for: every core for the CPU, :data:`GPU_HOST_THREADS` beside a GPU."""
    cores = available_cores()
    return min(GPU_HOST_THREADS, cores) if device.type == "cuda" else cores


#: Least seconds of training between two looks at the other processes' load (:class:`AdaptiveThreads`); the looks
#: happen at the loop's sync points (every 10 steps), so a run reacts within about 10 steps. A reading of /proc/stat
#: costs tens of microseconds; a window of 1 s holds 100 scheduler ticks per core, enough to tell a busy core.
LOAD_WINDOW_SECONDS = 1.0


def threads_for_load(cores: int, other_cores: float) -> int:
    """Intra-op threads on ``cores`` cores while other processes keep ``other_cores`` cores busy: one thread per
    core they leave free (a core counts as taken from half its time on), at least one. OpenMP threads wait for
    each other at every barrier, so one that shares its core with another process stalls the whole team: with 2
    threads beside one busy process a training step ran at 30-35% of its idle speed on a 2-core AMD EPYC, with
    1 thread at 56-59% (``scripts/contention_probe.py``)."""
    return max(1, min(cores, cores - int(other_cores + 0.5)))


class AdaptiveThreads:
    """The CPU thread count of a run that was given none: at the training loop's sync points (or between
    inference batches, :func:`inference_threads`), once at least ``seconds`` (:data:`LOAD_WINDOW_SECONDS`) have
    passed, it reads the other processes' load over the window just ended and sets :func:`threads_for_load`'s count
    (``torch.set_num_threads``). A machine that gets busy mid-run costs about 10 slow steps, and the threads come
    back when it is quiet again. ``window`` is a :class:`vggnet.base.cpuload.LoadWindow` (injectable for tests)."""

    def __init__(self, cores: int, window=None, seconds: float = LOAD_WINDOW_SECONDS) -> None:
        self.cores, self.seconds = cores, seconds
        self.window = window if window is not None else LoadWindow(affinity())

    def poll(self, seconds: float | None = None) -> int | None:
        """Adapt when a window of ``seconds`` (default ``self.seconds``) has ended; returns the new thread count when
        it changed, else None."""
        if self.window.elapsed() < (self.seconds if seconds is None else seconds):
            return None
        other = self.window.read()
        if other is None:
            return None
        wanted = threads_for_load(self.cores, other)
        if wanted == torch.get_num_threads():
            return None
        torch.set_num_threads(wanted)
        return wanted

    def settle(self) -> int:
        """Wait for the current window to end (the rest of ``self.seconds``, idle: the reading is then the others'
        load alone), adapt, and return the thread count: for a measurement that must run on the load's count from
        its first call (``vggnet compress``'s latency)."""
        time.sleep(max(0.0, self.seconds - self.window.elapsed()))
        self.poll(0.0)
        return torch.get_num_threads()


def adaptive_threads(runtime: "Runtime", threads_given: bool, distributed: bool) -> AdaptiveThreads | None:
    """The one decision whether a training run adapts its thread count to the load: on the CPU, when no
    ``--threads`` was given, alone (torchrun ranks share the cores by rank) and not ``--deterministic`` (the
    thread count changes how oneDNN splits its sums, so a run that adapts is reproducible only up to rounding)."""
    if runtime.device.type != "cpu" or threads_given or distributed or runtime.deterministic:
        return None
    return AdaptiveThreads(available_cores())


#: Least seconds between two looks at the load during inference (:func:`inference_threads`): evaluation polls
#: before every batch, and a whole ``vggnet eval`` may last a few seconds, so its first window must end soon; 0.25 s
#: holds 25 scheduler ticks per core, which tells one busy core (1.0) from a quiet one (0.0) to about 0.1 core.
INFERENCE_WINDOW_SECONDS = 0.25


def inference_threads(device: torch.device, threads_given: bool, deterministic: bool = False
                      ) -> AdaptiveThreads | None:
    """The one decision whether inference (``vggnet eval``, ``predict``, ``compress``'s accuracy and latency)
    adapts its thread count to the other processes' load: on the CPU when no ``--threads`` was given (and not
    ``deterministic``), as :func:`adaptive_threads` decides for training, with windows of
    :data:`INFERENCE_WINDOW_SECONDS`. The window opens now: :func:`resolve_runtime` calls this first thing, so by
    the first batch (after loading the model and the data) a reading is usually there. Beside one busy process on
    2 cores, OpenMP teams of 2 stalled at every barrier: ``vggnet compress`` measured 180 ms per image against
    1.0 ms on one thread (issue 22)."""
    if device.type != "cpu" or threads_given or deterministic:
        return None
    return AdaptiveThreads(available_cores(), seconds=INFERENCE_WINDOW_SECONDS)


def set_threads(threads: int | None = None, device: torch.device | None = None) -> int:
    """Use ``threads`` intra-op threads, or :func:`default_threads` for ``device`` (the CPU when not given)."""
    n = threads or default_threads(device or torch.device("cpu"))
    torch.set_num_threads(n)
    return n


def keeps_data_on_device(device: torch.device, nbytes: int, free_bytes: int | None = None) -> bool:
    """The one decision whether a run's uint8 images live on ``device`` for the whole run (batches then never cross
    the PCIe bus, and augmentation runs where the images are): on a GPU when they take at most
    :data:`RESIDENT_SHARE` of its free memory (``free_bytes``; read from the device when not given); never on
    the CPU, where they already are."""
    if device.type != "cuda":
        return False
    if free_bytes is None:
        free_bytes = torch.cuda.mem_get_info(device)[0]
    return nbytes <= RESIDENT_SHARE * free_bytes


_DEVICE = re.compile(r"(cpu|cuda)(:\d{1,4})?")


def pick_device(requested: str | torch.device = "auto") -> torch.device:
    """``auto``: the first CUDA device when there is one, else the CPU; ``cpu``, ``cuda``, ``cuda:N`` as asked."""
    if isinstance(requested, torch.device):
        return requested
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not _DEVICE.fullmatch(str(requested)):
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {requested!r}")
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {requested} was asked for but no CUDA device is available: use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {requested}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def pick_precision(device: torch.device, requested: str = "auto") -> str:
    """Resolve ``auto`` (see the module docstring) and refuse what the device cannot run."""
    if requested not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    if requested == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_bf16() else "fp32"
    if device.type == "cpu" and requested == "fp16":
        raise ConfigError("--precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    if device.type == "cpu" and requested == "bf16" and not cpu_runs_bf16():
        raise ConfigError("--precision bf16: this CPU cannot run bf16 convolutions (it needs AVX512 or AMX); "
                          "use --precision fp32")
    return requested


def uses_cpu_bf16_path(device: torch.device, precision: str) -> bool:
    """The one decision for the CPU-bf16 speed-ups: training tunes the model (:func:`vggnet.net.cpu_bf16.tune_for_cpu_bf16`),
    evaluation and inference run a folded bf16 copy (:func:`vggnet.evaluation.inference.optimize_for_inference`)."""
    return device.type == "cpu" and precision == "bf16"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def memory_format(channels_last: bool) -> torch.memory_format:
    """The memory format of a model's 4-d weights and its batches in that layout (True: channels_last, else NCHW)."""
    return torch.channels_last if channels_last else torch.contiguous_format


@dataclass(frozen=True)
class Runtime:
    """Where and how a model runs: resolved values only (no ``auto``)."""

    device: torch.device
    precision: str  # fp32 | bf16 | fp16
    channels_last: bool  # the memory layout (precision auto's probes may choose NCHW: vggnet.base.probecache)
    threads: int
    compile: bool = False  # torch.compile the network (see compile_module)
    deterministic: bool = False  # deterministic algorithms only (see deterministic_algorithms)
    #: The thread count that follows the other processes' load during inference (:func:`inference_threads`; None:
    #: --threads was given, or not the CPU); evaluation and prediction poll it between batches.
    adaptive: AdaptiveThreads | None = field(default=None, compare=False, repr=False)
    #: In bf16 on the CPU, whether 3x3 convolutions on small maps run as one GEMM (:mod:`vggnet.net.cpu_bf16`) or
    #: oneDNN runs every convolution: precision ``auto``'s probes measure both (:mod:`vggnet.evaluation.probe`).
    small_map_convs: bool = True

    @property
    def cpu_bf16(self) -> bool:
        """True when the CPU-bf16 speed-ups apply (:func:`uses_cpu_bf16_path`)."""
        return uses_cpu_bf16_path(self.device, self.precision)

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.precision)

    def to_dict(self) -> dict:
        return {"device": str(self.device), "precision": self.precision, "channels_last": self.channels_last,
                "threads": self.threads, "compile": self.compile, "deterministic": self.deterministic}


#: C++ compilers inductor can use to build its CPU kernels (it honours $CXX first).
_CXX = ("g++", "c++", "clang++")


def check_compile(device: torch.device) -> None:
    """ConfigError now, rather than a compiler traceback at the first step, when ``torch.compile`` cannot work here:
    on the CPU, inductor writes C++ and needs a compiler."""
    if device.type != "cpu":
        return
    candidates = ([os.environ["CXX"]] if os.environ.get("CXX") else []) + list(_CXX)
    if not any(shutil.which(c) for c in candidates):
        raise ConfigError("--compile on the CPU needs a C++ compiler (torch.compile generates C++ kernels): install "
                          "one (apt install g++) or drop --compile")


def compile_module(module: torch.nn.Module) -> torch.nn.Module:
    """``torch.compile(module)`` with inductor's defaults: the first call compiles (tens of seconds on 2 CPU cores;
    once per input shape), later calls run the generated kernels. State-dict keys gain ``_orig_mod.``, which
    :func:`vggnet.base.files.model_state` strips."""
    return torch.compile(module)


#: cuBLAS needs a fixed workspace to be deterministic (CUDA's documentation; read when cuBLAS starts).
CUBLAS_WORKSPACE = ":4096:8"


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool = True):
    """While active: ``torch.use_deterministic_algorithms(True)`` (an op without a deterministic implementation
    raises instead of silently varying), cuDNN's deterministic algorithms without autotuning, and cuBLAS's fixed
    workspace (``CUBLAS_WORKSPACE_CONFIG``, set unless the user set it). The previous settings come back after.
    With it, a same-seed run and a resumed run are bit-identical on CUDA too; without it cuDNN and cuBLAS may pick
    algorithms whose floating-point sums differ from run to run. On the CPU vggnet's runs are bit-identical
    either way (tested)."""
    if not enabled:
        yield
        return
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
              torch.backends.cudnn.benchmark, os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[1], before[2]
        if before[3] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def resolve_runtime(device: str | torch.device = "auto", precision: str = "auto", channels_last: bool | str = True,
                    threads: int | None = None, compile: bool = False, deterministic: bool = False) -> Runtime:
    """Validate and resolve the run-time options, and set the intra-op thread count (:func:`default_threads`; on the
    CPU without ``threads``, inference then follows the load: :attr:`Runtime.adaptive`). ``channels_last`` ``auto``
    (a run's request that precision auto's probe decides) resolves to channels_last, the rule."""
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"--threads must be a positive integer, got {threads!r}")
    dev = pick_device(device)
    chosen = pick_precision(dev, precision)
    if compile:
        check_compile(dev)
    adaptive = inference_threads(dev, threads is not None, deterministic)
    return Runtime(dev, chosen, channels_last is not False, set_threads(threads, dev), bool(compile),
                   bool(deterministic), adaptive=adaptive)
