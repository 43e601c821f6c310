"""The paper's data protocol (Simonyan & Zisserman, arXiv:1409.1556, sections 3.1 and 3.2) as per-sample transforms:
encoded image bytes in, the uint8 ``(C, H, W)`` tensor a batch is stacked from out.

Training, :class:`TrainTransform`, per image:

1. decode with the one decoder (:func:`vggnet.data.images.decode_bytes_upright`: EXIF orientation, transparency
   over black, RGB, or luminance for other channel counts); a JPEG at least twice ``S`` on its shorter side is
   decoded straight to a reduced size by libjpeg's DCT scaling (Pillow's ``Image.draft``: 1/2, 1/4 or 1/8, the
   shorter side staying >= ``S``), unless ``draft=False``. Measured at ``S = 256`` (one core of a 2-core AMD
   EPYC, Pillow 13): 1.8x faster per image on 683x512 JPEGs (a set prepared with ``--max-side 512``), 1.6x on
   1024x768, 1.8x on 2048x1536; nothing changes below 2S (500x375 at S = 256);
2. isotropic rescale so the shorter side is ``S``, the longer ``int(S * long / short)`` (torchvision's rounding):
   ``S`` fixed, or an integer drawn uniformly from ``[Smin, Smax]`` for each image ("scale jittering");
3. a random ``crop`` x ``crop`` window of the rescaled image, every position equally likely;
4. a horizontal flip with probability 1/2;
5. AlexNet's colour shift (Krizhevsky et al. 2012, section 4.1): ``sum_i alpha_i * lambda_i * p_i`` added to every
   pixel, ``alpha_i ~ N(0, colour)`` per image, with ImageNet's RGB eigenvalues :data:`IMAGENET_EIGVAL` and
   eigenvectors :data:`IMAGENET_EIGVEC` (for pixel values in [0, 1]; here scaled by 255 to uint8 levels), rounded
   to whole levels, added and clipped to 0..255. A grey image (``channels`` other than 3) gets the
   shift's luminance (:data:`LUMINANCE`), the change a colour image's luminance would see.

Steps 2 and 3 are one resampling, of only the pixels the crop needs: the crop's source window, ``ceil(crop * side /
S_side)`` source pixels on each axis (the fewest whose rescaling covers the crop) at a uniformly drawn integer source
position, is rescaled by the whole image's exact factor (torch's antialiased uint8 bilinear filter,
:func:`torch.nn.functional.interpolate` with ``scale_factor``) and the first ``crop`` pixels of each axis kept. So the
scale is exactly S's, the crop lies wherever it may in the image, and the pixels are those of rescaling the whole
image and cropping (torchvision's ``Resize(S, antialias=True)`` then ``RandomCrop`` on a tensor) on a grid that
starts at a source pixel: equal to them for a window at the image's corner (a test checks), elsewhere differing
only in the crop's first row and column, whose filter stops at the window's edge (as ``RandomResizedCrop``'s do at
every edge). Against Pillow's resampling of the same box, the interior differs by at most 2 levels on noise and by
1 level on a fraction of a percent of a photo's pixels: both are fixed-point versions of one filter. It costs what
the crop costs, not the rescaled image: measured on one core of a 2-core AMD EPYC (Zen 5 kind), a 224 crop of a
500x375 JPEG at S = 256 took 0.26 ms where Pillow's box resampling took 0.85 ms and rescaling the whole image
1.6 ms; at S = 512 the window is a quarter of that. Decoding (0.9 ms) is then most of the work. The mean
subtraction (the paper's only preprocessing) is left to the batch (:class:`vggnet.data.Preprocess`).

The colour shift is rounded to whole levels (half to even) per channel, then added and clipped to 0..255: the same
values as adding it in float and rounding, except where a shift's fraction is exactly one half (probability 0 for a
normal alpha).

Randomness: everything one image's augmentation draws comes from one ``numpy.random.Generator`` built from the
``seed`` passed with it (:meth:`TrainTransform.draw`, in the order scale, crop position, flip, alpha), so an
augmentation is a function of its seed alone, whatever process or worker computes it.

Test, :class:`TestTransform`: rescale so the shorter side is ``Q`` then crop the centre ``crop`` squared
(torchvision's ``Resize(Q)`` + ``CenterCrop(crop)``; with ``Q == crop`` exactly the pixels of
:func:`vggnet.data.images.decode_image`), or, with ``crop=None``, the whole rescaled image for dense evaluation
(section 3.2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vggnet.base.errors import ConfigError
from vggnet.base.limits import IMAGE_SIZE, MAX_CHANNELS, Range
from vggnet.data.images import (centre_crop, decode_bytes_upright, rescaled_size, resize_shorter,
                                to_array)

#: ImageNet's RGB covariance: eigenvalues lambda_i (pixel values in [0, 1]) and eigenvectors p_i as the COLUMNS of
#: the matrix (rows R, G, B). AlexNet used them without publishing them; these are the values computed on ImageNet's
#: training images by fb.resnet.torch (facebookarchive/fb.resnet.torch, datasets/imagenet.lua, 2016), which every
#: PyTorch "Lighting" transform since copies (MXNet's ``RandomLighting`` has the same, times 255).
IMAGENET_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_EIGVEC = ((-0.5675, 0.7192, 0.4009),
                   (-0.5808, -0.0045, -0.8140),
                   (-0.5836, -0.6948, 0.4203))
#: ITU-R 601-2 luminance weights of R, G, B: Pillow's ``L`` conversion, which the decoder uses for grey images.
LUMINANCE = (0.299, 0.587, 0.114)
#: AlexNet's and fb.resnet.torch's standard deviation of alpha.
PAPER_COLOUR = 0.1
_COLOUR = Range(0, 10)
_CHANNELS = Range(1, MAX_CHANNELS, integer=True)


def _check(name: str, value: object, allowed: Range) -> None:
    problem = allowed.problem(value)
    if problem:
        raise ConfigError(f"{name} {problem}")


def _scales(scale: int | Sequence[int]) -> tuple[int, int]:
    """``S`` or ``(Smin, Smax)`` as ``(Smin, Smax)``, checked."""
    if isinstance(scale, (tuple, list)):
        if len(scale) != 2:
            raise ConfigError(f"scale must be one side S or a pair (Smin, Smax), got {scale!r}; e.g. 256 or (256, 512)")
        smin, smax = scale
    else:
        smin = smax = scale
    _check("scale", smin, IMAGE_SIZE)
    _check("scale", smax, IMAGE_SIZE)
    if smin > smax:
        raise ConfigError(f"scale (Smin, Smax) must have Smin <= Smax, got {scale!r}; e.g. (256, 512)")
    return smin, smax


def colour_shift(alpha: Sequence[float], channels: int = 3) -> np.ndarray:
    """The colour shift in uint8 levels for one image: ``255 * sum_i alpha_i * lambda_i * p_i`` for R, G, B, or its
    luminance (one value) when ``channels`` is not 3."""
    rgb = 255.0 * np.asarray(IMAGENET_EIGVEC) @ (np.asarray(alpha, np.float64) * np.asarray(IMAGENET_EIGVAL))
    return rgb if channels == 3 else np.array([np.asarray(LUMINANCE) @ rgb])


def _tensor(image: Image.Image, channels: int) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(to_array(image, channels).transpose(2, 0, 1)))


@dataclass(frozen=True)
class Draw:
    """What one image's augmentation drew: the scale ``S``, the crop position as fractions in [0, 1) of the possible
    offsets (``top``, ``left``), the flip, and ``alpha`` of the colour shift."""

    scale: int
    top: float
    left: float
    flip: bool
    alpha: tuple[float, float, float]

    def offsets(self, height: int, width: int, crop_height: int, crop_width: int | None = None) -> tuple[int, int]:
        """The top and left pixel of a ``crop_height`` x ``crop_width`` (default: square) window in a ``height`` x
        ``width`` image: uniform over the ``height - crop_height + 1`` and ``width - crop_width + 1`` positions."""
        crop_width = crop_height if crop_width is None else crop_width
        return (min(int(self.top * (height - crop_height + 1)), height - crop_height),
                min(int(self.left * (width - crop_width + 1)), width - crop_width))


def _factor(length: int, new_length: int) -> float:
    """The rescaling factor of one axis (output pixels per source pixel), nudged up by one ulp so that torch's output
    length, ``floor(length * factor)``, is ``new_length`` and not one less after rounding."""
    return math.nextafter(new_length / length, math.inf)


def _window(crop: int, factor: float) -> int:
    """The fewest source pixels whose rescaling by ``factor`` gives at least ``crop`` output pixels, counted as
    torch counts them (``floor(n * factor)``, :func:`torch.nn.functional.interpolate` with a scale factor)."""
    n = max(1, math.ceil(crop / factor) - 1)
    while math.floor(float(n) * factor) < crop:
        n += 1
    return n


def _margin(factor: float) -> int:
    """Source pixels past the window that the bilinear filter of its last output pixel reaches: its support is one
    output pixel each side, ``1 / factor`` source pixels when shrinking (antialiased), one when enlarging."""
    return math.ceil(max(1.0, 1.0 / factor)) + 1


def _image_tensor(image: Image.Image, channels: int) -> torch.Tensor:
    """A decoded image as a ``(1, C, H, W)`` uint8 view of its pixels, channels last in memory (what torch's
    antialiased uint8 resampling takes without a copy)."""
    return torch.from_numpy(to_array(image, channels)).permute(2, 0, 1).unsqueeze(0)


class TrainTransform:
    """The paper's training augmentation (module docstring): ``transform(data, name, seed)`` -> uint8
    ``(channels, crop, crop)``. ``scale``: ``S`` or ``(Smin, Smax)`` (jittered); ``flip``: random horizontal flips;
    ``colour``: the standard deviation of alpha (0: no colour shift); ``draft``: decode large JPEGs at a reduced
    size. A sample that cannot be decoded raises :class:`vggnet.data.images.ImageFileError` naming ``name``."""

    def __init__(self, scale: int | Sequence[int] = (256, 512), crop: int = 224, flip: bool = True,
                 colour: float = PAPER_COLOUR, channels: int = 3, draft: bool = True) -> None:
        self.smin, self.smax = _scales(scale)
        _check("crop", crop, IMAGE_SIZE)
        if crop > self.smin:
            raise ConfigError(f"crop {crop} does not fit in an image rescaled to S = {self.smin} on its shorter "
                              f"side; use crop <= {self.smin} or a larger scale")
        _check("colour", colour, _COLOUR)
        _check("channels", channels, _CHANNELS)
        self.crop, self.flip, self.colour, self.channels, self.draft = crop, bool(flip), float(colour), channels, draft

    def __repr__(self) -> str:
        scale = self.smin if self.smin == self.smax else (self.smin, self.smax)
        return (f"TrainTransform(scale={scale}, crop={self.crop}, flip={self.flip}, colour={self.colour}, "
                f"channels={self.channels}, draft={self.draft})")

    def draw(self, seed: int | Sequence[int]) -> Draw:
        """Everything the augmentation of the sample seeded ``seed`` draws, from ``numpy.random.default_rng(seed)``
        in this order: S (uniform integer in [Smin, Smax]), the crop's top and left fractions, the flip (a uniform
        < 0.5, False when ``flip`` is off), alpha (3 normals of standard deviation ``colour``). Each is drawn
        whatever the options, so turning one off changes nothing else."""
        if isinstance(seed, int) and seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {seed}")
        rng = np.random.default_rng(seed)
        scale = int(rng.integers(self.smin, self.smax, endpoint=True))
        top, left = (float(v) for v in rng.random(2))
        flip = bool(rng.random() < 0.5) and self.flip
        alpha = tuple(float(v) for v in rng.normal(0.0, self.colour, 3))
        return Draw(scale, top, left, flip, alpha)

    def apply(self, image: Image.Image, draw: Draw) -> torch.Tensor:
        """Steps 2 to 5 on a decoded ``RGB`` or ``L`` image, as ``draw`` says: the uint8 ``(channels, crop, crop)``."""
        pixels = _image_tensor(image, self.channels)
        h, w = pixels.shape[2:]
        new_w, new_h = rescaled_size(w, h, draw.scale)
        if (new_w, new_h) == (w, h):  # S is the image's own shorter side: a plain crop
            top, left = draw.offsets(h, w, self.crop)
            out = pixels[0, :, top:top + self.crop, left:left + self.crop]
        else:
            fy, fx = _factor(h, new_h), _factor(w, new_w)
            win_h, win_w = _window(self.crop, fy), _window(self.crop, fx)
            top, left = draw.offsets(h, w, win_h, win_w)
            margin_h, margin_w = _margin(fy), _margin(fx)  # what the filter of the last row and column reaches
            window = pixels[:, :, top:top + win_h + margin_h, left:left + win_w + margin_w]
            out = F.interpolate(window, scale_factor=(fy, fx), mode="bilinear", antialias=True,
                                recompute_scale_factor=False)[0, :, :self.crop, :self.crop]
        if draw.flip:
            out = out.flip(-1)
        shift = np.rint(colour_shift(draw.alpha, 3 if self.channels == 3 else 1))
        if shift.any():
            levels = torch.from_numpy(shift).to(torch.int16).view(-1, 1, 1)
            out = out.to(torch.int16).add_(levels).clamp_(0, 255).to(torch.uint8)
        return out.contiguous()

    def __call__(self, data: bytes | bytearray | memoryview, name: str, seed: int | Sequence[int]) -> torch.Tensor:
        draw = self.draw(seed)
        image = decode_bytes_upright(data, name, self.channels, check_side=self.smax,
                                     draft=draw.scale if self.draft else None)
        return self.apply(image, draw)


class TestTransform:
    """The paper's test-time rescale (module docstring): ``transform(data, name)`` -> uint8 ``(channels, crop,
    crop)``, or ``(channels, H, W)`` with the shorter side ``scale`` when ``crop`` is None (dense evaluation).
    Deterministic; ``seed`` is accepted, and ignored, so both transforms are called alike. ``draft``: decode large
    JPEGs at a reduced size (off by default: the pixels then equal ``vggnet predict``'s)."""

    __test__ = False  # not a pytest test class, whatever its name

    def __init__(self, scale: int = 256, crop: int | None = 224, channels: int = 3, draft: bool = False) -> None:
        _check("scale", scale, IMAGE_SIZE)
        if crop is not None:
            _check("crop", crop, IMAGE_SIZE)
            if crop > scale:
                raise ConfigError(f"crop {crop} does not fit in an image rescaled to Q = {scale} on its shorter "
                                  f"side; use crop <= {scale}, or crop=None for the whole image")
        _check("channels", channels, _CHANNELS)
        self.scale, self.crop, self.channels, self.draft = scale, crop, channels, draft

    def __repr__(self) -> str:
        return f"TestTransform(scale={self.scale}, crop={self.crop}, channels={self.channels}, draft={self.draft})"

    def __call__(self, data: bytes | bytearray | memoryview, name: str, seed: object = None) -> torch.Tensor:
        image = decode_bytes_upright(data, name, self.channels, check_side=self.scale,
                                     draft=self.scale if self.draft else None)
        image = resize_shorter(image, self.scale)
        if self.crop is not None:
            image = centre_crop(image, self.crop)
        return _tensor(image, self.channels)
