"""Training: ``config`` (what a run depends on) -> ``build`` (a ready run) -> ``loop`` (epochs and steps), writing
the run directory through :mod:`vggnet.rundir`.

``train(config)`` starts a run; ``resume(run_dir)`` continues one exactly where it stopped.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, ConfigError
from ..rundir import RunDir
from ..runtime import deterministic_algorithms
from .build import Run, build_run
from .config import DEFAULT_MODEL, MODEL_SHAPE, NORMALIZE, OPTIMIZERS, PRESETS, RANGES, TrainConfig, resolve_config
from .loop import Interrupted, TrainingDiverged, fit, seed_epoch, train_step

#: Options that change how a run executes, not what it computes: --resume may set them anew for its session
#: (they are not written back to config.json).
RUNTIME_OPTIONS = ("progress", "threads", "device", "data_dir", "compile")
#: Schedules that decay to a learning rate of 0 at the end of their length: a run on one cannot be extended.
DECAYING = ("onecycle", "cosine")


def train(config: TrainConfig | None = None, data=None, **options: Any) -> dict[str, Any]:
    """Train from a :class:`TrainConfig` (validated here) or keyword options (resolved with :func:`resolve_config`).

    ``data``: ``(train_set, test_set)`` already loaded, instead of loading ``config.dataset``."""
    if config is None:
        config = resolve_config(options.pop("preset", None), **options)
    elif options:
        raise ConfigError("pass either a TrainConfig or keyword options, not both")
    if config.out and RunDir(config.out).has_state():
        raise ConfigError(f"{config.out} already holds a run: continue it with --resume {config.out}, or choose "
                          "another --out")
    with deterministic_algorithms(config.deterministic):
        return fit(build_run(config, data))


def resume(run_dir: str | Path, epochs: int | None = None, **runtime: Any) -> dict[str, Any]:
    """Continue the run in ``run_dir`` exactly where it stopped, optionally to a new total of ``epochs``.

    Extending (``epochs`` beyond the saved total) keeps the learning-rate schedule's length: ``constant`` goes on at
    the base rate, ``step`` at its last rate (1/100), ``plateau`` at its current rate and keeps watching the
    validation accuracy; ``onecycle`` and ``cosine`` end at a learning rate of 0, so their runs cannot be extended
    (start a new run). config.json records the new total only once the first checkpoint of this session is written,
    so a resume that fails leaves it untouched. ``runtime`` may set the :data:`RUNTIME_OPTIONS` for this session.
    """
    rundir = RunDir(run_dir)
    unknown = set(runtime) - set(RUNTIME_OPTIONS)
    if unknown:
        raise ConfigError(f"resume cannot change {sorted(unknown)}; only {', '.join(RUNTIME_OPTIONS)}")
    saved = rundir.read_config()
    config = _saved_run_config(rundir, saved)
    done = rundir.read_state_record()["run"]["epoch"]  # an integer: read_state_record checks the counters
    if epochs is not None:
        problem = RANGES["epochs"].problem(epochs)
        if problem is not None:
            raise ConfigError(f"--epochs {problem}")
        if epochs <= done:
            raise ConfigError(f"--epochs {epochs} is not beyond the {done} epoch(s) {run_dir} already trained")
        if epochs > config.schedule_epochs and config.schedule in DECAYING:
            raise ConfigError(f"{run_dir}'s {config.schedule} schedule brings the learning rate to 0 at the end of its "
                              f"{config.schedule_epochs} epochs, so epochs beyond them would not train: start a new "
                              f"run with --epochs {epochs} instead")
        config.epochs = epochs
    saved = dict(saved, epochs=config.epochs, schedule_epochs=config.schedule_epochs)
    for key, value in runtime.items():
        if value is not None:
            setattr(config, key, value)
    config.out = str(rundir.path)
    config.validate()  # config.json's values passed _saved_run_config: what fails now is a run-time option's
    if epochs is not None and epochs > config.schedule_epochs and config.progress:
        print(f"vggnet train: extending {run_dir} to {epochs} epochs; the {config.schedule} learning-rate schedule "
              f"keeps its {config.schedule_epochs} epochs and the epochs after them run at its final rate",
              file=sys.stderr)
    with deterministic_algorithms(config.deterministic):  # the mode the run was started in (config.json)
        return fit(build_run(config, saved_config=saved), resume=True)


def _saved_run_config(rundir: RunDir, saved: Any) -> TrainConfig:
    """The configuration ``config.json`` holds (``saved``), completed and validated as a new run's would be: a file
    edited by hand into wrong types or values is a one-line :class:`CheckpointError` naming it."""
    try:
        config = TrainConfig.from_dict(saved)
        config.schedule_epochs = config.schedule_epochs or config.epochs  # runs written before it was recorded
        config.complete().validate()
    except ConfigError as err:
        raise CheckpointError(f"{rundir.config} holds an invalid configuration: {err}") from None
    return config


__all__ = ["DECAYING", "DEFAULT_MODEL", "MODEL_SHAPE", "NORMALIZE", "OPTIMIZERS", "PRESETS", "RUNTIME_OPTIONS",
           "Interrupted", "Run", "TrainConfig", "TrainingDiverged", "build_run", "fit", "resolve_config", "resume",
           "seed_epoch", "train", "train_step"]
