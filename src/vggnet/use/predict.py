"""Prediction on image files with a trained run's own preprocessing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

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


def predict_files(loaded: LoadedModel, files: Sequence[str], top_k: int = 5, runtime: Runtime | None = None,
                  tta: str | None = None) -> list[Prediction]:
    """Top-k classes per file; an unreadable file gets its own error and does not stop the others.

    Each file is decoded as the training images were (:meth:`LoadedModel.decode_files`) and run on ``runtime`` (default:
    :func:`vggnet.runtime.resolve_runtime`'s choices on the CPU, on the current thread count); its thread count
    follows the other processes' load between batches when ``runtime.adaptive`` says so (no ``--threads``)."""
    loaded.require_head(getattr(loaded, "path", None) or loaded.run_dir, "predict")
    runtime = runtime or resolve_runtime("cpu", threads=torch.get_num_threads())
    prep = loaded.preprocess
    k = min(top_k, len(loaded.classes) or loaded.model.num_classes)
    results = [Prediction(str(path)) for path in files]
    images, where, errors = loaded.decode_files(files)
    for position, message in errors:
        results[position].error = message
    if images is not None:
        logits = predict_logits(loaded.model.to(runtime.device), images, prep, runtime.device,
                                runtime.precision, tta=tta, channels_last=runtime.channels_last,
                                compile=runtime.compile, threads=runtime.adaptive,
                                small_maps=runtime.small_map_convs)
        probs = logits.softmax(1)
        values, indices = probs.topk(k, dim=1)
        for row, slot in enumerate(where):
            results[slot].top = [
                {"index": int(i), "class": loaded.classes[int(i)] if loaded.classes else str(int(i)), "prob": float(p)}
                for p, i in zip(values[row], indices[row])
            ]
    return results
