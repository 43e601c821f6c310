"""The run directory: the only code that knows its file names and formats.

A run directory written by ``vggnet train`` holds:

- ``config.json``: the resolved :class:`~vggnet.train.config.TrainConfig` (what the run computes);
- ``model.safetensors`` + ``model.json``: the final weights and their :class:`ModelCard` (architecture,
  preprocessing, class names, metrics, vggnet version, schema version; for a run made by ``vggnet compress``, the
  :class:`vggnet.compress.Compression` record that restructures the model and says which tensors are float16);
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

Every file is written atomically (:mod:`vggnet.files`). Training, resume, ``vggnet.load``, eval and predict all
read and write through :class:`RunDir` and :class:`ModelCard`.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .errors import CheckpointError, ConfigError, OutputError, VggnetError
from .configs import MAX_CHANNELS, MAX_CLASSES, MAX_IMAGE_SIZE, Conv, parse_arch, scale_width
from .files import (TEMP_NAME, TensorEntry, atomic_write_bytes, atomic_write_json, load_tensors, make_dirs,
                    model_state, read_header, read_json, read_metadata, read_safetensors, remove_temp_files,
                    safetensors_bytes, save_tensors, strip_prefixes)
from .models import VGG, model_from_config
from .schedule import Plateau

#: Schema version of model.json (the ModelCard) and the state files; bump when they change incompatibly.
FORMAT = 1
WEIGHTS = {"model": "model.safetensors", "best": "best.safetensors"}
#: The one metadata key of vggnet's safetensors files (one key: safetensors promises no order for several, and equal
#: runs must write equal bytes): a ModelCard's JSON in model/best.safetensors, a Checkpoint's in state.safetensors.
CARD_KEY = "vggnet.card"
CHECKPOINT_KEY = "vggnet.checkpoint"
#: The lock file of the process writing a run (RunDir.lock).
LOCK_NAME = ".lock"
#: The names vggnet train (and vggnet eval, evals/) writes in a run directory.
RUN_NAMES = frozenset({"config.json", "model.safetensors", "model.json", "best.safetensors", "best.json",
                       "state.safetensors", "state.json", "metrics.jsonl", "metrics.csv", "eval.json", "curves.png",
                       "confusion.png", "tensorboard", "evals"})
#: The largest values a model.json may give beyond vggnet.configs' (MAX_CLASSES, MAX_IMAGE_SIZE, MAX_CHANNELS; VGG-16
#: has 1,000 classes, 4,096 hidden, 224 pixels, 21 layers): beyond them the file is forged or mistyped, and is
#: refused before anything is built or read.
MAX_HIDDEN = 65_536
MAX_LAYERS = 256


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
        problem = _size_problem(card)
        if problem is not None:
            raise CheckpointError(f"{where} is corrupt: {problem}; it was edited or forged, restore it")
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
            with torch.device(device) if device is not None else contextlib.nullcontext(), _skip_init(device):
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


def _skip_init(device: str | torch.device | None):
    """On the meta device, the initialisers do nothing (:class:`vggnet.weights.layout._SkipInit`): the skeleton's
    values are the file's, and running them on meta costs seconds and torch._dynamo's import the first time."""
    if device is None or torch.device(device).type != "meta":
        return contextlib.nullcontext()
    from .weights.layout import _SkipInit

    return _SkipInit()


def _is_int(value: Any, largest: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= largest


def _layer_count(arch: Any) -> int:
    """How many layers ``arch`` (model.json's ``model.arch``) spells, counted without expanding it: d2l blocks
    ``[num_convs, channels]`` give ``num_convs`` + 1 (the pool) each, as :func:`vggnet.configs.blocks_to_arch`
    expands them; a paper letter counts 1 (parse_arch knows it)."""
    if isinstance(arch, str):
        return len(arch.split(","))
    if not isinstance(arch, list):
        return 0  # not an architecture: parse_arch says why
    pairs = all(isinstance(b, list) and len(b) == 2 and all(isinstance(v, int) for v in b) for b in arch)
    return sum(max(b[0], 0) + 1 for b in arch) if arch and pairs else len(arch)


def _size_problem(card: "ModelCard") -> str | None:
    """The first value of ``card`` beyond the bounds above (classes, channels per layer, hidden width, input and
    image sizes, layers), as ``key must ..., got value``; None when all are within them (a key left out takes the
    model's default, which is)."""
    model, prep = card.model, card.preprocess
    ints = [(f"model.{key}", model[key], largest) for key, largest in
            (("num_classes", MAX_CLASSES), ("in_channels", MAX_CHANNELS), ("hidden", MAX_HIDDEN)) if key in model]
    size = model.get("input_size", 224)
    ints += [("model.input_size", side, MAX_IMAGE_SIZE) for side in (size if isinstance(size, list) else [size])]
    ints += [(key, value, MAX_IMAGE_SIZE) for key, value in (("image_size", card.image_size),
             ("preprocess.image_size", prep.get("image_size")), ("preprocess.in_size", prep.get("in_size")))
             if value is not None]
    for key, value, largest in ints:
        if not _is_int(value, largest):
            return f"{key} must be an integer from 1 to {largest}, got {value!r}"
    crop = prep.get("crop_fraction", 1.0)
    prep_size = prep.get("image_size")  # None here is Preprocess's to refuse
    if _is_int(prep_size, MAX_IMAGE_SIZE) and isinstance(crop, (int, float)) and 0 < crop * MAX_IMAGE_SIZE < prep_size:
        return (f"preprocess.crop_fraction {crop!r} decodes images at more than {MAX_IMAGE_SIZE} pixels "
                f"(image_size / crop_fraction)")
    layers = _layer_count(model.get("arch", "D"))
    if layers > MAX_LAYERS:
        return f"model.arch must have at most {MAX_LAYERS} layers, got {layers}"
    try:
        layers = parse_arch(model.get("arch", "D"))
    except (VggnetError, TypeError, ValueError) as err:
        return f"model.arch is not an architecture ({err})"
    try:
        widest = max(conv.channels for conv in scale_width(layers, model.get("width", 1.0)) if isinstance(conv, Conv))
    except (VggnetError, TypeError, ValueError) as err:
        return f"model.width is invalid ({err})"
    if widest > MAX_CHANNELS:
        return f"model.arch at model.width gives a convolution {widest} channels wide, more than {MAX_CHANNELS}"
    return None


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
    # Every key of every record, in order of appearance: the last epoch may carry more (--tta's scores), and a run
    # resumed by a newer vggnet may add keys its first epochs lack (their cells stay empty).
    writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in records for k in r)), restval="")
    writer.writeheader()
    writer.writerows(records)
    return buf.getvalue()


def _json_bytes(obj: Any) -> bytes:
    """``obj`` as vggnet's JSON files hold it (indented, one trailing newline): the bytes a mirror is compared by."""
    return (json.dumps(obj, indent=2) + "\n").encode("utf-8")


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
        from .plots import plot_confusion

        plot_confusion(result["confusion"], result["classes"], png_path, title)


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
        return json.dumps(asdict(self))

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


def _remove_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (deepest first) while they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


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

    @contextmanager
    def lock(self, create: bool = False) -> Iterator[None]:
        """Hold ``RUN/.lock`` (an exclusive ``flock``, holding this process's pid) while the block runs: one writer
        per run. A second one is refused in one line naming the holder's pid. The OS releases a lock when its holder
        dies, so a killed run leaves no stale lock, only the file, which the next writer takes over; the holder
        deletes it on leaving. ``create``: make the folder first, and remove the folders this made if they are
        empty again at the end (a run that fails before writing anything leaves nothing)."""
        made = [p for p in (self.path, *self.path.parents) if not p.exists()] if create else []
        try:
            fd = self._acquire(create)
        except BaseException:
            _remove_empty(made)
            raise
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
            yield
        finally:
            self.lock_file.unlink(missing_ok=True)  # while held: a process waiting on this file then takes a new one
            os.close(fd)
            _remove_empty(made)

    def _acquire(self, create: bool) -> int:
        """The open, flocked lock file; retried when the file was deleted by its last holder between our opening
        and our lock (the lock would then guard a file no one else can see)."""
        import fcntl

        while True:
            if create:
                make_dirs(self.path)
            elif not self.path.is_dir():
                raise CheckpointError(f"run directory {self.path} does not exist")
            try:
                fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:
                continue  # the folder was removed meanwhile
            except OSError as err:
                raise OutputError(f"cannot write {self.lock_file}: {err.strerror or err}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
                os.close(fd)
                raise ConfigError(f"{self.path} is being written by another vggnet process (pid "
                                  f"{holder if holder.isdigit() else 'unknown'}, holding {self.lock_file}): wait for "
                                  "it to finish or stop it, or use another folder") from None
            except OSError as err:
                os.close(fd)
                raise OutputError(f"cannot lock {self.lock_file}: {err.strerror or err}") from None
            try:
                ours = os.fstat(fd)
                current = os.stat(self.lock_file)
                if (ours.st_dev, ours.st_ino) == (current.st_dev, current.st_ino):
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)

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
        from . import __version__

        state = model_state(model)
        disk = strip_prefixes(card.stored_dtypes(model))  # a compressed model may store tensors in another dtype
        card.vggnet_version = __version__
        data = safetensors_bytes({k: v.to(disk[k]) if k in disk else v for k, v in state.items()},
                                 {CARD_KEY: json.dumps(card.to_dict())})
        atomic_write_bytes(self.weights("model"), data)
        atomic_write_json(self.card, card.to_dict())
        if best is not None:
            atomic_write_bytes(self.weights("best"), data)
            atomic_write_json(self.best_card, best)

    def commit(self, tensors: dict[str, torch.Tensor], checkpoint: Checkpoint, plots: bool = False) -> None:
        """Commit a checkpoint: ``state.safetensors`` (``tensors`` and ``checkpoint``) by one rename, then every
        file derived from it (with ``plots``, the plots redrawn too)."""
        from . import __version__

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
            text = json.dumps(checkpoint.card)
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
            return _checked_state(read_json(self.state), self.state)
        return _checked_state(Checkpoint.from_json(text, self.state_tensors).state, self.state_tensors)

    def write_metrics(self, history: list[dict[str, Any]]) -> None:
        _write_changed(self.metrics_jsonl, "".join(json.dumps(r) + "\n" for r in history).encode("utf-8"))
        _write_changed(self.metrics_csv, _to_csv(history).encode("utf-8"))

    def write_eval(self, result: dict[str, Any], title: str, out: str | os.PathLike | None = None,
                   plot: bool = True) -> Path:
        """Training's ``eval.json`` and (with ``plot``) ``confusion.png`` (titled ``title``) in this directory or in
        ``out``; returns where."""
        where = make_dirs(out if out is not None else self.path)
        write_evaluation(result, title, where / self.eval.name, where / self.confusion.name if plot else None)
        return where

    def write_curves(self, history: list[dict[str, Any]], title: str) -> None:
        from .plots import plot_curves

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
        text = read_metadata(path).get(CARD_KEY) if path.is_file() else None
        if text is not None:
            where = f"{path} (its card)"
            try:
                card = json.loads(text)
            except (ValueError, RecursionError) as err:
                raise CheckpointError(f"{where} is corrupt ({err}); it was edited or forged, restore it") from None
            return ModelCard.from_dict(card, where), text
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
        return card, None

    def load(self, weights: str = "model", device: str | torch.device = "cpu") -> LoadedModel:
        """Rebuild the model from its card and load ``weights`` (``model`` or ``best``) into it, in eval mode. The
        card and the tensors come from the same version of the file: a run being trained may replace it between
        the two reads, and then it is read again."""
        path = self.weights(weights)
        for _ in range(3):
            card, text = self._read_card(weights)
            model = card.build(self.card, "meta")
            stored = card.stored_dtypes(model)
            check_header(model, read_header(path), path, stored)  # before any tensor is read: forgeries cost nothing
            tensors, metadata = read_safetensors(path)
            if metadata.get(CARD_KEY) == text:
                load_weights(model, tensors, path, stored)
                return LoadedModel(model.to(device).eval(), card, self.path, weights)
        raise CheckpointError(f"{path} was replaced three times while it was read (a run is writing it): try again")


def _checked_state(record: Any, where: Path) -> dict[str, Any]:
    """``record`` when it is a usable state record (:func:`_state_problem`), else a one-line CheckpointError naming
    ``where``."""
    if not isinstance(record, dict) or not isinstance(record.get("run"), dict):
        raise CheckpointError(f"{where} is corrupt (no run counters)")
    problem = _state_problem(record)
    if problem is not None:
        raise CheckpointError(f"{where} is corrupt ({problem}): restore it, or start the run again")
    return record


#: state.json's loop counters (the fields of vggnet.training.loop.RunState) and their JSON types: a file edited by
#: hand fails on reading, in one line, not deep inside the resumed loop.
STATE_COUNTERS = {"epoch": int, "batch": int, "step": int, "correct": int, "seen": int, "best_acc": float,
                  "loss_sum": float, "seconds": float, "plateau": dict}


def _is_number(value: Any, allow_infinite: bool = False) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and (allow_infinite or math.isfinite(value)))


def _state_problem(record: dict[str, Any]) -> str | None:
    """What makes ``record`` (state.json, a dict with a ``run`` dict) unusable for resume, or ``None``: a counter
    missing or of the wrong type, a plateau that is not vggnet.schedule.Plateau's numbers, an optimizer record
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
    if any(set(r) != set(history[0]) for r in history):
        return "history's epoch records must all have the same fields"
    if "scaler" in record and not isinstance(record["scaler"], dict):
        return f"scaler must be an object, got {record['scaler']!r}"
    return None


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str | os.PathLike,
                 stored: dict[str, torch.dtype] | None = None) -> None:
    """Load ``state`` into ``model`` strictly (its tensors become the model's: ``model`` may be on the meta device);
    one-line CheckpointError naming missing, unexpected, misshapen and mistyped keys. ``stored`` (from
    :meth:`ModelCard.stored_dtypes`) names the keys the file holds in another dtype than the model's, and exactly
    that dtype; they are converted to the model's."""
    stored = stored or {}
    expected = model.state_dict()
    _check_match(expected, {k: (v.shape, v.dtype) for k, v in state.items()}, where, stored)
    model.load_state_dict({k: v.to(expected[k].dtype) if k in stored else v for k, v in state.items()}, assign=True)


def check_header(model: torch.nn.Module, header: dict[str, TensorEntry], where: str | os.PathLike,
                 stored: dict[str, torch.dtype] | None = None) -> None:
    """:func:`load_weights`' check on a file's header (:func:`vggnet.files.read_header`) before its tensors are
    read: the file must declare exactly ``model``'s keys, shapes and dtypes (``stored``'s where it names them)."""
    _check_match(model.state_dict(), {k: (e.shape, e.dtype) for k, e in header.items()}, where, stored or {})


def _check_match(expected: dict[str, torch.Tensor], found: dict[str, tuple[tuple[int, ...], torch.dtype]],
                 where: str | os.PathLike, stored: dict[str, torch.dtype]) -> None:
    """One-line CheckpointError naming the missing, unexpected, misshapen and mistyped keys of ``found`` (key ->
    shape, dtype) against the model's state ``expected``."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    common = set(expected) & set(found)
    wrong = sorted(k for k in common if tuple(expected[k].shape) != tuple(found[k][0]))
    mistyped = sorted(k for k in common if stored.get(k, expected[k].dtype) != found[k][1])
    if missing or unexpected or wrong or mistyped:
        detail = "; ".join(f"{label} {keys[:3]}{'...' if len(keys) > 3 else ''}" for label, keys in
                           (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong),
                            ("wrong dtype", mistyped)) if keys)
        raise CheckpointError(f"{where} does not match the architecture in model.json: {detail}")


def load(source: str | os.PathLike, weights: str = "model", device: str | torch.device = "cpu") -> LoadedModel:
    """The model of the run directory ``source`` with its preprocessing and class names (eval mode)."""
    return RunDir(source).load(weights, device)


def save_model(run_dir: str | os.PathLike, model: torch.nn.Module, card: ModelCard,
               best: dict[str, Any] | None = None) -> None:
    """Write ``model``'s weights and ``card`` into ``run_dir`` (see :meth:`RunDir.save_weights`)."""
    bare = getattr(model, "module", model)
    card.model = getattr(bare, "_orig_mod", bare).config
    RunDir(run_dir).save_weights(model, card, best)

