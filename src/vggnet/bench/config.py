"""What ``vggnet bench`` runs and how big: the sections of each device, the targets of issues #4, #12, #13 and #21,
:class:`BenchConfig`."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable
from vggnet.base.errors import ConfigError
from vggnet.runtime import pick_device

SECTIONS = ("peak", "train", "infer", "e2e", "data", "memory", "contention", "ablation", "profile")  # --device cpu
DEFAULT_SECTIONS = SECTIONS
GPU_SECTIONS = ("gpu_epoch", "gpu_step", "gpu_infer", "memory")  # --device cuda / cuda:N (memory is shared)
ALL_SECTIONS = SECTIONS + tuple(s for s in GPU_SECTIONS if s not in SECTIONS)
TARGETS = {"train_ratio": 2.5, "train_peak_share": 0.70, "infer_ratio": 3.0, "e2e_ratio": 3.0,
           "memory_error": 0.15,
           # issue #13: training throughput beside one other CPU-bound process, as a share of the quiet machine's.
           "contention_share": 0.5,
           # issue #21: decode + augment images/s per core, vggnet's paper transform vs ImageFolder + DataLoader.
           "data_per_core_ratio": 1.5,
           # issue #12, on CUDA: the epoch's wall time vs the typical GPU pipeline; the 224x224 VGG-16-BN training
           # step vs the reference in eager bf16 autocast + channels_last and in eager fp32; vggnet's module vs the
           # reference's in the same 32x32 step (1.0: the module costs no time per forward).
           "gpu_epoch_ratio": 5.0, "gpu_step_vs_amp": 1.0, "gpu_step_vs_fp32": 2.0, "gpu_module_ratio": 1.0}
SHARED_TARGETS = ("memory_error",)
SCHEMA = 1
_DEVICE = re.compile(r"cpu|cuda(:\d+)?")


def is_cuda(device: str) -> bool:
    return device.startswith("cuda")


def device_sections(device: str) -> tuple[str, ...]:
    """The sections ``device`` runs: the CPU sections, or the GPU sections (with the shared ``memory``)."""
    return GPU_SECTIONS if is_cuda(device) else SECTIONS


def device_targets(device: str) -> dict[str, float]:
    """The targets of ``device``'s sections: issue #4's on the CPU (as before the GPU sections), issue #12's on CUDA."""
    return {k: v for k, v in TARGETS.items() if k in SHARED_TARGETS or k.startswith("gpu_") == is_cuda(device)}


@dataclass
class BenchConfig:
    """What to run and how big. ``quick`` shrinks every section to a smoke test of a few seconds."""

    sections: tuple[str, ...] | None = None  # None: every section of the device (device_sections)
    quick: bool = False
    data_dir: str | None = None
    threads: int | None = None  # intra-op threads (default: every available core)
    rounds: int | None = None  # timed rounds per measurement (default 10; quick 2)
    e2e_subset: int | None = None  # training images in the e2e / gpu_epoch epoch (default all; quick 1024)
    wait_idle: float = 0.0  # seconds to wait for other processes to go quiet before starting
    device: str = "cpu"  # "cpu": the CPU sections; "cuda" / "cuda:N": the GPU sections (docs/GPU.md)
    progress: Callable[[str], None] | None = None

    def __post_init__(self) -> None:
        if self.sections is None:
            self.sections = device_sections(self.device)

    # Sizes of each section: (full, quick).
    def pick(self, full: Any, quick: Any) -> Any:
        return quick if self.quick else full

    @property
    def n_rounds(self) -> int:
        return self.rounds or self.pick(10, 2)

    def log(self, message: str) -> None:
        if self.progress is not None:
            self.progress(message)

    def validate(self) -> None:
        """ConfigError (one line, naming the option and the fix) unless the device exists and runs every chosen
        section; called before any work."""
        if not _DEVICE.fullmatch(self.device):
            raise ConfigError(f"--device must be cpu, cuda or cuda:N for vggnet bench, got {self.device!r}")
        unknown = [s for s in self.sections if s not in ALL_SECTIONS]
        if unknown:
            raise ConfigError(f"unknown bench section(s) {', '.join(unknown)}: choose from {', '.join(ALL_SECTIONS)}")
        mine = device_sections(self.device)
        foreign = [s for s in self.sections if s not in mine]
        if foreign:
            other = "cpu" if is_cuda(self.device) else "cuda"
            raise ConfigError(f"--only {','.join(foreign)}: section(s) of --device {other}, not of --device "
                              f"{self.device} (whose sections are {', '.join(mine)})")
        pick_device(self.device)  # a CUDA device that is not there: one line, before any work
