"""The model card: what a set of weights says about itself, typed, and the one reader of vggnet's weights files.

A :class:`ModelCard` is written as ``model.json`` beside a run's weights and embedded in the weights file itself
(safetensors metadata under :data:`CARD_KEY`), so a ``model.safetensors`` copied out of its run directory still
rebuilds the model and its preprocessing exactly (:func:`load_weights_file`). Every value is checked against the
bounds before anything is built: a forged or mistyped card fails in one line.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import torch

from vggnet.base.errors import CheckpointError, VggnetError
from vggnet.base.files import TensorEntry, read_header, read_metadata, read_safetensors
from vggnet.base.limits import MAX_CHANNELS, MAX_CLASSES, MAX_IMAGE_SIZE
from vggnet.data import Preprocess
from vggnet.data.images import decode_files
from vggnet.net.compressed import Compression, restructure, stored_dtypes
from vggnet.net.configs import Conv, parse_arch, scale_width
from vggnet.net.models import VGG, SkipInit, model_from_config

#: Schema version of model.json (the ModelCard) and the state files; bump when they change incompatibly.
FORMAT = 1
#: The one metadata key of vggnet's safetensors files (one key: safetensors promises no order for several, and equal
#: runs must write equal bytes): a ModelCard's JSON in model/best.safetensors, a Checkpoint's in state.safetensors.
CARD_KEY = "vggnet.card"
#: The largest values a model.json may give beyond vggnet.base.limits' (MAX_CLASSES, MAX_IMAGE_SIZE, MAX_CHANNELS;
#: VGG-16 has 1,000 classes, 4,096 hidden, 224 pixels, 21 layers): beyond them the file is forged or mistyped, and is
#: refused before anything is built or read.
MAX_HIDDEN = 65_536
MAX_LAYERS = 256


@dataclass(frozen=True)
class ModelSpec:
    """The architecture a card rebuilds: the arguments of :class:`~vggnet.net.models.VGG` (its ``config``), typed.
    A key a card leaves out takes VGG's default, as it always did."""

    name: str = "custom"
    arch: str | list = "D"  # a paper letter, a spec string or the JSON list (vggnet.net.configs)
    batch_norm: bool = False
    num_classes: int = 1000
    in_channels: int = 3
    dropout: float = 0.5
    width: float = 1.0
    head: str = "classic"
    input_size: int | list[int] = 224  # pixels: one side, or [height, width]
    hidden: int = 4096  # width of the classic/fitted head's hidden layers
    init: str = "torchvision"

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str | os.PathLike = "model.json") -> "ModelSpec":
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise CheckpointError(f"{where} is corrupt: model has unknown keys {unknown}; it was edited or forged, or "
                                  "written by another vggnet version")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: The metrics a card may carry: of the epoch its weights come from (vggnet train), or the official ones of a
#: weights file (ImageNet). Fractions, losses per sample.
METRICS = ("epoch", "val_acc", "val_top5", "val_loss", "test_acc", "test_top5", "test_loss", "test_acc_tta",
           "test_top5_tta", "test_loss_tta", "imagenet_top1", "imagenet_top5")


@dataclass
class CardMetrics:
    """A card's metrics, read by field; a metric not measured is None (and not written)."""

    epoch: int | None = None
    val_acc: float | None = None
    val_top5: float | None = None
    val_loss: float | None = None
    test_acc: float | None = None
    test_top5: float | None = None
    test_loss: float | None = None
    test_acc_tta: float | None = None
    test_top5_tta: float | None = None
    test_loss_tta: float | None = None
    imagenet_top1: float | None = None
    imagenet_top5: float | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str | os.PathLike = "model.json") -> "CardMetrics":
        unknown = sorted(set(d) - set(METRICS))
        if unknown:
            raise CheckpointError(f"{where} is corrupt: metrics has unknown keys {unknown} (known: "
                                  f"{', '.join(METRICS)})")
        bad = [k for k, v in d.items() if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)))]
        if bad:
            raise CheckpointError(f"{where} is corrupt: metrics.{bad[0]} must be a number, got {d[bad[0]]!r}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class ModelCard:
    """What ``model.json`` says about a set of weights, typed: enough to rebuild the model (:attr:`model`) and use
    it (:attr:`classes`, :attr:`preprocess`). Dicts given for the typed fields are read into their types."""

    model: ModelSpec  # the architecture (VGG.config), rebuilt by vggnet.net.models.model_from_config
    classes: list[str]  # classes[i] names output i
    preprocess: Preprocess  # how images become the model's input
    dataset: str | None = None  # what it was trained on
    image_size: int | None = None  # the training input size in pixels
    metrics: CardMetrics = field(default_factory=CardMetrics)  # of the epoch these weights come from
    train_config: dict[str, Any] | None = None  # the TrainConfig, as in config.json
    vggnet_version: str = ""
    format: int = FORMAT
    compression: Compression | None = None  # how a compressed model's classifier is restructured; not written when None

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = ModelSpec.from_dict(self.model)
        if isinstance(self.preprocess, dict):
            self.preprocess = _preprocess(self.preprocess)
        if isinstance(self.metrics, dict):
            self.metrics = CardMetrics.from_dict(self.metrics)
        if isinstance(self.compression, dict):
            self.compression = Compression.from_dict(self.compression)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d.update(model=self.model.to_dict(), preprocess=self.preprocess.to_dict(), metrics=self.metrics.to_dict(),
                 classes=list(self.classes))
        if self.compression is None:
            del d["compression"]  # an ordinary run's model.json stays as it was
        else:
            d["compression"] = self.compression.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str | os.PathLike = "model.json") -> "ModelCard":
        """The card of the JSON object ``d`` read from ``where``: every value checked (types, bounds) before anything
        is built; a one-line CheckpointError naming ``where`` otherwise."""
        if not isinstance(d, dict) or "format" not in d or "model" not in d:
            raise CheckpointError(f"{where} is not a vggnet model description (no format/model)")
        if d["format"] != FORMAT:
            raise CheckpointError(f"{where} was written in checkpoint format {d['format']} (vggnet "
                                  f"{d.get('vggnet_version', '?')}); this vggnet reads format {FORMAT}: use a matching "
                                  "vggnet version")
        raw = {f.name: d[f.name] for f in fields(cls) if f.name in d}
        checks = [(isinstance(raw["model"], dict), "model must be an object"),
                  (isinstance(raw.get("classes"), list) and all(isinstance(c, str) for c in raw["classes"]),
                   "classes must be a list of names"),
                  (isinstance(raw.get("preprocess"), dict), "preprocess must be an object"),
                  (isinstance(raw.get("metrics", {}), dict), "metrics must be an object")]
        for ok, message in checks:
            if not ok:
                raise CheckpointError(f"{where} is corrupt: {message}")
        problem = _size_problem(raw["model"], raw["preprocess"], raw.get("image_size"))
        if problem is not None:
            raise CheckpointError(f"{where} is corrupt: {problem}; it was edited or forged, restore it")
        raw["model"] = ModelSpec.from_dict(raw["model"], where)
        raw["preprocess"] = _preprocess(raw["preprocess"], where)
        raw["metrics"] = CardMetrics.from_dict(raw.get("metrics", {}), where)
        if raw.get("compression") is not None:
            raw["compression"] = Compression.from_dict(raw["compression"], str(where))
        return cls(**raw)

    def build(self, where: str | os.PathLike = "model.json", device: str | torch.device | None = None) -> VGG:
        """The model this card describes: randomly initialised, or on ``device="meta"`` only its shapes (to be
        filled by :func:`load_weights`, with no time spent on an initialisation that would be overwritten). A
        compressed model's classifier layers are replaced as its ``compression`` record says
        (:func:`vggnet.net.compressed.restructure`)."""
        meta = device is not None and torch.device(device).type == "meta"
        try:
            with torch.device(device) if device is not None else contextlib.nullcontext(), \
                    SkipInit() if meta else contextlib.nullcontext():
                model = model_from_config(self.model.to_dict())
                if self.compression is not None:
                    restructure(model, self.compression)
                return model
        except (VggnetError, TypeError, ValueError) as err:
            raise CheckpointError(f"{where} describes no buildable model: {err}") from None

    def stored_dtypes(self, model: torch.nn.Module) -> dict[str, torch.dtype]:
        """State-dict key -> dtype in the weights file, where the compression record stores it in another dtype
        than ``model`` has (``half``: float16 on disk, float32 in memory); empty for ordinary runs."""
        return {} if self.compression is None else stored_dtypes(model, self.compression)


def _preprocess(d: Any, where: str | os.PathLike = "model.json") -> Preprocess:
    try:
        return Preprocess.from_dict(d)
    except (VggnetError, TypeError, ValueError) as err:
        raise CheckpointError(f"{where}'s preprocessing is invalid: {err}") from None


def _is_int(value: Any, largest: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= largest


def _layer_count(arch: Any) -> int:
    """How many layers ``arch`` (model.json's ``model.arch``) spells, counted without expanding it: d2l blocks
    ``[num_convs, channels]`` give ``num_convs`` + 1 (the pool) each, as :func:`vggnet.net.configs.blocks_to_arch`
    expands them; a paper letter counts 1 (parse_arch knows it)."""
    if isinstance(arch, str):
        return len(arch.split(","))
    if not isinstance(arch, list):
        return 0  # not an architecture: parse_arch says why
    pairs = all(isinstance(b, list) and len(b) == 2 and all(isinstance(v, int) for v in b) for b in arch)
    return sum(max(b[0], 0) + 1 for b in arch) if arch and pairs else len(arch)


def _size_problem(model: dict[str, Any], prep: dict[str, Any], image_size: Any) -> str | None:
    """The first value of ``card`` beyond the bounds above (classes, channels per layer, hidden width, input and
    image sizes, layers), as ``key must ..., got value``; None when all are within them (a key left out takes the
    model's default, which is)."""
    ints = [(f"model.{key}", model[key], largest) for key, largest in
            (("num_classes", MAX_CLASSES), ("in_channels", MAX_CHANNELS), ("hidden", MAX_HIDDEN)) if key in model]
    size = model.get("input_size", 224)
    ints += [("model.input_size", side, MAX_IMAGE_SIZE) for side in (size if isinstance(size, list) else [size])]
    ints += [(key, value, MAX_IMAGE_SIZE) for key, value in (("image_size", image_size),
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
    run_dir: Path | None  # None for a weights file (vggnet.store.weights)
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

    def decode_files(self, files: Sequence[str | os.PathLike]
                     ) -> tuple[torch.Tensor | None, list[int], list[tuple[int, str]]]:
        """Image files decoded as this model's training images were (:func:`vggnet.data.images.decode_files`): at
        the native input size (``preprocess.decode_size``: ``in_size``, else ``image_size / crop_fraction``, e.g.
        256 for ImageNet weights, whose preprocessing then crops the centre 224) with the model's channel count.
        The one decoder of predict, features, explain and export."""
        return decode_files(files, self.preprocess.decode_size, int(self.model.in_channels))

    @property
    def preprocess(self) -> Preprocess:
        return self.card.preprocess


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
    """:func:`load_weights`' check on a file's header (:func:`vggnet.base.files.read_header`) before its tensors are
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


# ------------------------------------------------------------------------------------------------------ reading
def read_embedded_card(path: str | os.PathLike) -> tuple[ModelCard, str] | None:
    """The card embedded in the safetensors file ``path`` and its text as written; None when the file has none (a
    safetensors file that vggnet did not write)."""
    text = read_metadata(path).get(CARD_KEY)
    if text is None:
        return None
    where = f"{path} (its card)"
    try:
        record = json.loads(text)
    except (ValueError, RecursionError) as err:
        raise CheckpointError(f"{where} is corrupt ({err}); it was edited or forged, restore it") from None
    return ModelCard.from_dict(record, where), text


def load_carded(path: str | os.PathLike, card: ModelCard, text: str | None, where: str | os.PathLike,
                device: str | torch.device = "cpu") -> VGG | None:
    """The model ``card`` describes with the weights of ``path`` loaded strictly, in eval mode on ``device``; None
    when the file's embedded card is no longer ``text`` (a run replaced the file between the two reads: read both
    again). The header is checked before any tensor is read, so a forged file costs nothing."""
    model = card.build(where, "meta")
    stored = card.stored_dtypes(model)
    check_header(model, read_header(path), path, stored)
    tensors, metadata = read_safetensors(path)
    if metadata.get(CARD_KEY) != text:
        return None
    load_weights(model, tensors, path, stored)
    return model.to(device).eval()


def load_weights_file(path: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedModel | None:
    """A vggnet weights file (a run's ``model.safetensors`` or ``best.safetensors``, copied anywhere) loaded with the
    card inside it: the same model, classes and preprocessing as its run directory gives. None when the file carries
    no card (then it is another toolkit's, for :mod:`vggnet.store.weights`)."""
    for _ in range(3):
        carded = read_embedded_card(path)
        if carded is None:
            return None
        card, text = carded
        model = load_carded(path, card, text, f"{path} (its card)", device)
        if model is not None:
            return LoadedModel(model, card, None, "model")
    raise CheckpointError(f"{path} was replaced three times while it was read (a run is writing it): try again")
