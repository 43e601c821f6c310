"""The run directory: the only code that knows its file names and formats.

A run directory written by ``vggnet train`` holds:

- ``config.json``: the resolved :class:`~vggnet.training.config.TrainConfig` (what the run computes);
- ``model.safetensors`` + ``model.json``: the final weights and their :class:`ModelCard` (architecture,
  preprocessing, class names, metrics, vggnet version, schema version; for a run made by ``vggnet compress``, the
  :class:`vggnet.use.compress.Compression` record that restructures the model and says which tensors are float16);
- ``best.safetensors`` + ``best.json``: the weights of the epoch with the best *validation* accuracy and that
  epoch's metrics; only with a validation split (``--val-split``): the test set never selects anything;
- ``state.safetensors`` + ``state.json``: model, optimizer and RNG tensors, and the loop's counters, for resume;
- ``metrics.jsonl`` / ``metrics.csv``: one record per epoch; ``eval.json``: the last epoch's test evaluation;
- ``curves.png``, ``confusion.png``; ``tensorboard/`` with ``--tensorboard``; ``evals/`` with what ``vggnet eval``
  measured later (``evals/PROTOCOL.json`` and ``.png``: eval never writes over training's files);
- ``.lock`` while a process writes the run (see :meth:`RunDir.lock`).

**One commit per checkpoint.** A checkpoint is committed by one rename: ``state.safetensors``, written first, holds
beside its tensors the whole :class:`Checkpoint` in its safetensors metadata: state.json's record (counters,
optimizer, history), config.json, the epoch's :class:`ModelCard`, whether the epoch is the best so far, and its
test evaluation. Every other file is derived from it and written after it (:meth:`RunDir.commit`): the weights
(from the state's ``model/`` tensors, with their card in their own metadata, so that each weights file says by
itself which epoch it holds), model.json and best.json, the metrics, eval.json, the plots, config.json, and
state.json last, as the mark that the save completed. A process killed anywhere in between leaves every file
whole (atomic renames) and the commit either done or not: resume reads only ``state.safetensors``, and before it
trains :meth:`RunDir.roll_forward` rewrites what lags behind the commit (state.json differs from the committed
record). Derivable: all of the files above except the plots' pixels, which are redrawn; a mid-epoch checkpoint
(a stop by a signal) carries no card or evaluation, since its ``model/`` tensors are not an epoch's weights, and
derives only config.json, the metrics and state.json. Loading prefers the card inside the weights file; model.json
and state.json are readable mirrors (when they disagree, the embedded records win). Runs written before the
records were embedded load and resume from model.json and state.json as before.

A single commit file was chosen over generation folders and a pointer renamed last: the file names users, docs and
scripts know stay where they are, and a reader needs no indirection.

Every file is written atomically (:mod:`vggnet.base.files`). Training, resume, ``vggnet.load``, eval and predict all
read and write through :class:`RunDir` and :class:`ModelCard`.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
from pathlib import Path
from typing import Any, Callable

import torch

from vggnet.base.errors import CheckpointError
from vggnet.base.files import (TEMP_NAME, atomic_write_bytes, atomic_write_json, load_tensors, make_dirs, model_state,
                               read_json, read_metadata, read_safetensors, remove_temp_files, safetensors_bytes,
                               save_tensors, strip_prefixes)
from vggnet.base.plots import plot_confusion, plot_curves
from vggnet.base.strictjson import dumps as strict_json
from vggnet.base.version import __version__
from vggnet.store.card import CARD_KEY, CardMetrics, LoadedModel, ModelCard, ModelSpec, load_carded, read_embedded_card
from vggnet.store.checkpoint import CHECKPOINT_KEY, Checkpoint, checked_state
from vggnet.base.lock import LOCK_NAME, hold

WEIGHTS = {"model": "model.safetensors", "best": "best.safetensors"}
#: The names vggnet train (and vggnet eval, evals/) writes in a run directory.
RUN_NAMES = frozenset({"config.json", "model.safetensors", "model.json", "best.safetensors", "best.json",
                       "state.safetensors", "state.json", "metrics.jsonl", "metrics.csv", "eval.json", "curves.png",
                       "confusion.png", "tensorboard", "evals"})


def _to_csv(records: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    # Every key of every record, in order of appearance: the last epoch may carry more (--tta's scores), and a run
    # resumed by a newer vggnet may add keys its first epochs lack (their cells stay empty).
    writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in records for k in r)), restval="")
    writer.writeheader()
    writer.writerows(records)
    return buf.getvalue()


def _json_bytes(obj: Any) -> bytes:
    """``obj`` as vggnet's JSON files hold it (strict JSON: non-finite floats as strings, :mod:`vggnet.base.strictjson`;
    indented, one trailing newline): the bytes a mirror is compared by."""
    return (strict_json(obj, indent=2) + "\n").encode("utf-8")


def _write_changed(path: Path, data: bytes) -> None:
    """``data`` into ``path`` unless the file holds exactly these bytes already (an unchanged config.json; a file a
    roll-forward finds up to date)."""
    try:
        if path.stat().st_size == len(data) and path.read_bytes() == data:
            return
    except OSError:
        pass
    atomic_write_bytes(path, data)


def write_evaluation(result: dict[str, Any], title: str, json_path: Path, png_path: Path | None = None) -> None:
    """An evaluation's record into ``json_path`` and, with ``png_path``, its confusion matrix drawn there, titled
    ``title`` (the folder is made)."""
    make_dirs(json_path.parent)
    atomic_write_json(json_path, result)
    if png_path is not None:
        plot_confusion(result["confusion"], result["classes"], png_path, title)


def _model_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights among a state's tensors (``model/`` keys), with the wrappers' prefixes stripped."""
    return strip_prefixes({k[len("model/"):]: v for k, v in state.items() if k.startswith("model/")})


class RunDir:
    """One run directory (see the module docstring). Paths are attributes; methods read and write whole files."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.config = self.path / "config.json"
        self.card = self.path / "model.json"
        self.best_card = self.path / "best.json"
        self.state_tensors = self.path / "state.safetensors"
        self.state = self.path / "state.json"
        self.metrics_jsonl = self.path / "metrics.jsonl"
        self.metrics_csv = self.path / "metrics.csv"
        self.eval = self.path / "eval.json"
        self.curves = self.path / "curves.png"
        self.confusion = self.path / "confusion.png"
        self.tensorboard = self.path / "tensorboard"
        self.evals = self.path / "evals"
        self.lock_file = self.path / LOCK_NAME

    def __str__(self) -> str:
        return str(self.path)

    def weights(self, which: str = "model") -> Path:
        if which not in WEIGHTS:
            raise CheckpointError(f"weights must be one of {', '.join(WEIGHTS)}, got {which!r}")
        return self.path / WEIGHTS[which]

    # ---------------------------------------------------------------------------------------------- the folder
    def contents(self) -> list[str]:
        """The names in the folder, without the lock file and the temporary files of killed writes; empty when the
        folder does not exist."""
        try:
            names = os.listdir(self.path)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(n for n in names if n != LOCK_NAME and not TEMP_NAME.match(n))

    def is_run(self) -> bool:
        """Whether the folder holds a vggnet model or checkpoint (what vggnet.load or --resume would read)."""
        return any(p.exists() for p in (self.card, self.weights("model"), self.state_tensors, self.state))

    def remove_temp_files(self) -> list[str]:
        """Delete the temporary files killed writes left in the folder (only under :meth:`lock`: no other process
        writes it then); returns their names."""
        return remove_temp_files(self.path)

    def lock(self, create: bool = False) -> contextlib.AbstractContextManager[None]:
        """Hold ``RUN/.lock`` while the block runs: one writer per run (:func:`vggnet.base.lock.hold`)."""
        return hold(self.path, self.lock_file, create)

    # ---------------------------------------------------------------------------------------------- training
    def has_state(self) -> bool:
        """Whether a checkpoint was committed (state.safetensors; state.json in runs of older versions)."""
        return self.state_tensors.is_file() or self.state.is_file()

    def create(self, config: dict[str, Any]) -> None:
        make_dirs(self.path)
        self.write_config(config)

    def read_config(self) -> dict[str, Any]:
        """``config.json``; the committed checkpoint's copy instead while its save is incomplete (a kill during it:
        config.json may still hold the configuration before a ``--resume --epochs`` extension)."""
        if not self.config.is_file():
            raise CheckpointError(f"{self.path} is not a vggnet run directory to resume (no config.json)")
        pending = self.pending_checkpoint()
        return dict(pending.config) if pending is not None else read_json(self.config)

    def write_config(self, config: dict[str, Any]) -> None:
        atomic_write_json(self.config, config)

    def save_weights(self, model: torch.nn.Module, card: ModelCard, best: dict[str, Any] | None = None) -> None:
        """The final weights (their card in their metadata) and ``model.json``; with ``best`` (that epoch's metrics)
        also ``best.safetensors`` and ``best.json``. The weights are serialised once."""
        state = model_state(model)
        disk = strip_prefixes(card.stored_dtypes(model))  # a compressed model may store tensors in another dtype
        card.vggnet_version = __version__
        data = safetensors_bytes({k: v.to(disk[k]) if k in disk else v for k, v in state.items()},
                                 {CARD_KEY: strict_json(card.to_dict())})
        atomic_write_bytes(self.weights("model"), data)
        atomic_write_json(self.card, card.to_dict())
        if best is not None:
            atomic_write_bytes(self.weights("best"), data)
            atomic_write_json(self.best_card, best)

    def commit(self, tensors: dict[str, torch.Tensor], checkpoint: Checkpoint, plots: bool = False) -> None:
        """Commit a checkpoint: ``state.safetensors`` (``tensors`` and ``checkpoint``) by one rename, then every
        file derived from it (with ``plots``, the plots redrawn too)."""
        if checkpoint.card is not None:
            checkpoint.card = dict(checkpoint.card, vggnet_version=__version__)
        save_tensors(self.state_tensors, tensors, {CHECKPOINT_KEY: checkpoint.to_json()})
        self._derive(checkpoint, lambda: tensors, plots)

    def read_checkpoint(self) -> Checkpoint | None:
        """The committed checkpoint record (from state.safetensors' header alone); None without one, or for a run
        of an older version (its state.json is the record)."""
        if not self.state_tensors.is_file():
            return None
        text = read_metadata(self.state_tensors).get(CHECKPOINT_KEY)
        return Checkpoint.from_json(text, self.state_tensors) if text is not None else None

    def pending_checkpoint(self) -> Checkpoint | None:
        """The committed checkpoint while the files derived from it lag behind (state.json, written last, does not
        hold its record: the save was cut short); None when they are up to date."""
        checkpoint = self.read_checkpoint()
        if checkpoint is None:
            return None
        try:
            if self.state.read_bytes() == _json_bytes(checkpoint.state):
                return None
        except OSError:
            pass
        return checkpoint

    def roll_forward(self) -> bool:
        """Bring every file derived from the committed checkpoint up to it, after a kill during a save (only under
        :meth:`lock`). The weights are rewritten from the state's tensors only where their embedded card is not the
        checkpoint's; the plots are redrawn. Returns whether anything lagged."""
        checkpoint = self.pending_checkpoint()
        if checkpoint is None:
            return False
        self._derive(checkpoint, lambda: load_tensors(self.state_tensors), plots=checkpoint.evaluation is not None)
        return True

    def _derive(self, checkpoint: Checkpoint, tensors: Callable[[], dict[str, torch.Tensor]], plots: bool) -> None:
        """The files derived from ``checkpoint`` (``tensors()`` gives the state's tensors, read only if weights are
        to be written), each skipped where it holds its content already; state.json last."""
        if checkpoint.card is not None:
            text = strict_json(checkpoint.card)
            data = None
            for which, wanted in (("model", True), ("best", checkpoint.best)):
                if wanted and self._card_text(which) != text:
                    data = data or safetensors_bytes(_model_tensors(tensors()), {CARD_KEY: text})
                    atomic_write_bytes(self.weights(which), data)
            _write_changed(self.card, _json_bytes(checkpoint.card))
            if checkpoint.best:
                metrics = checkpoint.card["metrics"]
                _write_changed(self.best_card, _json_bytes({"epoch": metrics["epoch"], "metrics": metrics}))
        history = checkpoint.state.get("history", [])
        if history:
            self.write_metrics(history)
        if checkpoint.evaluation is not None:
            top1 = checkpoint.evaluation["top1"]
            self.write_eval(checkpoint.evaluation, f"{checkpoint.title}: test top-1 {100 * top1:.2f}%", plot=plots)
        if plots and history:
            self.write_curves(history, checkpoint.title)
        _write_changed(self.config, _json_bytes(checkpoint.config))
        _write_changed(self.state, _json_bytes(checkpoint.state))

    def _card_text(self, which: str) -> str | None:
        """The card embedded in the ``which`` weights file as written, or None (no file, no card, unreadable)."""
        try:
            return read_metadata(self.weights(which)).get(CARD_KEY)
        except CheckpointError:
            return None

    def read_state_record(self) -> dict[str, Any]:
        """The committed record of the loop's counters (``run``), the optimizer's non-tensor state and the history:
        from state.safetensors' header (state.json for runs of older versions), checked."""
        self._require_state()
        metadata = read_metadata(self.state_tensors) if self.state_tensors.is_file() else {}
        return self._record(metadata)

    def read_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """The committed record (:meth:`read_state_record`) and the state's tensors, from one opening of
        state.safetensors."""
        self._require_state()
        tensors, metadata = read_safetensors(self.state_tensors)
        return self._record(metadata), tensors

    def _require_state(self) -> None:
        if not self.has_state():
            raise CheckpointError(f"{self.path} has no saved training state (no state.safetensors or state.json): it "
                                  f"stopped before its first checkpoint; start it again (vggnet train --out "
                                  f"{self.path})")

    def _record(self, metadata: dict[str, str]) -> dict[str, Any]:
        """The checked state record of state.safetensors' ``metadata``; state.json's where it has none (a run of an
        older version)."""
        text = metadata.get(CHECKPOINT_KEY)
        if text is None:
            return checked_state(read_json(self.state), self.state)
        return checked_state(Checkpoint.from_json(text, self.state_tensors).state, self.state_tensors)

    def write_metrics(self, history: list[dict[str, Any]]) -> None:
        _write_changed(self.metrics_jsonl, "".join(strict_json(r) + "\n" for r in history).encode("utf-8"))
        _write_changed(self.metrics_csv, _to_csv(history).encode("utf-8"))

    def write_eval(self, result: dict[str, Any], title: str, out: str | os.PathLike | None = None,
                   plot: bool = True) -> Path:
        """Training's ``eval.json`` and (with ``plot``) ``confusion.png`` (titled ``title``) in this directory or in
        ``out``; returns where."""
        where = make_dirs(out if out is not None else self.path)
        write_evaluation(result, title, where / self.eval.name, where / self.confusion.name if plot else None)
        return where

    def eval_files(self, name: str) -> tuple[Path, Path]:
        """Where ``vggnet eval`` writes the evaluation ``name`` of this run: ``evals/NAME.json`` and ``.png`` (never
        over training's own eval.json and confusion.png)."""
        return self.evals / f"{name}.json", self.evals / f"{name}.png"

    def write_curves(self, history: list[dict[str, Any]], title: str) -> None:
        plot_curves(history, self.curves, title)

    # ---------------------------------------------------------------------------------------------- using
    def read_card(self, weights: str = "model") -> ModelCard:
        """The card of ``weights``: the one inside the weights file; for runs of older versions model.json, with the
        best epoch's metrics (best.json) for ``best``."""
        return self._read_card(weights)[0]

    def _read_card(self, weights: str) -> tuple[ModelCard, str | None]:
        """The card of ``weights`` and the embedded card's text it came from (None: from model.json)."""
        if not self.path.is_dir():
            raise CheckpointError(f"run directory {self.path} does not exist")
        path = self.weights(weights)
        carded = read_embedded_card(path) if path.is_file() else None
        if carded is not None:
            return carded
        if not self.card.is_file():
            raise CheckpointError(f"{self.path} is not a vggnet run directory (no model.json): train one with "
                                  "vggnet train")
        card = ModelCard.from_dict(read_json(self.card), self.card)
        if weights == "best":
            if not self.best_card.is_file():
                raise CheckpointError(f"{self.path} has no best weights: they are kept only for runs with a "
                                      "validation split (vggnet train --val-split N); use the final weights")
            best = read_json(self.best_card)
            card.metrics = CardMetrics.from_dict(dict(best.get("metrics", {})) if isinstance(best, dict) else {},
                                                 self.best_card)
        return card, None

    def load(self, weights: str = "model", device: str | torch.device = "cpu") -> LoadedModel:
        """Rebuild the model from its card and load ``weights`` (``model`` or ``best``) into it, in eval mode. The
        card and the tensors come from the same version of the file: a run being trained may replace it between
        the two reads, and then it is read again."""
        path = self.weights(weights)
        for _ in range(3):
            card, text = self._read_card(weights)
            model = load_carded(path, card, text, self.card, device)
            if model is not None:
                return LoadedModel(model, card, self.path, weights)
        raise CheckpointError(f"{path} was replaced three times while it was read (a run is writing it): try again")


def load(source: str | os.PathLike, weights: str = "model", device: str | torch.device = "cpu") -> LoadedModel:
    """The model of the run directory ``source`` with its preprocessing and class names (eval mode)."""
    return RunDir(source).load(weights, device)


def save_model(run_dir: str | os.PathLike, model: torch.nn.Module, card: ModelCard,
               best: dict[str, Any] | None = None) -> None:
    """Write ``model``'s weights and ``card`` into ``run_dir`` (see :meth:`RunDir.save_weights`)."""
    bare = getattr(model, "module", model)
    card.model = ModelSpec.from_dict(getattr(bare, "_orig_mod", bare).config)
    RunDir(run_dir).save_weights(model, card, best)
