"""The run directory: the only code that knows its file names and formats.

A run directory written by ``vggnet train`` holds:

- ``config.json``: the resolved :class:`~vggnet.train.config.TrainConfig` (what the run computes);
- ``model.safetensors`` + ``model.json``: the final weights and their :class:`ModelCard` (architecture,
  preprocessing, class names, metrics, vggnet version, schema version; for a run made by ``vggnet compress``, the
  :class:`vggnet.compress.Compression` record that restructures the model and says which tensors are float16);
- ``best.safetensors`` + ``best.json``: the weights of the epoch with the best *validation* accuracy and that
  epoch's metrics; only with a validation split (``--val-split``): the test set never selects anything;
- ``state.safetensors`` + ``state.json``: model, optimizer and RNG tensors, and the loop's counters, for resume;
- ``metrics.jsonl`` / ``metrics.csv``: one record per epoch; ``eval.json``: the last test evaluation;
- ``curves.png``, ``confusion.png``; ``tensorboard/`` with ``--tensorboard``.

Every file is written atomically (:mod:`vggnet.files`). Training, resume, ``vggnet.load``, eval and predict all
read and write through :class:`RunDir` and :class:`ModelCard`.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, VggnetError
from .files import (atomic_write_bytes, atomic_write_json, atomic_write_text, load_tensors, make_dirs, model_state,
                    read_json, safetensors_bytes, save_tensors, strip_prefixes)
from .models import VGG, model_from_config

#: Schema version of model.json (the ModelCard) and the state files; bump when they change incompatibly.
FORMAT = 1
WEIGHTS = {"model": "model.safetensors", "best": "best.safetensors"}


@dataclass
class ModelCard:
    """What ``model.json`` says about a set of weights: enough to rebuild the model and use it."""

    model: dict[str, Any]  # the architecture: VGG.config, rebuilt by vggnet.model_from_config
    classes: list[str]  # classes[i] names output i
    preprocess: dict[str, Any]  # vggnet.data.Preprocess.to_dict()
    dataset: str | None = None  # what it was trained on
    image_size: int | None = None  # the training input size in pixels
    metrics: dict[str, Any] = field(default_factory=dict)  # of the epoch these weights come from
    train_config: dict[str, Any] | None = None  # the TrainConfig, as in config.json
    vggnet_version: str = ""
    format: int = FORMAT
    # vggnet.compress.Compression.to_dict() for a compressed model; not written when None
    compression: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["compression"] is None:
            del d["compression"]  # an ordinary run's model.json stays as it was
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str | os.PathLike = "model.json") -> "ModelCard":
        if not isinstance(d, dict) or "format" not in d or "model" not in d:
            raise CheckpointError(f"{where} is not a vggnet model description (no format/model)")
        if d["format"] != FORMAT:
            raise CheckpointError(f"{where} was written in checkpoint format {d['format']} (vggnet "
                                  f"{d.get('vggnet_version', '?')}); this vggnet reads format {FORMAT}: use a matching "
                                  "vggnet version")
        known = {f.name for f in fields(cls)}
        card = cls(**{k: v for k, v in d.items() if k in known})
        checks = [(isinstance(card.model, dict), "model must be an object"),
                  (isinstance(card.classes, list) and all(isinstance(c, str) for c in card.classes),
                   "classes must be a list of names"),
                  (isinstance(card.preprocess, dict), "preprocess must be an object"),
                  (isinstance(card.metrics, dict), "metrics must be an object")]
        for ok, message in checks:
            if not ok:
                raise CheckpointError(f"{where} is corrupt: {message}")
        if card.compression is not None:
            card._compression(where)  # unknown or malformed compression records fail here, in one line
        return card

    def _compression(self, where: str | os.PathLike = "model.json"):
        from .compress import Compression

        return Compression.from_dict(self.compression, str(where))

    def build(self, where: str | os.PathLike = "model.json", device: str | torch.device | None = None) -> VGG:
        """The model this card describes: randomly initialised, or on ``device="meta"`` only its shapes (to be
        filled by :func:`load_weights`, with no time spent on an initialisation that would be overwritten). A
        compressed model's classifier layers are replaced as its ``compression`` record says
        (:func:`vggnet.compress.restructure`)."""
        record = self._compression(where) if self.compression is not None else None
        try:
            with torch.device(device) if device is not None else contextlib.nullcontext():
                model = model_from_config(self.model)
                if record is not None:
                    from .compress import restructure

                    restructure(model, record)
                return model
        except (VggnetError, TypeError, ValueError) as err:
            raise CheckpointError(f"{where} describes no buildable model: {err}") from None

    def stored_dtypes(self, model: torch.nn.Module) -> dict[str, torch.dtype]:
        """State-dict key -> dtype in the weights file, where the compression record stores it in another dtype
        than ``model`` has (``half``: float16 on disk, float32 in memory); empty for ordinary runs."""
        if self.compression is None:
            return {}
        from .compress import stored_dtypes

        return stored_dtypes(model, self._compression())

    def preprocessing(self):
        from .data import Preprocess

        try:
            return Preprocess.from_dict(self.preprocess)
        except (VggnetError, TypeError, ValueError) as err:
            raise CheckpointError(f"model.json's preprocessing is invalid: {err}") from None


@dataclass
class LoadedModel:
    """A model rebuilt from a run directory, with what is needed to use it."""

    model: VGG
    card: ModelCard
    run_dir: Path | None  # None for a weights file (vggnet.weights)
    weights: str = "model"  # which weights: model (final) or best
    features_only: bool = False  # only the convolutions came from the source; the head is freshly initialised

    def require_head(self, source: str | os.PathLike, verb: str) -> None:
        """CheckpointError when the classifier did not come from the source (a Keras notop file): nothing to
        classify with."""
        if self.features_only:
            raise CheckpointError(f"{source} holds convolutional weights only (no classifier, e.g. a Keras notop "
                                  f"file): there are no classes to {verb}; use it for features (vggnet features) or "
                                  "fine-tuning")

    @property
    def classes(self) -> list[str]:
        return self.card.classes

    @property
    def preprocess(self):
        return self.card.preprocessing()


def _to_csv(records: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(records[0]))
    writer.writeheader()
    writer.writerows(records)
    return buf.getvalue()


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

    def __str__(self) -> str:
        return str(self.path)

    def weights(self, which: str = "model") -> Path:
        if which not in WEIGHTS:
            raise CheckpointError(f"weights must be one of {', '.join(WEIGHTS)}, got {which!r}")
        return self.path / WEIGHTS[which]

    # ---------------------------------------------------------------------------------------------- training
    def has_state(self) -> bool:
        return self.state.is_file()

    def create(self, config: dict[str, Any]) -> None:
        make_dirs(self.path)
        self.write_config(config)

    def read_config(self) -> dict[str, Any]:
        if not self.config.is_file():
            raise CheckpointError(f"{self.path} is not a vggnet run directory to resume (no config.json)")
        return read_json(self.config)

    def write_config(self, config: dict[str, Any]) -> None:
        atomic_write_json(self.config, config)

    def save_weights(self, model: torch.nn.Module, card: ModelCard, best: dict[str, Any] | None = None) -> None:
        """The final weights and ``model.json``; with ``best`` (that epoch's metrics) also ``best.safetensors`` and
        ``best.json``. The weights are serialised once."""
        from . import __version__

        state = model_state(model)
        disk = strip_prefixes(card.stored_dtypes(model))  # a compressed model may store tensors in another dtype
        data = safetensors_bytes({k: v.to(disk[k]) if k in disk else v for k, v in state.items()})
        card.vggnet_version = __version__
        atomic_write_bytes(self.weights("model"), data)
        atomic_write_json(self.card, card.to_dict())
        if best is not None:
            atomic_write_bytes(self.weights("best"), data)
            atomic_write_json(self.best_card, best)

    def save_state(self, tensors: dict[str, torch.Tensor], record: dict[str, Any]) -> None:
        save_tensors(self.state_tensors, tensors)
        atomic_write_json(self.state, record)

    def read_state_record(self) -> dict[str, Any]:
        """``state.json``: the loop's counters (``run``), the optimizer's non-tensor state and the history."""
        if not self.has_state():
            raise CheckpointError(f"{self.path} has no saved training state (state.json): it stopped before its "
                                  "first checkpoint; start it again")
        record = read_json(self.state)
        if not isinstance(record, dict) or not isinstance(record.get("run"), dict):
            raise CheckpointError(f"{self.state} is corrupt (no run counters)")
        return record

    def read_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return self.read_state_record(), load_tensors(self.state_tensors)

    def write_metrics(self, history: list[dict[str, Any]]) -> None:
        atomic_write_text(self.metrics_jsonl, "".join(json.dumps(r) + "\n" for r in history))
        atomic_write_text(self.metrics_csv, _to_csv(history))

    def write_eval(self, result: dict[str, Any], title: str, out: str | os.PathLike | None = None,
                   plot: bool = True) -> Path:
        """``eval.json`` and (with ``plot``) ``confusion.png`` (titled ``title``) in this directory or in ``out``;
        returns where."""
        where = make_dirs(out if out is not None else self.path)
        atomic_write_json(where / self.eval.name, result)
        if plot:
            from .plots import plot_confusion

            plot_confusion(result["confusion"], result["classes"], where / self.confusion.name, title)
        return where

    def write_curves(self, history: list[dict[str, Any]], title: str) -> None:
        from .plots import plot_curves

        plot_curves(history, self.curves, title)

    # ---------------------------------------------------------------------------------------------- using
    def read_card(self, weights: str = "model") -> ModelCard:
        """The card of ``weights``: model.json, with the best epoch's metrics (best.json) for ``best``."""
        if not self.path.is_dir():
            raise CheckpointError(f"run directory {self.path} does not exist")
        if not self.card.is_file():
            raise CheckpointError(f"{self.path} is not a vggnet run directory (no model.json): train one with "
                                  "vggnet train")
        card = ModelCard.from_dict(read_json(self.card), self.card)
        if weights == "best":
            if not self.best_card.is_file():
                raise CheckpointError(f"{self.path} has no best weights: they are kept only for runs with a "
                                      "validation split (vggnet train --val-split N); use the final weights")
            best = read_json(self.best_card)
            card.metrics = dict(best.get("metrics", {})) if isinstance(best, dict) else {}
        return card

    def load(self, weights: str = "model", device: str | torch.device = "cpu") -> LoadedModel:
        """Rebuild the model from ``model.json`` and load ``weights`` (``model`` or ``best``) into it, in eval mode."""
        path = self.weights(weights)
        card = self.read_card(weights)
        model = card.build(self.card, "meta")
        load_weights(model, load_tensors(path), path, card.stored_dtypes(model))
        return LoadedModel(model.to(device).eval(), card, self.path, weights)


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str | os.PathLike,
                 stored: dict[str, torch.dtype] | None = None) -> None:
    """Load ``state`` into ``model`` strictly (its tensors become the model's: ``model`` may be on the meta device);
    one-line CheckpointError naming missing, unexpected, misshapen and mistyped keys. ``stored`` (from
    :meth:`ModelCard.stored_dtypes`) names the keys the file holds in another dtype than the model's, and exactly
    that dtype; they are converted to the model's."""
    stored = stored or {}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    common = set(expected) & set(state)
    wrong = sorted(k for k in common if expected[k].shape != state[k].shape)
    mistyped = sorted(k for k in common if stored.get(k, expected[k].dtype) != state[k].dtype)
    if missing or unexpected or wrong or mistyped:
        detail = "; ".join(f"{label} {keys[:3]}{'...' if len(keys) > 3 else ''}" for label, keys in
                           (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong),
                            ("wrong dtype", mistyped)) if keys)
        raise CheckpointError(f"{where} does not match the architecture in model.json: {detail}")
    model.load_state_dict({k: v.to(expected[k].dtype) if k in stored else v for k, v in state.items()}, assign=True)


def load(source: str | os.PathLike, weights: str = "model", device: str | torch.device = "cpu") -> LoadedModel:
    """The model of the run directory ``source`` with its preprocessing and class names (eval mode)."""
    return RunDir(source).load(weights, device)


def save_model(run_dir: str | os.PathLike, model: torch.nn.Module, card: ModelCard,
               best: dict[str, Any] | None = None) -> None:
    """Write ``model``'s weights and ``card`` into ``run_dir`` (see :meth:`RunDir.save_weights`)."""
    bare = getattr(model, "module", model)
    card.model = getattr(bare, "_orig_mod", bare).config
    RunDir(run_dir).save_weights(model, card, best)

