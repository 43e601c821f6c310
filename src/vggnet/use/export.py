"""Export a trained VGG to a file other runtimes load (ONNX, TorchScript, torch.export), checked against the eager
model before anything is written: the public module of ``vggnet export``.

Typical use (the Python side of ``vggnet export``)::

    loaded = vggnet.load("runs/RUN")
    images, note, random = check_images_of(loaded, "runs/RUN")        # the run's own test images, uint8
    result = export_checked(loaded, "onnx", "model.onnx", images=images, images_note=note, random=random,
                            dynamic_batch=True)
    result.check.max_abs_error, result.size_bytes                      # model.onnx and model.onnx.json written
    export_model(loaded.model, "exported", "model.pt2", any_size=True)   # the file alone: no check, no card

What is exported is the eager fp32 :class:`~vggnet.net.models.VGG` on the CPU (not :mod:`vggnet.evaluation.inference`'s optimised
copy), or with ``any_size`` :func:`vggnet.to_dense` of it: fully convolutional, so the file takes any input at least
the training size (the dense head's kernel was sized for it; a ``gap`` head needs only ``2 ** num_pools``).

The work is in two modules, re-exported here: :mod:`vggnet.use.export_formats` (the formats, their exporters and
runtimes, the input spec) and :mod:`vggnet.use.export_check` (the exported file against the eager model on real
images). This module writes: once the check passes, the file and its JSON card (``FILE.json``: input spec,
classes, preprocessing as plain numbers and a recipe, source, check results) are written atomically, the card
last: both files or neither (:func:`commit`). Where they may go is :mod:`vggnet.base.guard`'s rule
(:func:`check_out`): never over one of the inputs, never over a file that vggnet export did not write (one with an
export card beside it is its own).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from vggnet.base.errors import ConfigError
from vggnet.base.files import atomic_write_bytes, atomic_write_json
from vggnet.base.guard import json_of, output_file
from vggnet.net.models import VGG
from vggnet.store.card import LoadedModel
from vggnet.use.export_check import (CHECK_IMAGES, DEFAULT_TOLERANCE, RANDOM_IMAGES, ExportCheck, SizeCheck,
                                     check_export, check_images_of, compare, random_images)
from vggnet.use.export_formats import (EXTENSIONS, FORMATS, INPUT_NAME, OUTPUT_NAME, RANDOM_SEED, ExportError,
                                       InputSpec, export_bytes, export_module, load_runner, onnx_opset, require_onnx)
from vggnet.base.version import __version__

#: Who writes the files, in the guard's refusals.
WRITER = "vggnet export"


# ------------------------------------------------------------------------------------------------ where it goes
def card_path(path: str | os.PathLike) -> Path:
    """The JSON card beside an exported file: ``model.onnx`` -> ``model.onnx.json``."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def is_card(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an export card (:func:`make_card`'s keys, a known format): vggnet export wrote it."""
    card = json_of(path)
    return (isinstance(card, dict) and card.get("format") in FORMATS and isinstance(card.get("check"), dict)
            and {"input", "output", "classes", "vggnet_version"} <= set(card))


def written_by_export(path: str | os.PathLike) -> bool:
    """Whether the file at ``path`` is an earlier export: its card is beside it. A file of :func:`export_model`
    alone has no card, so it is not recognised (move it away, or export to a new name)."""
    return is_card(card_path(path))


def check_out(out: str | os.PathLike, inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """``out`` when the file and its card may be written there (:mod:`vggnet.base.guard`): a folder that exists and
    is writable, neither one of ``inputs`` (the source, the check images), each new or an earlier export's."""
    inputs = [str(item) for item in inputs]
    out = output_file(out, inputs=inputs, owned=written_by_export, example="model.onnx", writer=WRITER)
    output_file(card_path(out), inputs=inputs, owned=is_card, writer=WRITER)
    return out


# ------------------------------------------------------------------------------------------------ the card
def fitted_from(prep) -> tuple[int, str]:
    """The side of a decoded file after the centre crop, and how it is then fitted to ``image_size``: ``"pad"``,
    ``"resize"`` or ``"none"``."""
    side = prep.decode_size
    if prep.crop_fraction < 1.0:
        side = max(1, int(round(side * prep.crop_fraction)))
    return side, prep.resolved_fit(side, side)


def recipe(prep, channels: int) -> str:
    """The preprocessing in one line of plain English, for a user without vggnet."""
    colour = {1: "grayscale (1 channel, ITU-R 601-2 luma)", 3: "RGB"}.get(
        channels, f"grayscale (ITU-R 601-2 luma) repeated into {channels} channels")
    d, s = prep.decode_size, prep.image_size
    steps = [f"decode the image as {colour} uint8", f"resize the shorter side to {d} px (bilinear) and crop the centre "
             f"{d}x{d}"]
    cropped, fit = fitted_from(prep)
    if prep.crop_fraction < 1.0:
        steps.append(f"keep the centre {cropped}x{cropped} (crop fraction {prep.crop_fraction:g})")
    if prep.channel_order == "bgr":
        steps.append("reverse the channels to BGR")
    steps.append("divide by 255")
    if fit == "pad":
        steps.append(f"pad with zeros, centred, to {s}x{s}")
    elif fit == "resize":
        steps.append(f"resize to {s}x{s} (bilinear)")
    numbers = lambda values: "[" + ", ".join(f"{v:.6g}" for v in values) + "]"  # noqa: E731
    steps.append(f"subtract mean {numbers(prep.mean)} and divide by std {numbers(prep.std)} per channel")
    steps.append(f"feed float32 NCHW (batch, {channels}, {s}, {s}); the outputs are logits, softmax for probabilities")
    return "; ".join(steps)


def make_card(loaded: LoadedModel, fmt: str, spec: InputSpec, check: ExportCheck, *, source: str, size_bytes: int,
              export_seconds: float, opset: int | None = None) -> dict[str, Any]:
    """The JSON card of an exported file: what a user of another runtime needs, and how it was checked."""
    prep = loaded.preprocess
    classes = list(loaded.classes) or [str(i) for i in range(loaded.model.num_classes)]
    card: dict[str, Any] = {
        "format": fmt,
        "input": {"name": INPUT_NAME, "shape": spec.shape(), "dynamic": spec.dynamic, "dtype": "float32",
                  "layout": "NCHW", "min_size": list(spec.size),
                  "note": "the first positional argument" if fmt != "onnx" else "the ONNX graph input"},
        "output": {"name": OUTPUT_NAME, "shape": [spec.shape()[0], len(classes)],
                   "meaning": "class logits in the order of classes; softmax gives probabilities"},
        "classes": classes,
        "preprocess": dict(asdict(prep), mean=list(prep.mean), std=list(prep.std)),
        "decode_size": prep.decode_size,
        "fit": fitted_from(prep)[1],
        "recipe": recipe(prep, spec.channels),
        "model": dict(loaded.model.config, head="dense" if spec.any_size and loaded.model.head != "gap"
                      else loaded.model.head),
        "converted": "vggnet.to_dense (fully convolutional)" if spec.any_size else None,
        "source": source,
        "weights": loaded.weights if loaded.run_dir is not None else None,
        "vggnet_version": __version__,
        "torch_version": torch.__version__,
        "size_bytes": size_bytes,
        "export_seconds": round(export_seconds, 3),
        "check": check.to_dict(),
    }
    if opset is not None:
        card["opset"] = opset
    return card


def commit(path: str | os.PathLike, data: bytes, card: dict[str, Any]) -> tuple[Path, Path]:
    """Write the file and then its card, each atomically; a card that cannot be written takes the file with it, so
    both are there or neither is new."""
    path = Path(path)
    atomic_write_bytes(path, data)
    try:
        atomic_write_json(card_path(path), card)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path, card_path(path)


def export_model(model: VGG, fmt: str, path: str | os.PathLike, *, dynamic_batch: bool = False,
                 any_size: bool = False) -> Path:
    """Export ``model`` (eager fp32 on the CPU; ``to_dense`` of it with ``any_size``) to ``path`` in ``fmt``,
    atomically, without checking it or writing a card (:func:`export_checked` does both)."""
    path = output_file(path, owned=written_by_export, example="model.onnx", writer=WRITER)
    module, spec = export_module(model, dynamic_batch=dynamic_batch, any_size=any_size)
    atomic_write_bytes(path, export_bytes(module, fmt, spec))
    return path


# ------------------------------------------------------------------------------------------------ all together
@dataclass
class ExportResult:
    path: Path
    card_path: Path
    format: str
    spec: InputSpec
    check: ExportCheck
    size_bytes: int
    export_seconds: float
    card: dict[str, Any]


def export_checked(loaded: LoadedModel, fmt: str, out: str | os.PathLike, *, images: torch.Tensor | None = None,
                   images_note: str = "", random: bool = False, dynamic_batch: bool = False, any_size: bool = False,
                   tolerance: float = DEFAULT_TOLERANCE, source: str | None = None) -> ExportResult:
    """Export ``loaded.model`` to ``out`` in ``fmt``, check the file against the eager model on the uint8
    ``images`` (default :func:`random_images`), and write it with its card (``out.json``) only when the check
    passes; otherwise :class:`ExportError` and nothing written."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if not tolerance > 0:
        raise ConfigError(f"the tolerance must be > 0, got {tolerance}")
    out = check_out(out, [p for p in (source, loaded.run_dir) if p is not None])
    if fmt == "onnx":
        require_onnx()
    source = str(source if source is not None else loaded.run_dir or "model")
    loaded.require_head(source, "export")
    if images is None:
        images, images_note, random = random_images(loaded), f"{RANDOM_IMAGES} random images (seed {RANDOM_SEED})", True
    module, spec = export_module(loaded.model, dynamic_batch=dynamic_batch, any_size=any_size)
    prep = loaded.preprocess
    if not any_size and spec.size != (prep.image_size, prep.image_size):
        raise ExportError(f"the preprocessing makes {prep.image_size}x{prep.image_size} inputs but the model takes "
                          f"{spec.size[0]}x{spec.size[1]}: export with --any-size, or fix the source's preprocessing")
    start = time.perf_counter()
    data = export_bytes(module, fmt, spec)
    seconds = time.perf_counter() - start
    check = check_export(module, load_runner(fmt, data), images, prep, spec, tolerance,
                         images_note, random)
    if not check.passed:
        worst = max(check.sizes, key=lambda s: (s.rel_error, -s.top1_agreement))
        changed = worst.images - worst.top1_agree - worst.top1_allowed
        flips = f", {changed} image(s) change top-1 class by more than the error" if changed else ""
        detail = (f"relative error {check.rel_error:.3g} (max abs {check.max_abs_error:.3g}) against the tolerance "
                  f"{tolerance:g}{flips} at {worst.size[0]}x{worst.size[1]}")
        raise ExportError(f"the exported {fmt} file does not compute what the eager model computes: {detail}, on "
                          f"{check.images}; nothing written (a larger --tolerance accepts it if this is expected)")
    opset = onnx_opset(data) if fmt == "onnx" else None
    card = make_card(loaded, fmt, spec, check, source=source, size_bytes=len(data), export_seconds=seconds,
                     opset=opset)
    path, card_file = commit(out, data, card)
    return ExportResult(path, card_file, fmt, spec, check, len(data), seconds, card)


def human_size(n: int) -> str:
    """``1536`` -> ``"1.5 KB"`` (binary units)."""
    if n < 1024:
        return f"{n} B"
    exponent = min(3, int(math.log(n, 1024)))
    return f"{n / 1024 ** exponent:.1f} {'KMG'[exponent - 1]}B"


__all__ = ["CHECK_IMAGES", "DEFAULT_TOLERANCE", "EXTENSIONS", "FORMATS", "INPUT_NAME", "OUTPUT_NAME", "RANDOM_IMAGES",
           "RANDOM_SEED", "ExportCheck", "ExportError", "ExportResult", "InputSpec", "SizeCheck", "card_path",
           "check_export", "check_images_of", "check_out", "commit", "compare", "export_bytes", "export_checked",
           "export_model", "export_module", "fitted_from", "human_size", "is_card", "load_runner", "make_card",
           "onnx_opset", "random_images", "recipe", "require_onnx", "written_by_export"]
