"""Weights trained elsewhere: torchvision ``.pth``, timm safetensors and Keras ``.h5`` files, read into vggnet's VGG.

One entry point, :func:`load_file` (what :func:`vggnet.load` calls for a file)::

    loaded = vggnet.store.weights.load_file("vgg16-397923af.pth")     # model (eval mode), ModelCard, ImageNet classes
    loaded = vggnet.load("vgg16-397923af.pth")                  # the same
    model = vggnet.create_model("vgg16", weights="vgg16-397923af.pth")   # strictly into that architecture

What a file is follows from its content, never its name: the first bytes tell the container (a ``torch.save`` zip or
legacy pickle, safetensors, HDF5), the keys tell the layout (torchvision's -- also vggnet's own --, timm's, Keras'),
and the keys and shapes tell the architecture (:mod:`vggnet.store.weights.layout`: which of the twelve registry models,
at which width, BN or not, input channels, head, classes). ``model=`` overrides the architecture and the file must
then fit it exactly. The one thing a name does: a torchvision-style ``NAME-HEX.pth`` (8 or more hex digits) names the
start of the file's SHA-256, and that is checked before anything else is read.

Every file comes with its preprocessing and class names (:mod:`vggnet.store.weights.imagenet`): torchvision's convention
for torchvision and timm files, Caffe's (BGR, mean pixel subtracted) for Keras files; the 1,000 ImageNet names when
the head has 1,000 outputs, else none (outputs are then numbered). A file without a classifier (Keras ``notop``) is
*features only*: its weights load into ``model.features``; the head is the architecture's own (classic, 4096 hidden,
1000 outputs unless ``model=``/keywords say otherwise) freshly initialised, ``LoadedWeights.features_only`` is True
and ``vggnet predict``/``eval`` refuse it -- use it for features (``forward_features``, ``vggnet features``) or to
fine-tune a new head. Every error is a one-line :class:`vggnet.base.errors.CheckpointError` naming the file.

Modules: :mod:`~vggnet.store.weights.pth` (torch.save files), :mod:`~vggnet.store.weights.timm`, :mod:`~vggnet.store.weights.keras`
(format mappings), :mod:`~vggnet.store.weights.layout` (detection, strict loading), :mod:`~vggnet.store.weights.official` (the
eight torchvision files, ``vggnet weights list/fetch``), :mod:`~vggnet.store.weights.info` (``vggnet weights info``),
:mod:`~vggnet.store.weights.imagenet` (class names, conventions).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from vggnet.base.errors import CheckpointError
from vggnet.net.models import VGG, create_model
from vggnet.store.card import LoadedModel, ModelCard
from vggnet.store.weights.layout import Architecture, check_fits, complete_batch_norm, detect, empty_model, load_strict
from vggnet.store.weights.official import OFFICIAL, Official, by_file_name, sha256_prefix
from vggnet.base.files import load_tensors, strip_prefixes
from vggnet.base.version import __version__
from vggnet.data.fetch import digest_matches, file_digest
from vggnet.store.weights import imagenet, keras, pth, timm

CONTAINERS = ("torch-zip", "torch-legacy", "safetensors", "hdf5")
FORMATS = ("torchvision", "timm", "keras")  # layouts; torchvision's is also vggnet's own model.safetensors


@dataclass
class WeightsFile:
    """A weights file read into vggnet's layout, with what is needed to build and use its model."""

    path: Path
    format: str  # the layout: torchvision (also vggnet's own), timm or keras
    container: str  # torch-zip, torch-legacy, safetensors or hdf5
    state: dict[str, torch.Tensor]  # in vggnet's layout; features.* only when features_only
    arch: Architecture  # what the keys and shapes say
    card: ModelCard  # architecture (model config), classes, preprocessing, official metrics
    official: Official | None = None  # the torchvision file it is, by name and verified SHA-256 prefix

    @property
    def features_only(self) -> bool:
        return self.arch.features_only

    @property
    def config(self) -> dict[str, Any]:
        """The model config for :func:`vggnet.model_from_config`."""
        return self.card.model.to_dict()


@dataclass
class LoadedWeights(LoadedModel):
    """A :class:`vggnet.store.card.LoadedModel` from a weights file: ``run_dir`` is None, ``path`` is the file."""

    path: Path | None = None
    format: str = ""


# ------------------------------------------------------------------------------------------------------ reading
def sniff(path: str | os.PathLike) -> str:
    """The container of ``path`` from its first bytes: torch-zip, torch-legacy, safetensors or hdf5."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(16)
    size = path.stat().st_size
    if not head:
        raise CheckpointError(f"{path} is empty")
    if head.startswith(b"PK\x03\x04"):
        return "torch-zip"
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        return "hdf5"
    if len(head) >= 9:
        (header_len,) = struct.unpack("<Q", head[:8])
        if 0 < header_len <= size - 8 and head[8:9] == b"{":
            return "safetensors"
    if head[0] == 0x80:  # a pickle's PROTO opcode: torch.save's legacy format
        return "torch-legacy"
    raise CheckpointError(f"{path} is not a weights file vggnet reads (a torch.save .pth, zip or legacy; safetensors; "
                          f"Keras HDF5 .h5): it starts with {head[:8]!r}")


def verify_name(path: Path) -> None:
    """When the name carries a SHA-256 prefix (``vgg16-397923af.pth``), the file's digest must start with it."""
    expected = sha256_prefix(path)
    if expected is None:
        return

    actual = file_digest(path)
    if not digest_matches(actual, expected, prefix=True):
        raise CheckpointError(f"{path}: SHA-256 mismatch, the name says it starts with {expected} but the file's is "
                              f"{actual[:len(expected)]}...: it is truncated, corrupt or not the file of that name; "
                              "download it again (vggnet weights fetch)")


def _as_float32(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.float() if v.is_floating_point() and v.dtype != torch.float32 else v for k, v in state.items()}


def _card(arch: Architecture, fmt: str, official: Official | None) -> ModelCard:
    config = arch.config()
    classes = list(imagenet.CLASSES) if not arch.features_only and config["num_classes"] == 1000 else []
    h, w = config["input_size"]
    size = imagenet.IMAGE_SIZE if config["head"] in ("classic", "gap") or h != w else h
    prep = (imagenet.caffe_preprocess(size) if fmt == "keras"
            else imagenet.torchvision_preprocess(config["in_channels"], size))
    metrics = {} if official is None else {"imagenet_top1": official.top1 / 100, "imagenet_top5": official.top5 / 100}
    return ModelCard(model=config, classes=classes, preprocess=prep.to_dict(),
                     dataset="imagenet" if classes else None, image_size=size, metrics=metrics,
                     vggnet_version=__version__)


def checked_container(path: Path) -> str:
    """The container of the weights file ``path`` (:func:`sniff`), once it is known to be a readable file whose
    SHA-256 starts with the prefix its name may carry (:func:`verify_name`); CheckpointError naming it otherwise."""
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"{path} is not a file")
    try:
        verify_name(path)
        return sniff(path)
    except OSError as err:  # unreadable: permissions, I/O errors
        raise CheckpointError(f"{path} cannot be read ({err.strerror or err})") from None


def read_file(path: str | os.PathLike) -> WeightsFile:
    """Read a weights file (any supported container and layout) into vggnet's layout and detect its architecture."""
    path = Path(path)
    container = checked_container(path)
    if container == "hdf5":
        state, fmt = keras.read(path), "keras"
    else:
        if container == "safetensors":
            raw = load_tensors(path)
        else:
            raw = pth.read(path)
        raw = strip_prefixes(raw)

        if timm.is_timm(raw):
            state, fmt = timm.to_vggnet(raw, path), "timm"
        else:
            state, fmt = raw, "torchvision"
    state = complete_batch_norm(_as_float32(state))
    arch = detect(state, path)
    official = by_file_name(path)
    if official is not None and (arch.name != official.model or arch.kwargs.get("num_classes") != 1000):
        official = None  # named like an official file (and its digest matched) but not that network: no metrics
    return WeightsFile(path, fmt, container, state, arch, _card(arch, fmt, official), official)


# ------------------------------------------------------------------------------------------------------ loading
def _instantiate(wf: WeightsFile, name: str | None, overrides: dict[str, Any]) -> VGG:
    """The model ``name`` (default: the file's own) sized by the file unless ``overrides`` say otherwise, with the
    file's weights loaded strictly."""
    own = name is None
    name = wf.arch.name if own else name
    kwargs = dict(wf.arch.kwargs) if own or name == "custom" else wf.arch.shape_kwargs()
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    hint = ""
    if name != wf.arch.name:
        hint = f" (the file holds {wf.arch.describe()}: leave out the model override to use it)"
    elif overrides.get("num_classes") not in (None, wf.arch.kwargs.get("num_classes")) and not wf.features_only:
        hint = " (for other classes: load it as it is, then call model.reset_classifier(N))"
    if wf.features_only:
        with torch.random.fork_rng(devices=[]):  # the head's initialisation leaves the caller's random state alone
            model = create_model(name, **kwargs)  # the head keeps its initialisation
        check_fits(model, wf.state, wf.path, name, prefix="features.", hint=hint)
        model.features.load_state_dict({k[len("features."):]: v for k, v in wf.state.items()})
        return model
    model = empty_model(name, **kwargs)
    load_strict(model, wf.state, wf.path, name, hint=hint)
    return model


def load_file(path: str | os.PathLike, model: str | None = None, device: str | torch.device = "cpu"
              ) -> LoadedWeights:
    """The model of a weights file, in eval mode on ``device``, with its card (architecture, ImageNet class names,
    preprocessing, official metrics). ``model`` (a registry name) overrides the detected architecture; the file must
    then fit it exactly, or a CheckpointError names the first key where they differ, with both shapes."""
    wf = read_file(path)
    net = _instantiate(wf, model, {})
    card = replace(wf.card, model=net.config)
    return LoadedWeights(net.to(device).eval(), card, None, "model", path=wf.path, format=wf.format,
                         features_only=wf.features_only)


def build_model(path: str | os.PathLike, name: str, **kwargs: Any) -> VGG:
    """``vggnet.create_model(name, weights=path, **kwargs)``: the architecture ``name``, sized by ``kwargs`` and,
    for the keywords not given (classes, input channels, head, hidden width, width, input size), by the file; the
    file loads strictly (a features-only file into ``features``). Training mode, on the CPU, like create_model."""
    wf = read_file(path)
    return _instantiate(wf, name, kwargs).train()


__all__ = ["CONTAINERS", "FORMATS", "OFFICIAL", "Architecture", "LoadedWeights", "Official", "WeightsFile",
           "build_model", "checked_container", "detect", "load_file", "read_file", "sniff"]
