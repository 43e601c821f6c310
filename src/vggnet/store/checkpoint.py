"""The checkpoint record: what ``state.safetensors`` commits beside its tensors, and the checks a state record must
pass before a run resumes from it (see :mod:`vggnet.store.rundir` for the commit protocol)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from vggnet.base.errors import CheckpointError
from vggnet.base.schedule import Plateau
from vggnet.base.strictjson import decode_nonfinite, dumps as strict_json

CHECKPOINT_KEY = "vggnet.checkpoint"

#: The scores of the final model with test-time augmentation: in the epoch record of a run's last epoch only, so a
#: run extended later (``--resume --epochs N``) holds them in an earlier record too.
TTA_FIELDS = ("test_loss_tta", "test_acc_tta", "test_top5_tta")


@dataclass
class Checkpoint:
    """What ``state.safetensors`` commits beside its tensors (its metadata): every other file of the run is derived
    from it (see the module docstring)."""

    state: dict[str, Any]  # state.json: the loop's counters (run), the optimizer's non-tensor state, history, scaler
    config: dict[str, Any]  # config.json
    card: dict[str, Any] | None = None  # the epoch's ModelCard: the model/ tensors are its weights; None mid-epoch
    best: bool = False  # the epoch's weights are the best so far (best.safetensors)
    evaluation: dict[str, Any] | None = None  # eval.json: the epoch's test evaluation
    title: str = ""  # the plots' title

    def to_json(self) -> str:
        """The record as strict JSON: a non-finite float (the plateau schedule's initial best, -inf) is a string,
        which :func:`checked_state` decodes (:mod:`vggnet.base.strictjson`)."""
        return strict_json(asdict(self))

    @classmethod
    def from_json(cls, text: str, where: Path) -> "Checkpoint":
        """The checkpoint record ``text`` of the file ``where``; a one-line CheckpointError when it is not one."""
        try:
            d = json.loads(text)
        except (ValueError, RecursionError) as err:
            raise CheckpointError(f"{where} holds a corrupt checkpoint record ({err}): restore it, or start the run "
                                  "again") from None
        types = {"state": dict, "config": dict, "card": (dict, type(None)), "best": bool,
                 "evaluation": (dict, type(None)), "title": str}
        if not (isinstance(d, dict) and set(d) == set(types) and all(isinstance(d[k], t) for k, t in types.items())):
            raise CheckpointError(f"{where} holds a checkpoint record that is not vggnet's ({', '.join(types)}): "
                                  "restore it, or start the run again")
        return cls(**d)


#: The parts of a state record that hold only numbers (and structure, booleans, null): where checked_state decodes.
_NUMERIC_PARTS = ("run", "history", "optimizer", "scaler")


def checked_state(record: Any, where: Path) -> dict[str, Any]:
    """``record`` when it is a usable state record (:func:`_state_problem`), else a one-line CheckpointError naming
    ``where``. Its numbers written as strings (``"-Infinity"``: :mod:`vggnet.base.strictjson`) are numbers again: in
    the counters (the plateau's best among them), the history, the optimizer's and the scaler's records, which hold
    no text of their own. Records of older versions hold the bare tokens, which the JSON reader took already."""
    if not isinstance(record, dict) or not isinstance(record.get("run"), dict):
        raise CheckpointError(f"{where} is corrupt (no run counters)")
    record = {key: decode_nonfinite(value) if key in _NUMERIC_PARTS else value for key, value in record.items()}
    problem = _state_problem(record)
    if problem is not None:
        raise CheckpointError(f"{where} is corrupt ({problem}): restore it, or start the run again")
    return record


@dataclass
class RunState:
    """The loop's position and running sums: what resume needs beyond the tensors."""

    epoch: int = 0  # completed epochs
    batch: int = 0  # batches done in the current (incomplete) epoch
    step: int = 0  # optimizer steps overall
    best_acc: float = -1.0  # best validation accuracy so far (-1: no validation split, or none yet)
    plateau: dict = field(default_factory=lambda: Plateau().to_dict())
    loss_sum: float = 0.0  # current epoch, summed over samples
    correct: int = 0
    seen: int = 0
    seconds: float = 0.0  # current epoch's training time so far


#: state.json's loop counters (the fields of RunState) and their JSON types: a file edited by hand fails on reading,
#: in one line, not deep inside the resumed loop.
STATE_COUNTERS = {f.name: {"int": int, "float": float, "dict": dict}[f.type] for f in fields(RunState)}


def _is_number(value: Any, allow_infinite: bool = False) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and (allow_infinite or math.isfinite(value)))


def _state_problem(record: dict[str, Any]) -> str | None:
    """What makes ``record`` (state.json, a dict with a ``run`` dict) unusable for resume, or ``None``: a counter
    missing or of the wrong type, a plateau that is not vggnet.base.schedule.Plateau's numbers, an optimizer record
    without its param_groups and scalars, a history that is not a list of records of numbers."""
    run = record["run"]
    for key, kind in STATE_COUNTERS.items():
        value = run.get(key)
        if key not in run:
            return f"run.{key} is missing"
        if kind is int and not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            return f"run.{key} must be an integer >= 0, got {value!r}"
        if kind is float and not _is_number(value):
            return f"run.{key} must be a number, got {value!r}"
    plateau = run["plateau"]
    if not isinstance(plateau, dict):
        return f"run.plateau must be an object, got {plateau!r}"
    unknown = sorted(set(plateau) - {f.name for f in fields(Plateau)})
    if unknown or not all(_is_number(v, allow_infinite=True) for v in plateau.values()):
        return f"run.plateau must hold the numbers of a plateau schedule, got {plateau!r}"
    if not (_is_number(plateau.get("scale")) and plateau["scale"] > 0):
        return f"run.plateau.scale must be a positive number, got {plateau.get('scale')!r}"
    optimizer = record.get("optimizer")
    groups = optimizer.get("param_groups") if isinstance(optimizer, dict) else None
    if not (isinstance(groups, list) and all(isinstance(g, dict) for g in groups)
            and isinstance(optimizer.get("scalars"), dict)):
        return "optimizer must be an object with param_groups (a list of objects) and scalars (an object)"
    history = record.get("history", [])
    if not (isinstance(history, list) and all(isinstance(r, dict) and isinstance(r.get("epoch"), int) and all(
            _is_number(v, allow_infinite=True) for v in r.values()) for r in history)):
        return "history must be a list of epoch records of numbers"
    if any(set(r) - set(TTA_FIELDS) != set(history[0]) - set(TTA_FIELDS) for r in history):
        return "history's epoch records must all have the same fields (the test-time augmentation scores aside)"
    if "scaler" in record and not isinstance(record["scaler"], dict):
        return f"scaler must be an object, got {record['scaler']!r}"
    return None
