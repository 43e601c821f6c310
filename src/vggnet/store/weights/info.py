"""What a weights file holds (``vggnet weights info FILE``): a JSON-ready record and its text lines.

:func:`describe` reads the file as :func:`vggnet.load` would and records its format, container, architecture,
model config, classes, preprocessing and, for the eight official torchvision files, their ImageNet accuracy. A
safetensors file that carries a vggnet card (a run's ``model.safetensors`` or ``best.safetensors``, copied anywhere:
:func:`vggnet.store.card.read_embedded_card`) is described by that card -- format ``vggnet``, its own model config,
classes and preprocessing -- after its tensors' names and shapes were checked against it; any other file by what its
keys and shapes say (:func:`vggnet.store.weights.read_file`). :func:`info_lines` renders a record for the terminal.

The record's ``input`` names the channels the model takes, as its preprocessing decodes image files
(:func:`vggnet.data.decode_image`): ``RGB`` or ``BGR`` for three channels, ``grey`` for one, ``grey x N`` (the
luminance repeated) for any other count.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from vggnet.base.files import read_header
from vggnet.data import Preprocess
from vggnet.store.card import ModelCard, check_header, read_embedded_card
from vggnet.store.weights import checked_container, read_file
from vggnet.store.weights.layout import Architecture

#: Display names of the datasets a card may name, for the text.
_DATASET_NAMES = {"imagenet": "ImageNet"}


def input_channels(prep: Preprocess, in_channels: int) -> str:
    """The channels a model takes, as image files are decoded for it: ``RGB``/``BGR``, ``grey`` or ``grey x N``."""
    if in_channels == 3:
        return prep.channel_order.upper()
    return "grey" if in_channels == 1 else f"grey x {in_channels}"


def _record(path: Path, fmt: str, container: str, card: ModelCard, arch: Architecture,
            official: dict[str, Any] | None) -> dict[str, Any]:
    prep = card.preprocess
    return {"file": str(path), "format": fmt, "container": container, "model": arch.name,
            "architecture": arch.describe(), "features_only": arch.features_only, "config": card.model.to_dict(),
            "classes": len(card.classes), "dataset": card.dataset, "preprocess": prep.to_dict(),
            "input": input_channels(prep, card.model.in_channels), "official": official}


def _vggnet_card(path: Path, container: str) -> ModelCard | None:
    """The card embedded in a vggnet safetensors file, once the file's tensors are the ones it describes."""
    if container != "safetensors":
        return None
    carded = read_embedded_card(path)
    if carded is None:
        return None
    card = carded[0]
    where = f"{path} (its card)"
    model = card.build(where, "meta")
    check_header(model, read_header(path), where, card.stored_dtypes(model))
    return card


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """The record of what the weights file ``path`` holds (module docstring); CheckpointError, one line naming the
    file, when it is no weights file vggnet reads."""
    path = Path(path)
    container = checked_container(path)
    card = _vggnet_card(path, container)
    if card is not None:
        arch = Architecture(card.model.name, {"width": card.model.width})
        return _record(path, "vggnet", container, card, arch, None)
    wf = read_file(path)
    return _record(wf.path, wf.format, wf.container, wf.card, wf.arch, wf.official.to_dict() if wf.official else None)


def _sizing(prep: Preprocess) -> str:
    """How an image file becomes the model's input: decoded at one size, then cropped, padded or resized."""
    decode, size = prep.decode_size, prep.image_size
    if prep.crop_fraction < 1.0:
        return f"decode at {decode} and centre-crop {size}"
    fit = prep.resolved_fit(decode)
    return f"decode at {decode}" + ("" if fit == "none" else f" and {fit} to {size}")


def _channels_text(channels: str) -> str:
    if channels == "grey":
        return "grey (1 channel)"
    if channels.startswith("grey x "):
        return f"grey, the luminance in each of {channels[len('grey x '):]} channels"
    return channels


def info_lines(record: dict[str, Any]) -> list[str]:
    """The record of :func:`describe` as the lines ``vggnet weights info`` prints."""
    config, prep = record["config"], Preprocess.from_dict(record["preprocess"])
    if record["features_only"]:
        head = "none (features only)"
    else:
        named = ""
        if record["classes"]:
            dataset = record["dataset"]
            named = f" ({_DATASET_NAMES.get(dataset, dataset)} classes)" if dataset else " (named classes)"
        head = f"{config['head']}, {config['num_classes']} outputs{named}"
    channels = config["in_channels"]
    what = "vggnet's own file (its model card)" if record["format"] == "vggnet" else f"{record['format']} layout"
    lines = [f"{record['file']}: {what} in a {record['container']} file",
             f"  model: {record['architecture']}, {channels} input channel{'s' if channels != 1 else ''}, head {head}",
             f"  preprocessing: {_channels_text(record['input'])}, {_sizing(prep)}, "
             f"mean {[round(m, 5) for m in prep.mean]}, std {[round(s, 5) for s in prep.std]} (on the [0, 1] scale)"]
    official = record["official"]
    if official:
        lines.append(f"  official torchvision weights: ImageNet acc@1 {official['top1']:.3f}%, "
                     f"acc@5 {official['top5']:.3f}%")
    return lines
