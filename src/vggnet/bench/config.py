"""What ``vggnet bench`` runs and how big: the sections, the targets of issue #4, :class:`BenchConfig`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

SECTIONS = ("peak", "train", "infer", "e2e", "memory", "ablation", "profile")
DEFAULT_SECTIONS = SECTIONS
TARGETS = {"train_ratio": 2.5, "train_peak_share": 0.70, "infer_ratio": 3.0, "e2e_ratio": 3.0,
           "memory_error": 0.15}
SCHEMA = 1


@dataclass
class BenchConfig:
    """What to run and how big. ``quick`` shrinks every section to a smoke test of a few seconds."""

    sections: tuple[str, ...] = DEFAULT_SECTIONS
    quick: bool = False
    data_dir: str | None = None
    threads: int | None = None  # intra-op threads (default: every available core)
    rounds: int | None = None  # timed rounds per measurement (default 10; quick 2)
    e2e_subset: int | None = None  # training images in the e2e epoch (default all; quick 1024)
    wait_idle: float = 0.0  # seconds to wait for other processes to go quiet before starting
    device: str = "cpu"  # "cpu": the CPU sections; "cuda" / "cuda:N": the GPU sections (docs/GPU.md)
    progress: Callable[[str], None] | None = None

    # Sizes of each section: (full, quick).
    def pick(self, full: Any, quick: Any) -> Any:
        return quick if self.quick else full

    @property
    def n_rounds(self) -> int:
        return self.rounds or self.pick(10, 2)

    def log(self, message: str) -> None:
        if self.progress is not None:
            self.progress(message)
