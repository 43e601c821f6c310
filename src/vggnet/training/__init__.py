"""Training: ``config`` (what a run depends on) -> ``build`` (a ready run) -> ``loop`` (epochs and steps), writing
the run directory through :mod:`vggnet.store.rundir`.

``train(config)`` starts a run; ``resume(run_dir)`` continues one exactly where it stopped.

Both hold the run directory for their whole session (rank 0, :meth:`vggnet.store.rundir.RunDir.lock`): a second process
writing the same run is refused in one line, before anything is written. Then the temporary files of a killed
write are removed and, on resume, the files a killed save left behind its commit are brought up to it
(:meth:`~vggnet.store.rundir.RunDir.roll_forward`). ``--out`` only ever writes into a new folder, an empty one, or a run
of vggnet's own that has no checkpoint yet (see :func:`check_out`): never over someone else's files.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from vggnet.training import distributed
from vggnet.base.errors import CheckpointError, ConfigError, OutputError
from vggnet.base.files import read_json
from vggnet.base.guard import new_folder
from vggnet.store.rundir import RUN_NAMES, RunDir
from vggnet.runtime import deterministic_algorithms
from vggnet.training.build import Run, build_run, default_run_dir
from vggnet.training.budget import plan
from vggnet.training.config import DEFAULT_MODEL, MODEL_SHAPE, NORMALIZE, OPTIMIZERS, PRESETS, RANGES, TrainConfig, resolve_config
from vggnet.training.loop import Interrupted, TrainingDiverged, fit, seed_epoch, train_step

#: Options that change how a run executes, not what it computes: --resume may set them anew for its session
#: (they are not written back to config.json).
RUNTIME_OPTIONS = ("progress", "threads", "device", "data_dir", "compile", "workers")
#: Schedules that decay to a learning rate of 0 at the end of their length: a run on one cannot be extended.
DECAYING = ("onecycle", "cosine")


def train(config: TrainConfig | None = None, data=None, reprobe: bool = False, **options: Any) -> dict[str, Any]:
    """Train from a :class:`TrainConfig` (validated here) or keyword options (resolved with :func:`resolve_config`).

    ``data``: ``(train_set, test_set)`` already loaded, instead of loading ``config.dataset``. ``config.out`` must be
    a folder a new run may write (:func:`check_out`); it is checked before any data loads and held for the run.
    ``reprobe``: precision ``auto`` (and ``--budget``'s speeds) measured again, not read from the cache
    (:mod:`vggnet.training.probe`, :mod:`vggnet.training.budget_probe`).
    ``config.budget`` without a ``budget_record``: the recipe is chosen first (:func:`vggnet.training.budget.plan`)."""
    if config is None:
        config = resolve_config(options.pop("preset", None), **options)
    elif options:
        raise ConfigError("pass either a TrainConfig or keyword options, not both")
    config = config.validate()
    if reprobe and config.precision != "auto":
        raise ConfigError(f"--reprobe measures which precision 'auto' trains in, but --precision {config.precision} "
                          "was given: leave out one of them")
    if config.budget is not None and config.budget_record is None:  # --budget: choose the recipe (training.budget)
        if config.out:
            check_out(RunDir(config.out))  # before the data loads and the probe runs
        config, data = plan(config, data, reprobe=reprobe)
    writer = distributed.env_rank() == 0  # under torchrun rank 0 writes; the others only read the folder
    if writer and not config.out:
        config = replace(config, out=str(default_run_dir(config)))  # build_run hands rank 0's name to the others
    if config.out:
        check_out(RunDir(config.out))  # before any data loads
    with deterministic_algorithms(config.deterministic), _session(RunDir(config.out) if writer else None, True):
        return fit(build_run(config, data, reprobe=reprobe))


def check_out(rundir: RunDir) -> None:
    """OutputError unless ``--out`` may be written by a new run (:func:`vggnet.base.guard.new_folder`): a new
    folder, an empty one (but for a lock file and temporary files a killed run left), or a run of vggnet's own
    without a checkpoint (one stopped before its first epoch ended: starting it again loses nothing). A run with a
    checkpoint is resumed, not overwritten; a folder with files vggnet train did not write is someone else's."""
    path = rundir.path
    if path.is_dir() and rundir.has_state():
        raise OutputError(f"{path} already holds a run: continue it with --resume {path}, or choose another --out")

    def blocking(names: list[str]) -> list[str]:
        foreign = [name for name in names if name not in RUN_NAMES]
        if not foreign and (_written_by_vggnet(rundir) or set(names) <= {"tensorboard"}):
            return []  # its own run, stopped before its first checkpoint (--tensorboard's folder comes first)
        return foreign or names

    # No writability check here: the writer creates the folder under its lock at once (one line if it cannot), and
    # the other torchrun ranks write nothing.
    new_folder(path, contents=lambda _: rundir.contents(), blocking=blocking, check_writable=False,
               hint="vggnet train writes only into a new or empty folder or a run of its own without a checkpoint; "
                    "choose another --out")


def _written_by_vggnet(rundir: RunDir) -> bool:
    """Whether the folder's config.json is a training configuration (the mark of a run vggnet train started)."""
    try:
        saved = read_json(rundir.config)
        TrainConfig.from_dict(saved)
    except (CheckpointError, ConfigError, TypeError):
        return False
    return {"model", "dataset", "epochs", "seed"} <= set(saved)


@contextmanager
def _session(rundir: RunDir | None, new: bool) -> Iterator[None]:
    """The writer's hold on ``rundir`` for a whole session (None: a torchrun rank that writes nothing): the lock,
    then the temporary files of killed writes removed; a ``new`` run checks its ``--out`` again under the lock
    (another process may have started there meanwhile), a resumed one completes a save that a kill cut short."""
    if rundir is None:
        yield
        return
    with rundir.lock(create=new):
        rundir.remove_temp_files()
        if new:
            check_out(rundir)
        else:
            rundir.roll_forward()
        yield


def resume(run_dir: str | Path, epochs: int | None = None, **runtime: Any) -> dict[str, Any]:
    """Continue the run in ``run_dir`` exactly where it stopped, optionally to a new total of ``epochs``.

    Extending (``epochs`` beyond the saved total) keeps the learning-rate schedule's length: ``constant`` goes on at
    the base rate, ``step`` at its last rate (1/100), ``plateau`` at its current rate and keeps watching the
    validation accuracy; ``onecycle`` and ``cosine`` end at a learning rate of 0, so their runs cannot be extended
    (start a new run). config.json records the new total only once the first checkpoint of this session is written,
    so a resume that fails leaves it untouched. ``runtime`` may set the :data:`RUNTIME_OPTIONS` for this session.

    A folder that is not a run, or holds no checkpoint, is refused before anything is written; then the run is held
    (its lock) and a save that a kill cut short is completed from its commit before anything is read for training.
    """
    rundir = RunDir(run_dir)
    unknown = set(runtime) - set(RUNTIME_OPTIONS)
    if unknown:
        raise ConfigError(f"resume cannot change {sorted(unknown)}; only {', '.join(RUNTIME_OPTIONS)}")
    rundir.read_config()  # a folder that is not a run, or has no checkpoint, is refused before anything is written
    rundir.read_state_record()
    with _session(rundir if distributed.env_rank() == 0 else None, False):
        return _resume(rundir, epochs, runtime)


def _resume(rundir: RunDir, epochs: int | None, runtime: dict[str, Any]) -> dict[str, Any]:
    """:func:`resume` once the run is held and up to date with its last commit."""
    run_dir = rundir.path
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
    saved = dict(saved, epochs=epochs or config.epochs, schedule_epochs=config.schedule_epochs)
    changes = {key: value for key, value in runtime.items() if value is not None}
    # config.json's values passed _saved_run_config: what fails now is a run-time option's
    config = replace(config, epochs=epochs or config.epochs, out=str(rundir.path), **changes).validate()
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
        # runs written before schedule_epochs was recorded scheduled over their epochs
        config = replace(config, schedule_epochs=config.schedule_epochs or config.epochs).validate()
    except ConfigError as err:
        raise CheckpointError(f"{rundir.config} holds an invalid configuration: {err}") from None
    return config


__all__ = ["DECAYING", "DEFAULT_MODEL", "MODEL_SHAPE", "NORMALIZE", "OPTIMIZERS", "PRESETS", "RUNTIME_OPTIONS",
           "Interrupted", "Run", "TrainConfig", "TrainingDiverged", "build_run", "check_out", "fit", "resolve_config",
           "resume", "seed_epoch", "train", "train_step"]
