"""Learning-rate schedules as pure functions of the step, so a resumed run recomputes them exactly.

``lr_factor(schedule, step, total_steps, warmup_steps)`` multiplies the base learning rate:

- ``cosine``: linear warmup, then cosine decay to 0;
- ``onecycle``: linear warmup to the peak over ``warmup_steps`` (30% of training when not given), then linear decay
  to 0 (the "one-cycle" shape airbench and fast.ai use);
- ``step``: warmup, then /10 at 50% and 75% of training;
- ``plateau``: warmup, then the :class:`Plateau` state divides by 10 when test accuracy stops improving (the paper);
- ``constant``: warmup, then the base rate.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

SCHEDULES = ("cosine", "onecycle", "step", "plateau", "constant")


def lr_factor(schedule: str, step: int, total_steps: int, warmup_steps: int) -> float:
    if schedule == "onecycle" and warmup_steps == 0:
        warmup_steps = max(1, int(0.3 * total_steps))
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if schedule == "onecycle":
        return max(0.0, 1.0 - progress)
    if schedule == "step":
        return 0.1 ** ((progress >= 0.5) + (progress >= 0.75))
    if schedule in ("plateau", "constant"):
        return 1.0
    raise ValueError(f"unknown schedule {schedule!r}")


@dataclass
class Plateau:
    """Divide the learning rate by ``factor`` when the watched accuracy has not improved for ``patience`` epochs."""

    patience: int = 2
    factor: float = 0.1
    scale: float = 1.0
    best: float = -math.inf
    bad_epochs: int = 0

    def update(self, accuracy: float) -> None:
        if accuracy > self.best + 1e-4:
            self.best, self.bad_epochs = accuracy, 0
            return
        self.bad_epochs += 1
        if self.bad_epochs > self.patience:
            self.scale *= self.factor
            self.bad_epochs = 0

    def to_dict(self) -> dict:
        return asdict(self)
