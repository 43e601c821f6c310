"""Turning uint8 batches into model inputs (:class:`Preprocess`) and augmenting them (:class:`Augment`).

Both work on whole batches on any device, with no per-sample Python: the training loop indexes a uint8 batch out of
the in-memory dataset, calls ``Preprocess`` (the same object in training, evaluation and prediction; it is saved in
``model.json`` via :meth:`Preprocess.to_dict`), then ``Augment`` in training only.

Normalisation. ``Preprocess`` scales pixels to [0, 1] and computes ``(x - mean) / std`` per channel. The VGG paper's
only preprocessing is subtracting the mean RGB value of the training set: that is ``std=(1, 1, 1)`` with ``mean``
from :func:`channel_stats` (values then lie in about [-0.5, 0.5] rather than the paper's 0..255 scale, which only
rescales the first layer's weights). Per-channel standardisation uses both numbers from :func:`channel_stats`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F

from vggnet.data.dataset import ImageDataset
from vggnet.base.errors import ConfigError, DataError, InputSizeError

FITS = ("auto", "pad", "resize")
#: ``fit="auto"`` pads when the input is at most this many pixels smaller than ``image_size`` (28 -> 32), else resizes.
AUTO_PAD_LIMIT = 8
PAD_MODES = ("reflect", "constant")
CHANNEL_ORDERS = ("rgb", "bgr")
#: Preprocess fields added after model.json format 1 was fixed, with the defaults that mean "as before".
_OPTIONAL_DEFAULTS = {"channel_order": "rgb", "crop_fraction": 1.0}
#: Random erasing: rectangle area as a fraction of the image, and log-uniform aspect ratio (torchvision's defaults).
ERASE_AREA = (0.02, 0.33)
ERASE_RATIO = (0.3, 3.3)


def _check_batch(x: torch.Tensor, what: str) -> None:
    if x.dim() != 4:
        raise InputSizeError(f"{what} expects a batch (B, C, H, W), got shape {tuple(x.shape)}; "
                             "add a batch dimension with x.unsqueeze(0)")


@dataclass
class Preprocess:
    """uint8 ``(B, C, h, w)`` -> float32 ``(B, C, S, S)``: scale to [0, 1], fit to ``S = image_size``, normalise.

    ``fit``: ``"pad"`` centres the image in an S x S zero (black) canvas -- in pixel space, before normalisation, so
    the border matches a black background; ``"resize"`` is bilinear (antialiased when shrinking); ``"auto"`` pads
    when ``0 <= S - h <= 8`` and ``0 <= S - w <= 8`` for the incoming batch (Fashion-MNIST 28 -> 32), else resizes.
    ``in_size`` records the native size of the training data (for ``model.json`` and :meth:`resolved_fit`).
    An input already S x S is only normalised.

    Conventions of weights trained elsewhere (:mod:`vggnet.store.weights`):

    - ``crop_fraction``: the centre fraction of the incoming image that is kept before fitting to S (torchvision's
      ``CenterCrop`` rounding); 1.0 keeps all of it. Image files are decoded at :attr:`decode_size`
      (``round(S / crop_fraction)``), so 0.875 with S = 224 decodes at 256 and crops the centre 224 x 224, the
      ImageNet evaluation transform (Resize(256) + CenterCrop(224)).
    - ``channel_order``: the order the model takes its colour channels in. Batches always arrive in RGB (every
      reader and :func:`vggnet.data.decode_image` give RGB); ``"bgr"`` reverses them before normalising, as the
      Caffe/Keras VGG weights expect. ``mean`` and ``std`` are in the model's order. Keras' "caffe" mode (BGR,
      0..255, mean subtracted) is ``mean = m / 255`` and ``std = 1 / 255``: ``(x / 255 - m / 255) * 255 = x - m``.
    """

    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    fit: str = "auto"
    in_size: int | None = None
    channel_order: str = "rgb"  # "rgb" or "bgr": the order the model takes (batches arrive RGB)
    crop_fraction: float = 1.0  # centre fraction of the input kept before fitting (0.875: 256 -> 224)

    def __post_init__(self) -> None:
        self.mean = tuple(float(m) for m in self.mean)
        self.std = tuple(float(s) for s in self.std)
        if int(self.image_size) != self.image_size or self.image_size < 1:
            raise ConfigError(f"Preprocess image_size must be a positive integer, got {self.image_size}")
        self.image_size = int(self.image_size)
        if not self.mean or len(self.mean) != len(self.std):
            raise ConfigError(f"Preprocess needs one mean and one std per channel, got {len(self.mean)} means and "
                              f"{len(self.std)} stds")
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"Preprocess std must be > 0 per channel, got {self.std}; use 1.0 for mean subtraction")
        if self.fit not in FITS:
            raise ConfigError(f"Preprocess fit must be one of {', '.join(FITS)}, got {self.fit!r}")
        if self.in_size is not None and self.in_size < 1:
            raise ConfigError(f"Preprocess in_size must be a positive integer or None, got {self.in_size}")
        if self.channel_order not in CHANNEL_ORDERS:
            raise ConfigError(f"Preprocess channel_order must be one of {', '.join(CHANNEL_ORDERS)}, got "
                              f"{self.channel_order!r}")
        if self.channel_order == "bgr" and self.channels != 3:
            raise ConfigError(f"Preprocess channel_order 'bgr' needs 3 channels, got {self.channels}")
        self.crop_fraction = float(self.crop_fraction)
        if not 0.0 < self.crop_fraction <= 1.0:
            raise ConfigError(f"Preprocess crop_fraction must be in (0, 1] (the centre fraction kept), got "
                              f"{self.crop_fraction}")

    @property
    def channels(self) -> int:
        return len(self.mean)

    @property
    def decode_size(self) -> int:
        """The square size image files are decoded to for this preprocessing (``vggnet predict``): ``in_size`` when
        recorded, else ``round(image_size / crop_fraction)`` (256 for 224 at 0.875)."""
        return self.in_size or int(round(self.image_size / self.crop_fraction))

    def resolved_fit(self, h: int | None = None, w: int | None = None) -> str:
        """``"pad"``, ``"resize"`` or ``"none"`` for an ``h`` x ``w`` input (default: ``in_size`` square)."""
        h = self.in_size if h is None else h
        w = h if w is None else w
        size = self.image_size
        if h == size and w == size:
            return "none"
        if self.fit != "auto":
            return self.fit
        if h is not None and 0 <= size - h <= AUTO_PAD_LIMIT and 0 <= size - w <= AUTO_PAD_LIMIT:
            return "pad"
        return "resize"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _check_batch(x, "Preprocess")
        if x.dtype != torch.uint8:
            raise InputSizeError(f"Preprocess expects uint8 pixels 0..255, got {x.dtype}; pass the dataset's uint8 "
                                 "images, not already-scaled floats")
        if x.shape[1] != self.channels:
            raise InputSizeError(f"Preprocess was set up for {self.channels} channel(s), got {x.shape[1]}; "
                                 "convert the images (RGB vs grayscale) to match the model")
        if self.crop_fraction < 1.0:
            x = self._centre_crop(x)
        if self.channel_order == "bgr":
            x = x.flip(1)
        h, w = x.shape[-2:]
        x = x.to(torch.float32).div_(255.0)
        mode = self.resolved_fit(h, w)
        if mode == "pad":
            x = self._pad(x)
        elif mode == "resize":
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False,
                              antialias=h > self.image_size or w > self.image_size)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return x.sub_(mean).div_(std)

    def _centre_crop(self, x: torch.Tensor) -> torch.Tensor:
        """The centre ``crop_fraction`` of each side; offsets rounded as torchvision's ``CenterCrop`` does."""
        h, w = x.shape[-2:]
        ch, cw = max(1, int(round(h * self.crop_fraction))), max(1, int(round(w * self.crop_fraction)))
        top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
        return x[..., top:top + ch, left:left + cw]

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        dh, dw = self.image_size - h, self.image_size - w
        if dh < 0 or dw < 0:
            raise InputSizeError(f"cannot pad a {h}x{w} image to {self.image_size}x{self.image_size}; "
                                 "use fit='resize' (or 'auto') for larger inputs")
        return F.pad(x, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2))

    def to_dict(self) -> dict:
        """JSON-able description; :meth:`from_dict` rebuilds an equal object.

        ``channel_order`` and ``crop_fraction`` are written only when they differ from their defaults: model.json of
        an ordinary run stays exactly what vggnet wrote before they existed (and readable by those versions), while
        a file whose meaning depends on them (BGR, a centre crop) says so -- and an older vggnet refuses it."""
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        for name, default in _OPTIONAL_DEFAULTS.items():
            if d[name] == default:
                del d[name]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Preprocess:
        """The inverse of :meth:`to_dict`; keys added later (``channel_order``, ``crop_fraction``) may be absent, as
        in model.json files written before them, and take their defaults."""
        names = {f.name for f in fields(cls)}
        missing = {"image_size", "mean", "std"} - set(d)
        unknown = set(d) - names
        if missing or unknown:
            raise ConfigError(f"preprocess settings: missing {sorted(missing)}, unknown {sorted(unknown)}; "
                              f"expected keys {sorted(names)}")
        return cls(**d)


def channel_stats(ds: ImageDataset, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of ``ds.images / 255``, exact.

    Counts the 256 pixel values per channel in chunks (bounded memory, no float accumulation error), then takes the
    moments of those histograms in float64.
    """
    if len(ds) == 0:
        raise DataError(f"{ds.name}: cannot compute channel statistics of an empty dataset")
    channels = ds.images.shape[1]
    counts = torch.zeros(channels, 256, dtype=torch.float64)
    for start in range(0, len(ds), chunk):
        block = ds.images[start:start + chunk]
        if not isinstance(block, torch.Tensor):
            block = block.to("cpu")  # streamed images (vggnet.data.stream.StreamedImages): decoded a chunk at a time
        for c in range(channels):
            counts[c] += torch.bincount(block[:, c].reshape(-1), minlength=256).cpu().to(torch.float64)
    values = torch.arange(256, dtype=torch.float64) / 255.0
    n = counts.sum(dim=1)
    mean = (counts * values).sum(dim=1) / n
    var = ((counts * values.square()).sum(dim=1) / n - mean.square()).clamp_min(0.0)
    return tuple(mean.tolist()), tuple(var.sqrt().tolist())


def _uniform(n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """``n`` uniform [0, 1) draws from ``generator`` (on its own device), moved to ``device``."""
    where = generator.device if generator is not None else device
    return torch.rand(n, generator=generator, device=where).to(device)


@dataclass
class Augment:
    """Batch augmentation with per-sample randomness, for float batches already at the model's input size.

    Applied in this order, each only when enabled:

    * ``scale_jitter=(lo, hi)``: every sample is zoomed into a random square window whose side is a uniform
      fraction in ``[lo, hi]`` of the image side, at a random position, resampled back to full size (bilinear, one
      ``affine_grid``/``grid_sample`` for the whole batch). The paper's S in [256, 512] with 224 crops is about
      ``(0.4375, 0.875)``.
    * ``crop_padding=p``: pad by ``p`` (``pad_mode``: ``"reflect"`` by default, or ``"constant"`` zeros, which is
      the dataset mean after normalisation) and take a random crop of the original size, one offset per sample,
      gathered in one indexing operation.
    * ``flip``: mirror left-right with probability 1/2 per sample.
    * ``erasing=p``: with probability ``p`` per sample, set a random rectangle (2-33 % of the area, aspect ratio
      0.3-3.3) to 0, i.e. to the mean colour of normalised data.

    ``generator`` makes the draws reproducible. Turn ``flip`` and ``crop_padding`` off where they are wrong for
    the data (that is the caller's choice).
    """

    crop_padding: int = 4
    flip: bool = True
    scale_jitter: tuple[float, float] | None = None
    erasing: float = 0.0
    pad_mode: str = "reflect"

    def __post_init__(self) -> None:
        if self.crop_padding < 0:
            raise ConfigError(f"Augment crop_padding must be >= 0 pixels, got {self.crop_padding}")
        if self.scale_jitter is not None:
            lo, hi = self.scale_jitter
            if not 0.0 < lo <= hi <= 1.0:
                raise ConfigError(f"Augment scale_jitter must be (lo, hi) with 0 < lo <= hi <= 1 (fractions of the "
                                  f"image side), got {self.scale_jitter}")
            self.scale_jitter = (float(lo), float(hi))
        if not 0.0 <= self.erasing <= 1.0:
            raise ConfigError(f"Augment erasing is a probability in [0, 1], got {self.erasing}")
        if self.pad_mode not in PAD_MODES:
            raise ConfigError(f"Augment pad_mode must be one of {', '.join(PAD_MODES)}, got {self.pad_mode!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["scale_jitter"] = list(self.scale_jitter) if self.scale_jitter else None
        return d

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        _check_batch(x, "Augment")
        if not x.is_floating_point():
            raise InputSizeError(f"Augment expects a float batch (after Preprocess), got {x.dtype}")
        if self.scale_jitter is not None:
            x = self.random_scale(x, generator)
        if self.crop_padding:
            x = self.random_crop(x, generator)
        if self.flip:
            x = self.random_flip(x, generator)
        if self.erasing:
            x = self.random_erase(x, generator)
        return x

    def random_scale(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        b = x.shape[0]
        lo, hi = self.scale_jitter
        side = lo + (hi - lo) * _uniform(b, generator, x.device)
        shift_x = (1 - side) * (2 * _uniform(b, generator, x.device) - 1)
        shift_y = (1 - side) * (2 * _uniform(b, generator, x.device) - 1)
        theta = torch.zeros(b, 2, 3, dtype=x.dtype, device=x.device)
        theta[:, 0, 0], theta[:, 1, 1] = side, side
        theta[:, 0, 2], theta[:, 1, 2] = shift_x, shift_y
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    def random_crop(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        p = self.crop_padding
        if self.pad_mode == "reflect" and p >= min(h, w):
            raise InputSizeError(f"reflect padding of {p} needs images larger than {p}x{p}, got {h}x{w}; "
                                 "use a smaller crop_padding or pad_mode='constant'")
        padded = F.pad(x, (p, p, p, p), mode=self.pad_mode)
        offset_y = (_uniform(b, generator, x.device) * (2 * p + 1)).long()
        offset_x = (_uniform(b, generator, x.device) * (2 * p + 1)).long()
        rows = (offset_y.view(b, 1) + torch.arange(h, device=x.device)).view(b, 1, h, 1)
        cols = (offset_x.view(b, 1) + torch.arange(w, device=x.device)).view(b, 1, 1, w)
        batch = torch.arange(b, device=x.device).view(b, 1, 1, 1)
        chans = torch.arange(c, device=x.device).view(1, c, 1, 1)
        return padded[batch, chans, rows, cols]

    def random_flip(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        mask = _uniform(x.shape[0], generator, x.device) < 0.5
        return torch.where(mask.view(-1, 1, 1, 1), x.flip(3), x)

    def random_erase(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        b, _, h, w = x.shape
        apply = _uniform(b, generator, x.device) < self.erasing
        area = (ERASE_AREA[0] + (ERASE_AREA[1] - ERASE_AREA[0]) * _uniform(b, generator, x.device)) * (h * w)
        log_lo, log_hi = math.log(ERASE_RATIO[0]), math.log(ERASE_RATIO[1])
        ratio = torch.exp(log_lo + (log_hi - log_lo) * _uniform(b, generator, x.device))
        eh = (area * ratio).sqrt().round().clamp(1, h).long()
        ew = (area / ratio).sqrt().round().clamp(1, w).long()
        top = (_uniform(b, generator, x.device) * (h - eh + 1)).long()
        left = (_uniform(b, generator, x.device) * (w - ew + 1)).long()
        ys = torch.arange(h, device=x.device).view(1, h, 1)
        xs = torch.arange(w, device=x.device).view(1, 1, w)
        inside = ((ys >= top.view(b, 1, 1)) & (ys < (top + eh).view(b, 1, 1))
                  & (xs >= left.view(b, 1, 1)) & (xs < (left + ew).view(b, 1, 1)))
        return x.masked_fill((inside & apply.view(b, 1, 1)).unsqueeze(1), 0.0)
