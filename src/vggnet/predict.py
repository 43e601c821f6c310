"""Prediction on image files with a trained run's own preprocessing."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .checkpoint import LoadedModel
from .errors import DataError
from .evaluation import predict_logits


def read_image(path: str | os.PathLike, channels: int) -> torch.Tensor:
    """Any image file (any mode, any size) as uint8 (channels, H, W): RGB for 3 channels, luminance for 1."""
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            if image.mode in ("RGBA", "LA", "P"):
                background = Image.new("RGBA", image.size, (0, 0, 0, 255))
                image = Image.alpha_composite(background, image.convert("RGBA"))
            image = image.convert("RGB" if channels == 3 else "L")
            array = np.asarray(image, dtype=np.uint8)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not an image") from None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"{path}: not a readable image ({' '.join(str(err).split())})") from None
    if channels not in (1, 3):
        array = np.repeat(array[..., None] if array.ndim == 2 else array.mean(-1, keepdims=True), channels, -1)
    return torch.from_numpy(array.reshape(array.shape[0], array.shape[1], -1).copy()).permute(2, 0, 1)


@dataclass
class Prediction:
    file: str
    top: list[dict] | None = None  # [{"index", "class", "prob"}, ...], most likely first
    error: str | None = None

    def to_dict(self) -> dict:
        return {"file": self.file, "top": self.top} if self.error is None else {"file": self.file, "error": self.error}


def fit_image(image: torch.Tensor, size: int) -> torch.Tensor:
    """Resize the shorter side to ``size`` and centre-crop to a square (as the folder loader does)."""
    import torch.nn.functional as F

    _, h, w = image.shape
    if (h, w) == (size, size):
        return image
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    resized = F.interpolate(image[None].float(), size=(nh, nw), mode="bilinear", align_corners=False,
                            antialias=scale < 1)[0]
    top, left = (nh - size) // 2, (nw - size) // 2
    return resized[:, top:top + size, left:left + size].round().clamp(0, 255).to(torch.uint8)


def predict_files(loaded: LoadedModel, files: Sequence[str], top_k: int = 5, device: str = "cpu",
                  tta: str | None = None) -> list[Prediction]:
    """Top-k classes per file; an unreadable file gets its own error and does not stop the others."""
    prep = loaded.preprocess
    channels = int(loaded.meta["model"]["in_channels"])
    native = prep.in_size or prep.image_size
    k = min(top_k, len(loaded.classes) or loaded.model.num_classes)
    results, images, where = [], [], []
    for path in files:
        try:
            images.append(fit_image(read_image(path, channels), native))
            where.append(len(results))
            results.append(Prediction(str(path)))
        except DataError as err:
            results.append(Prediction(str(path), error=str(err)))
    if images:
        dev = torch.device(device)
        logits = predict_logits(loaded.model.to(dev), torch.stack(images), prep, dev, "fp32",
                                tta=tta)
        probs = logits.softmax(1)
        values, indices = probs.topk(k, dim=1)
        for row, slot in enumerate(where):
            results[slot].top = [
                {"index": int(i), "class": loaded.classes[int(i)] if loaded.classes else str(int(i)), "prob": float(p)}
                for p, i in zip(values[row], indices[row])
            ]
    return results
