"""The one image decoder: what a model sees of an image file, in training (``folder:PATH``) and in prediction.

:func:`decode_image` is used by both the image-folder loader (:mod:`vggnet.data.folder`) and ``vggnet predict``
(:mod:`vggnet.predict`), so a file gives the same pixels in training and at predict time. Steps, in order:

1. open with Pillow and turn upright (EXIF orientation);
2. composite any transparency over opaque black: an alpha channel (RGBA, LA, PA, premultiplied RGBa/La), a palette
   with a transparency entry or an RGBA palette, and a transparency key on an RGB/L image;
3. convert to RGB for ``channels=3``, to luminance (Pillow's ``L``: ITU-R 601-2) for any other count, the luminance
   being replicated into every channel when ``channels`` is neither 1 nor 3;
4. when ``image_size`` is given: resize so the shorter side is ``image_size`` (the longer side
   ``int(image_size * long / short)``; Pillow bilinear, antialiased when shrinking) and crop the centre
   ``image_size`` squared (offsets ``round((side - image_size) / 2)``): exactly torchvision's ``Resize(S)`` then
   ``CenterCrop(S)`` on a PIL image, so ImageNet weights see the pixels they were evaluated on.

The result is a uint8 numpy array ``(H, W, channels)``, rows first (``torch.from_numpy(a).permute(2, 0, 1)`` gives
the ``(C, H, W)`` layout of a batch). :data:`DECODER_VERSION` names this definition; caches of decoded pixels include
it, so a change of definition (bump it) never serves pixels of another one.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageOps

from vggnet.errors import ConfigError, DataError

#: Version of the decoding definition above. Version 1 was the folder loader's own decoder (alpha dropped without
#: compositing); 2 fitted with one resampling of the centre box (``ImageOps.fit``); 3 is this one (torchvision's
#: resize-then-crop). Bump it whenever the pixels :func:`decode_image` returns change.
DECODER_VERSION = 3
_RESAMPLE = Image.Resampling.BILINEAR


class ImageFileError(DataError):
    """An image file that cannot be decoded. ``str()`` is ``"PATH: REASON"``; ``path`` and ``reason`` are kept."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def _has_transparency(image: Image.Image) -> bool:
    """Alpha channel, transparency key or RGBA palette (as ``Image.has_transparency_data`` of Pillow >= 10.1)."""
    if image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or image.info.get("transparency") is not None:
        return True
    return image.mode == "P" and image.palette is not None and image.palette.mode.endswith("A")


def _resize_and_crop(image: Image.Image, size: int) -> Image.Image:
    """Shorter side to ``size`` (torchvision's rounding of the longer side), then the centre ``size`` squared."""
    w, h = image.size
    if min(w, h) != size:
        long = int(size * max(w, h) / min(w, h))
        image = image.resize((size, long) if w <= h else (long, size), _RESAMPLE)
        w, h = image.size
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def _decode(path: str | os.PathLike, image_size: int | None, channels: int) -> np.ndarray:
    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened)
        if _has_transparency(image):
            image = Image.alpha_composite(Image.new("RGBA", image.size, (0, 0, 0, 255)), image.convert("RGBA"))
        image = image.convert("RGB" if channels == 3 else "L")
        if image_size is not None:
            image = _resize_and_crop(image, image_size)
        array = np.array(image, dtype=np.uint8)
    array = array.reshape(array.shape[0], array.shape[1], -1)
    if channels not in (1, 3):
        array = np.repeat(array, channels, axis=2)
    return array


def decode_image(path: str | os.PathLike, image_size: int | None = None, channels: int = 3) -> np.ndarray:
    """The file at ``path`` as uint8 ``(H, W, channels)``, decoded as the module docstring says.

    ``image_size=None`` keeps the image's own (upright) size; otherwise the result is ``(image_size, image_size,
    channels)``. A file that cannot be decoded -- missing, a directory, not an image, truncated, corrupt, or a
    decompression bomb (more than twice ``PIL.Image.MAX_IMAGE_PIXELS``) -- raises :class:`ImageFileError`, a
    :class:`vggnet.errors.DataError` whose message names the file.
    """
    if image_size is not None and image_size < 1:
        raise ConfigError(f"image_size must be >= 1 pixel, got {image_size}")
    if channels < 1:
        raise ConfigError(f"channels must be >= 1, got {channels}")
    try:
        return _decode(path, image_size, channels)
    except FileNotFoundError:
        raise ImageFileError(path, "no such file") from None
    except IsADirectoryError:
        raise ImageFileError(path, "is a directory, not an image") from None
    except Exception as err:  # Pillow raises many types for bad files (OSError, SyntaxError, struct.error, ...)
        reason = " ".join(str(err).split()) or type(err).__name__
        raise ImageFileError(path, f"not a readable image ({reason})") from None
