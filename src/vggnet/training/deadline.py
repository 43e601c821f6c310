"""The loop's watch on a time budget (``--budget``; the choice of the recipe is :mod:`vggnet.training.budget`'s).

After each epoch's training the loop asks :meth:`Deadline.last_epoch` whether the next epoch would end past the
budget, from this machine's measured epoch times: this epoch's training and the last measured evaluation and save
(before one is measured, the plan's prediction of them). If so, this epoch is the run's last: evaluated (with its
test-time augmentation), saved and reported as the run's end. The budget counts from the plan's start (loading the
data and probing are part of it) and over every session of a resumed run: each epoch's record holds
``budget_seconds``, the budget used by its end.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from vggnet.base.errors import ConfigError
from vggnet.training.config import TrainConfig, format_duration


def wall_clock() -> float:
    """The budget's clock: seconds since the epoch, so that a plan's start (``budget_record['started_at']``) is
    comparable within the process that trains it."""
    return time.time()


class Deadline:
    """The loop's watch on the budget: ``budget`` seconds, ``spent`` of them before this session's fit began (loading
    and probing, or earlier sessions), ``overhead``: the expected seconds of an epoch after its training (evaluation
    and saving) until one is measured. ``clock``: seconds (:func:`wall_clock`, injectable)."""

    def __init__(self, budget: float, spent: float, overhead: float = 0.0,
                 clock: Callable[[], float] | None = None) -> None:
        self.budget, self.spent, self.overhead = budget, spent, overhead
        self.clock = clock or wall_clock
        self.start = self.mark = self.clock()  # mark: when the current epoch began
        self.trained_at: float | None = None
        self.next_end = self.epoch = 0.0

    def elapsed(self) -> float:
        """Seconds of the budget used so far."""
        return self.spent + self.clock() - self.start

    def last_epoch(self, train_seconds: float) -> bool:
        """Called when an epoch's training is done: whether the next epoch would end past the budget (this epoch's
        training time, or ``train_seconds`` where longer, plus the overhead, once for this epoch and once for the
        next), so that this one must be the last."""
        now = self.trained_at = self.clock()
        self.epoch = max(now - self.mark, train_seconds) + self.overhead
        self.next_end = self.spent + now - self.start + self.overhead + self.epoch
        return self.next_end > self.budget

    def epoch_saved(self) -> None:
        """Called when the epoch is evaluated and saved: its overhead is the next epochs' estimate."""
        now = self.clock()
        if self.trained_at is not None:
            self.overhead = now - self.trained_at
        self.mark = now

    def stop_message(self, epoch: int, epochs: int) -> str:
        return (f"vggnet train: --budget {format_duration(self.budget)}: stopping after epoch {epoch} of {epochs}: the "
                f"next one would end at {self.next_end / 60:.1f} min (an epoch takes {self.epoch:.0f} s here); the "
                "run ends here, saved as finished")


def session_deadline(config: TrainConfig, history: list[dict[str, Any]], partial_seconds: float, resumed: bool,
                     run_dir: Any) -> Deadline | None:
    """The :class:`Deadline` of this session of a run with a budget (None without one). A new run's budget started
    when it was planned (``budget_record``'s ``started_at``); a resumed one has used its last epoch's
    ``budget_seconds`` and the ``partial_seconds`` of training it saved mid-epoch, and is refused (one line) when
    the budget left is less than the epoch its history says it takes."""
    if config.budget is None:
        return None
    record = config.budget_record or {}
    overhead = record.get("epoch_overhead_s")
    overhead = overhead if isinstance(overhead, (int, float)) and overhead >= 0 else 0.0
    used = [r["budget_seconds"] for r in history if isinstance(r.get("budget_seconds"), (int, float))]
    if resumed:
        spent = (used[-1] if used else 0.0) + partial_seconds
        epoch = used[-1] - used[-2] if len(used) > 1 else (used[-1] if used else 0.0)
        if spent + epoch > config.budget:
            raise ConfigError(f"{run_dir} has used {spent / 60:.1f} min of its --budget "
                              f"{format_duration(config.budget)} and an epoch takes {epoch:.0f} s there: it ends "
                              f"with its {len(history)} epochs; start a new run to train longer")
        return Deadline(config.budget, spent, overhead)
    started = record.get("started_at")
    spent = max(0.0, wall_clock() - started) if isinstance(started, (int, float)) else 0.0
    return Deadline(config.budget, spent, overhead)
