"""The one image decoder: what a model sees of an image file, in training (``folder:PATH``) and in prediction.

:func:`decode_image` is used by both the image-folder loader (:mod:`vggnet.data.folder`) and ``vggnet predict``
(:mod:`vggnet.use.predict`), so a file gives the same pixels in training and at predict time. :func:`decode_bytes` is
the same decoder on bytes held in memory (a sample read from a shard), and :func:`decode_bytes_upright` its steps 1
to 5 for the paper's per-sample transforms (:mod:`vggnet.data.paper`), which resize and crop on their own. Steps, in
order:

1. refuse what is not a regular file (a FIFO would block the reader forever) and, from the header alone, before
   any pixel is decoded, images with a side over :data:`MAX_IMAGE_SIDE` or more than :data:`MAX_IMAGE_PIXELS`
   pixels -- and, when ``image_size`` is given, those whose resized intermediate (step 5) would exceed
   :data:`MAX_IMAGE_PIXELS` (a 1 x 50000 strip resized to 224 on its short side);
2. turn upright (EXIF orientation);
3. bring high-bit-depth grayscale to 8 bits by scaling, not clipping: 16-bit (``I;16*``, and ``I`` whose values
   lie in 0..65535) as ``round(v * 255 / 65535)``; floating point (``F``, e.g. float TIFFs) must lie in [0, 1] and
   becomes ``round(v * 255)`` -- other float ranges (and NaN) are refused, since their meaning is not in the file;
   pixels equal to a transparency key become black. (16-bit colour is reduced to 8 bits by Pillow itself);
4. composite any transparency over opaque black: an alpha channel (RGBA, LA, PA, premultiplied RGBa/La), a palette
   with a transparency entry or an RGBA palette, and a transparency key on an RGB/L image;
5. convert to RGB for ``channels=3``, to luminance (Pillow's ``L``: ITU-R 601-2) for any other count, the luminance
   being replicated into every channel when ``channels`` is neither 1 nor 3;
6. when ``image_size`` is given: resize so the shorter side is ``image_size`` (the longer side
   ``int(image_size * long / short)``; Pillow bilinear, antialiased when shrinking) and crop the centre
   ``image_size`` squared (offsets ``round((side - image_size) / 2)``): exactly torchvision's ``Resize(S)`` then
   ``CenterCrop(S)`` on a PIL image, so ImageNet weights see the pixels they were evaluated on.

The result is a uint8 numpy array ``(H, W, channels)``, rows first (``torch.from_numpy(a).permute(2, 0, 1)`` gives
the ``(C, H, W)`` layout of a batch). :data:`DECODER_VERSION` names this definition; caches of decoded pixels include
it, so a change of definition (bump it) never serves pixels of another one.
"""

from __future__ import annotations

import io
import os
import stat
from typing import Callable, Sequence, TypeVar

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from vggnet.base.errors import ConfigError, DataError

#: Version of the decoding definition above. Version 1 was the folder loader's own decoder (alpha dropped without
#: compositing); 2 fitted with one resampling of the centre box (``ImageOps.fit``); 3 introduced torchvision's
#: resize-then-crop; 4 (this one) scales 16-bit and float images instead of clipping them. Bump it whenever the
#: pixels :func:`decode_image` returns change.
DECODER_VERSION = 4
#: How every image is rescaled: Pillow's bilinear filter, antialiased when shrinking (its support grows with the
#: scale factor), as torchvision's ``Resize`` on a PIL image.
RESAMPLE = Image.Resampling.BILINEAR
#: Most pixels of an image, and of its resized intermediate: Pillow's own decompression-bomb limit (its default
#: ``Image.MAX_IMAGE_PIXELS``, about 0.27 GB as RGB), enforced here as an error rather than Pillow's warning.
MAX_IMAGE_PIXELS = 89_478_485
#: Longest side of an image: 65535, the largest a JPEG can have.
MAX_IMAGE_SIDE = 65_535
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
T = TypeVar("T")


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


def rescaled_size(width: int, height: int, side: int) -> tuple[int, int]:
    """``(width, height)`` rescaled isotropically so the shorter side is ``side``: the longer side is
    ``int(side * long / short)``, torchvision's ``Resize(side)`` rounding."""
    if width <= height:
        return side, int(side * height / width)
    return int(side * width / height), side


def resize_shorter(image: Image.Image, side: int) -> Image.Image:
    """``image`` rescaled so its shorter side is ``side`` (:func:`rescaled_size`; Pillow bilinear, antialiased when
    shrinking: torchvision's ``Resize(side)`` on a PIL image); unchanged when it is already."""
    if min(image.size) == side:
        return image
    return image.resize(rescaled_size(*image.size, side), RESAMPLE)


def centre_crop(image: Image.Image, size: int) -> Image.Image:
    """The centre ``size`` squared of ``image`` (offsets ``round((side - size) / 2)``: torchvision's
    ``CenterCrop``)."""
    w, h = image.size
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def _resize_and_crop(image: Image.Image, size: int) -> Image.Image:
    """Shorter side to ``size`` (torchvision's rounding of the longer side), then the centre ``size`` squared."""
    return centre_crop(resize_shorter(image, size), size)


class _BoundedReads(io.BufferedReader):
    """An image file whose reads never ask for more bytes than remain in it. Decoders trust a chunk's declared
    length (Pillow reads a PNG's IDAT chunk with one ``read(length)``), and CPython allocates a read's whole size
    before it fills it: a 69-byte PNG declaring a 2 GB chunk allocated 2 GB."""

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__(io.FileIO(path, "rb"))
        self._size = os.fstat(self.fileno()).st_size
        self._path = path

    def __repr__(self) -> str:  # what a decoder's message shows for the file: its path as given
        return repr(str(self._path))

    def read(self, size: int | None = -1) -> bytes:
        if size is not None and size > 0:
            size = min(size, max(0, self._size - self.tell()))
        return super().read(size)


class _Refused(Exception):
    """An image refused by the decoder's own checks; its message is the reason."""


def _check_size(image: Image.Image, image_size: int | None) -> None:
    """Refuse, from the header, images too large to decode or to resize (see the module docstring, step 1)."""
    w, h = image.size
    if max(w, h) > MAX_IMAGE_SIDE or w * h > MAX_IMAGE_PIXELS:
        raise _Refused(f"{w}x{h} pixels exceed the limit of {MAX_IMAGE_SIDE} per side and {MAX_IMAGE_PIXELS} in all; "
                       "shrink or crop the image")
    resized_long = int(image_size * max(w, h) / min(w, h)) if image_size is not None and min(w, h) > 0 else 0
    if image_size is not None and image_size * resized_long > MAX_IMAGE_PIXELS:
        raise _Refused(f"{w}x{h} pixels resized to {image_size} on the shorter side would exceed {MAX_IMAGE_PIXELS} "
                       "pixels; crop the image to a less extreme aspect ratio")


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit and float grayscale scaled to an ``L`` image (module docstring, step 3); other modes unchanged."""
    if image.mode not in _SIXTEEN_BIT_MODES and image.mode != "F":
        return image
    values = np.asarray(image)
    if image.mode == "F":
        if not np.isfinite(values).all() or values.min(initial=0) < 0 or values.max(initial=0) > 1:
            raise _Refused("floating-point pixels outside [0, 1] (or NaN); save the image with 8- or 16-bit "
                           "integers, or floats scaled to [0, 1]")
        scaled = np.rint(values.astype(np.float64) * 255)
    else:
        if values.min(initial=0) < 0 or values.max(initial=0) > 65535:
            raise _Refused("32-bit integer pixels outside 0..65535; save the image with 8 or 16 bits per channel")
        scaled = (values.astype(np.int64) * 510 + 65535) // 131070  # round(v * 255 / 65535), halves up
    key = image.info.get("transparency")
    if isinstance(key, (int, float)):
        scaled[values == key] = 0  # a transparency key: composited over black
    return Image.fromarray(scaled.astype(np.uint8), "L")


class _NamedBytes(io.BytesIO):
    """An encoded image in memory, shown in a decoder's messages by its name. Its reads are bounded already: a read
    of more bytes than remain returns what remains, without allocating the size asked for."""

    def __init__(self, data: bytes | bytearray | memoryview, name: str) -> None:
        super().__init__(data)
        self._name = name

    def __repr__(self) -> str:
        return repr(str(self._name))


def _upright(opened: Image.Image, channels: int, check_side: int | None, draft: int | None) -> Image.Image:
    """Steps 1 (from the header) to 5 of the module docstring on an opened image: an upright 8-bit ``RGB``
    (``channels=3``) or ``L`` image, loaded, so it outlives the file (leaving a ``with Image.open`` block closes the
    file, not the pixels). ``draft``: let a JPEG decode straight to a reduced size (libjpeg's DCT scaling by 1/2,
    1/4 or 1/8, Pillow's ``Image.draft``) whose sides stay at least ``draft`` pixels; other formats ignore it."""
    _check_size(opened, check_side)
    if draft is not None and opened.format == "JPEG":
        opened.draft(None, (draft, draft))  # a square request: both sides stay >= draft whatever the orientation
    ImageOps.exif_transpose(opened, in_place=True)  # loads the pixels, then turns them upright without a copy
    image = _to_8bit(opened)
    if _has_transparency(image):
        image = Image.alpha_composite(Image.new("RGBA", image.size, (0, 0, 0, 255)), image.convert("RGBA"))
    mode = "RGB" if channels == 3 else "L"
    return image if image.mode == mode else image.convert(mode)


def to_array(image: Image.Image, channels: int) -> np.ndarray:
    """An ``RGB`` or ``L`` image from the decoder as uint8 ``(H, W, channels)``: the luminance replicated into every
    channel when ``channels`` is neither 1 nor 3."""
    array = np.array(image, dtype=np.uint8)
    array = array.reshape(array.shape[0], array.shape[1], -1)
    if channels not in (1, 3):
        array = np.repeat(array, channels, axis=2)
    return array


def _decode(stream: io.IOBase, image_size: int | None, channels: int) -> np.ndarray:
    with Image.open(stream) as opened:
        image = _upright(opened, channels, image_size, None)
    if image_size is not None:
        image = _resize_and_crop(image, image_size)
    return to_array(image, channels)


def _check_arguments(image_size: int | None, channels: int) -> None:
    if image_size is not None and image_size < 1:
        raise ConfigError(f"image_size must be >= 1 pixel, got {image_size}")
    if channels < 1:
        raise ConfigError(f"channels must be >= 1, got {channels}")


def _named(name: str | os.PathLike, decode: Callable[[], T]) -> T:
    """``decode()``, whose failures become one :class:`ImageFileError` naming ``name``."""
    try:
        return decode()
    except FileNotFoundError:
        raise ImageFileError(name, "no such file") from None
    except _Refused as err:
        raise ImageFileError(name, str(err)) from None
    except UnidentifiedImageError:  # Pillow's message names the file object; ours names the file already
        raise ImageFileError(name, "not a readable image (not in any image format Pillow reads)") from None
    except Exception as err:  # Pillow raises many types for bad files (OSError, SyntaxError, struct.error, ...)
        reason = " ".join(str(err).split()) or type(err).__name__
        raise ImageFileError(name, f"not a readable image ({reason})") from None


def _decode_file(path: str | os.PathLike, image_size: int | None, channels: int) -> np.ndarray:
    if not stat.S_ISREG(os.stat(path).st_mode):  # before opening: opening a FIFO blocks
        raise _Refused("not a regular file; pass an image file")
    with _BoundedReads(path) as f:
        return _decode(f, image_size, channels)


def decode_image(path: str | os.PathLike, image_size: int | None = None, channels: int = 3) -> np.ndarray:
    """The file at ``path`` as uint8 ``(H, W, channels)``, decoded as the module docstring says.

    ``image_size=None`` keeps the image's own (upright) size; otherwise the result is ``(image_size, image_size,
    channels)``. A file that cannot be decoded -- missing, a directory or another non-regular file, not an image,
    truncated, corrupt, too large (:data:`MAX_IMAGE_SIDE`, :data:`MAX_IMAGE_PIXELS`), or float pixels outside
    [0, 1] -- raises :class:`ImageFileError`, a :class:`vggnet.base.errors.DataError` whose message names the file.
    """
    _check_arguments(image_size, channels)
    if os.path.isdir(path):
        raise ImageFileError(path, "is a directory, not an image")
    return _named(path, lambda: _decode_file(path, image_size, channels))


def decode_bytes(data: bytes | bytearray | memoryview, name: str, image_size: int | None = None,
                 channels: int = 3) -> np.ndarray:
    """An encoded image held in memory (a file's bytes, a sample read from a shard) as uint8 ``(H, W, channels)``:
    exactly :func:`decode_image`'s pixels for the same bytes, and its errors, as :class:`ImageFileError` naming
    ``name`` (the sample: a file, or ``SHARD:KEY``). ``image_size=None`` keeps the image's own (upright) size."""
    _check_arguments(image_size, channels)
    return _named(name, lambda: _decode(_NamedBytes(data, name), image_size, channels))


def decode_bytes_upright(data: bytes | bytearray | memoryview, name: str, channels: int = 3, *,
                         check_side: int | None = None, draft: int | None = None) -> Image.Image:
    """Steps 1 to 5 of the module docstring on encoded bytes, for transforms that resize and crop on their own
    (:mod:`vggnet.data.paper`): an upright 8-bit PIL image, ``RGB`` for ``channels=3`` and ``L`` otherwise, of the
    image's own size -- or, with ``draft``, of a JPEG decoded at a reduced size whose sides stay >= ``draft``.
    ``check_side``: the largest shorter side it will be resized to (refused when that intermediate would exceed
    :data:`MAX_IMAGE_PIXELS`). Errors as :func:`decode_bytes`."""
    _check_arguments(check_side, channels)
    if draft is not None and draft < 1:
        raise ConfigError(f"draft must be >= 1 pixel, got {draft}")

    def decode() -> Image.Image:
        with Image.open(_NamedBytes(data, name)) as opened:
            return _upright(opened, channels, check_side, draft)

    return _named(name, decode)


def decode_files(files: Sequence[str | os.PathLike], image_size: int | None, channels: int
                 ) -> tuple[torch.Tensor | None, list[int], list[tuple[int, str]]]:
    """Decode image files into one uint8 batch ``(n, C, h, w)`` (:func:`decode_image` each, at ``image_size`` with
    ``channels`` channels). Returns the batch of the readable files (``None`` when there is none), the position in
    ``files`` of each of its rows, and ``(position, message)`` for each unreadable file (the message names it): one
    bad file never stops the others."""
    images, where, errors = [], [], []
    for position, path in enumerate(files):
        try:
            images.append(torch.from_numpy(decode_image(path, image_size, channels)).permute(2, 0, 1))
            where.append(position)
        except DataError as err:
            errors.append((position, str(err)))
    return (torch.stack(images) if images else None), where, errors
