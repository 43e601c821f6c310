"""Prediction on image files with a trained run's own preprocessing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from vggnet.data.images import decode_image
from vggnet.base.errors import DataError
from vggnet.evaluation.metrics import predict_logits
from vggnet.store.card import LoadedModel
from vggnet.runtime import Runtime, resolve_runtime


@dataclass
class Prediction:
    file: str
    top: list[dict] | None = None  # [{"index", "class", "prob"}, ...], most likely first
    error: str | None = None

    def to_dict(self) -> dict:
        return {"file": self.file, "top": self.top} if self.error is None else {"file": self.file, "error": self.error}


def decode_files(loaded: LoadedModel, files: Sequence[str]
                 ) -> tuple[torch.Tensor | None, list[int], list[tuple[int, str]]]:
    """Decode image files as the model's training images were: :func:`vggnet.data.decode_image` at the native input
    size (``preprocess.decode_size``: ``in_size``, else ``image_size / crop_fraction``, e.g. 256 for ImageNet weights,
    whose preprocessing then crops the centre 224) with the model's channel count.

    Returns the uint8 batch ``(n, C, h, w)`` of the readable files (``None`` when there is none), the position in
    ``files`` of each of its rows, and ``(position, message)`` for each unreadable file (the message names it)."""
    prep = loaded.preprocess
    channels = int(loaded.model.in_channels)
    native = prep.decode_size
    images, where, errors = [], [], []
    for position, path in enumerate(files):
        try:
            images.append(torch.from_numpy(decode_image(path, native, channels)).permute(2, 0, 1))
            where.append(position)
        except DataError as err:
            errors.append((position, str(err)))
    return (torch.stack(images) if images else None), where, errors


def predict_files(loaded: LoadedModel, files: Sequence[str], top_k: int = 5, runtime: Runtime | None = None,
                  tta: str | None = None) -> list[Prediction]:
    """Top-k classes per file; an unreadable file gets its own error and does not stop the others.

    Each file is decoded as the training images were (:func:`decode_files`) and run on ``runtime`` (default:
    :func:`vggnet.runtime.resolve_runtime`'s choices on the CPU)."""
    loaded.require_head(getattr(loaded, "path", None) or loaded.run_dir, "predict")
    runtime = runtime or resolve_runtime("cpu", threads=torch.get_num_threads())
    prep = loaded.preprocess
    k = min(top_k, len(loaded.classes) or loaded.model.num_classes)
    results = [Prediction(str(path)) for path in files]
    images, where, errors = decode_files(loaded, files)
    for position, message in errors:
        results[position].error = message
    if images is not None:
        logits = predict_logits(loaded.model.to(runtime.device), images, prep, runtime.device,
                                runtime.precision, tta=tta, channels_last=runtime.channels_last,
                                compile=runtime.compile)
        probs = logits.softmax(1)
        values, indices = probs.topk(k, dim=1)
        for row, slot in enumerate(where):
            results[slot].top = [
                {"index": int(i), "class": loaded.classes[int(i)] if loaded.classes else str(int(i)), "prob": float(p)}
                for p, i in zip(values[row], indices[row])
            ]
    return results
