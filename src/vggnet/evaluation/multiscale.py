"""The paper's test-time protocols (Simonyan & Zisserman, section 3.2; Tables 3-5): dense and multi-crop evaluation
at several test scales, with and without horizontal flips.

Scale. A test scale ``Q`` is a side length in pixels. The test image *as the model sees it at its training size S*
(the source's own :class:`~vggnet.data.Preprocess` at ``S``: Fashion-MNIST's 28 x 28 is padded to 32 x 32) is
rescaled isotropically to ``Q x Q`` (bilinear, antialiased when shrinking). ``Q = S`` is the single-scale case and
leaves the image as it is. The paper rescales the image so that its smallest side is ``Q``; our images are square,
so that is the whole image. Rescaling the normalised image equals normalising the rescaled one (bilinear weights
sum to 1 and the normalisation is affine per channel), so it is done after :class:`Preprocess`. A prepared
(streamed) test set is evaluated by :mod:`vggnet.evaluation.multiscale_streamed` instead: each image decoded from its
own bytes with its smallest side at ``Q``, whole and not square, through the same views and averaging
(:func:`scale_views`, :func:`log_mean`).

Protocols (:class:`Protocol`), each giving class probabilities per image and scale:

- **dense**: the net made fully convolutional (:func:`vggnet.to_dense`; a ``gap`` or ``dense`` head takes any size
  as it is) runs on the whole ``Q x Q`` image; its forward averages the class-score map over space, then softmax.
  With ``flip`` the softmax of the mirrored image is averaged in.
- **multi-crop** (``crops=(R, C)``; 5 x 5 is the paper's grid): ``R x C`` crops of ``S x S`` on a regular grid, the
  offsets evenly spaced from 0 to ``Q - S`` (:func:`grid_offsets`: rounded half up, duplicates dropped, so at
  ``Q = S`` the one crop is counted once; one row or column takes the centre), each through the *original* net;
  with ``flip`` also each crop's mirror; the softmax is averaged over all of them.
- **combined** (``dense`` and ``crops``): the mean of the dense and the multi-crop probabilities (Table 5).

Several scales: the mean of the per-scale probabilities. :func:`multiscale_log_probs` returns the log of the
averaged probabilities (the weighted mean is taken in log space, ``logsumexp(log p_v + log w_v)``, so a confident
view cannot underflow to ``log 0``); :func:`evaluate_multiscale` passes them to
:func:`vggnet.evaluation.metrics.metrics_from_logits` as logits, so top-1, top-5, per-class accuracy and the confusion
matrix mean what they mean for plain evaluation, and the loss is the NLL of the averaged probabilities.

Memory. Images go in chunks (``batch_size``, default :func:`~vggnet.evaluation.metrics.auto_batch_size` at ``S x S``);
each view (one scale, one crop position, one flip) of a chunk is one forward pass, split further so that no pass
holds more than ``batch_size`` inputs (default: ``auto_batch_size`` at the input's own size, so a dense pass at a
large ``Q`` takes fewer images).
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vggnet.base.errors import ConfigError, InputSizeError
from vggnet.evaluation.metrics import (EvalResult, auto_batch_size, inference_form, metrics_from_logits,
                                       preprocessed_batches)
from vggnet.net.models import VGG
from vggnet.net.dense import to_dense
from vggnet.runtime import AdaptiveThreads, autocast, uses_cpu_bf16_path

#: The paper's multi-crop grid (rows, columns) per scale.
PAPER_CROPS = (5, 5)


@dataclass(frozen=True)
class Protocol:
    """What :func:`evaluate_multiscale` averages: test ``scales`` (pixels), ``dense`` evaluation, a ``crops`` grid
    ``(rows, columns)`` or ``None``, and ``flip`` (mirrored images too). At least one of ``dense`` and ``crops``."""

    scales: tuple[int, ...]
    dense: bool = False
    crops: tuple[int, int] | None = None
    flip: bool = False

    def __post_init__(self) -> None:
        scales = tuple(self.scales) if isinstance(self.scales, (list, tuple)) else (self.scales,)
        if not scales or any(not _is_count(q) for q in scales):
            raise ConfigError(f"test scales must be positive integers (image sides in pixels), e.g. (32, 40, 48), "
                              f"got {self.scales!r}")
        if len(set(scales)) != len(scales):
            raise ConfigError(f"test scales must be distinct (a repeated scale would count twice), got "
                              f"{list(scales)}: list each once")
        object.__setattr__(self, "scales", tuple(int(q) for q in scales))
        if self.crops is not None:
            crops = tuple(self.crops)
            if len(crops) != 2 or any(not _is_count(n) for n in crops):
                raise ConfigError(f"crops must be (rows, columns) of positive integers, e.g. (5, 5), got "
                                  f"{self.crops!r}")
            object.__setattr__(self, "crops", (int(crops[0]), int(crops[1])))
        if not self.dense and self.crops is None:
            raise ConfigError("a test protocol needs dense=True, crops=(rows, columns), or both (the paper's "
                              "dense, multi-crop and combined evaluation)")

    def describe(self) -> str:
        """``"dense Q=32,40,48 + flip"``, ``"5x5 crops Q=32"``, ``"dense + 5x5 crops Q=32,40"``."""
        parts = (["dense"] if self.dense else []) + ([f"{self.crops[0]}x{self.crops[1]} crops"] if self.crops else [])
        text = " + ".join(parts) + " Q=" + ",".join(str(q) for q in self.scales)
        return text + (" + flip" if self.flip else "")

    def to_dict(self) -> dict:
        return {"scales": list(self.scales), "dense": self.dense,
                "crops": list(self.crops) if self.crops else None, "flip": self.flip}


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def parse_scales(text: str) -> tuple[int, ...]:
    """``"32,40,48"`` -> ``(32, 40, 48)``; anything else is a one-line :class:`ConfigError`."""
    pieces = [p.strip() for p in str(text).split(",")]
    if not all(re.fullmatch(r"\d+", p) for p in pieces) or any(int(p) < 1 for p in pieces):
        raise ConfigError(f"--scales expects comma-separated image sides in pixels, e.g. 32,40,48, got {text!r}")
    scales = tuple(int(p) for p in pieces)
    if len(set(scales)) != len(scales):
        raise ConfigError(f"--scales lists a scale twice ({text!r}); a repeated scale would count twice: list "
                          "each once")
    return scales


def parse_crops(text: str) -> tuple[int, int]:
    """``"5x5"`` -> ``(5, 5)`` (rows x columns); anything else is a one-line :class:`ConfigError`."""
    match = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", str(text))
    if not match or int(match.group(1)) < 1 or int(match.group(2)) < 1:
        raise ConfigError(f"--crops expects ROWSxCOLUMNS of positive integers, e.g. 5x5 (the paper's grid), "
                          f"got {text!r}")
    return int(match.group(1)), int(match.group(2))


def grid_offsets(q: int, s: int, n: int) -> list[int]:
    """The ``n`` offsets of ``s``-wide crops in a ``q``-wide image: evenly spaced from 0 to ``q - s`` (rounded half
    up), duplicates dropped; one crop is centred (``(q - s) // 2``). ``grid_offsets(36, 32, 5) == [0, 1, 2, 3, 4]``,
    ``grid_offsets(32, 32, 5) == [0]``."""
    if q < s:
        raise InputSizeError(f"cannot take {s}x{s} crops from an image side of {q} pixels: use scales of at least {s}")
    if n == 1:
        return [(q - s) // 2]
    return sorted({(2 * i * (q - s) + (n - 1)) // (2 * (n - 1)) for i in range(n)})


def crop_positions(q: int, s: int, crops: tuple[int, int]) -> list[tuple[int, int]]:
    """``(top, left)`` of every crop of the ``rows x columns`` grid in a ``q x q`` image, row by row."""
    return crop_grid(q, q, s, crops)


def crop_grid(height: int, width: int, s: int, crops: tuple[int, int]) -> list[tuple[int, int]]:
    """``(top, left)`` of every crop of the ``rows x columns`` grid in a ``height x width`` image, row by row: the
    rows' offsets evenly spaced from 0 to ``height - s``, the columns' from 0 to ``width - s`` (:func:`grid_offsets`).
    ``crop_grid(32, 48, 32, (2, 3)) == [(0, 0), (0, 8), (0, 16)]``."""
    return [(top, left) for top in grid_offsets(height, s, crops[0]) for left in grid_offsets(width, s, crops[1])]


def rescale(x: torch.Tensor, q: int) -> torch.Tensor:
    """``x`` (B, C, S, S) isotropically rescaled to ``q x q``: bilinear, antialiased when shrinking; unchanged at S."""
    h, w = x.shape[-2:]
    if (h, w) == (q, q):
        return x
    return F.interpolate(x, size=(q, q), mode="bilinear", align_corners=False, antialias=q < h or q < w)


def minimum_scale(model: torch.nn.Module, size: int, protocol: Protocol) -> tuple[int, str]:
    """The smallest scale ``protocol`` can use with ``model`` trained at ``size`` x ``size``, and why."""
    needs = []
    if protocol.crops:
        needs.append((size, f"its {size}x{size} crops need the image at least that large"))
    if protocol.dense:
        head = getattr(model, "head", None)
        if head == "gap":
            pools = model.num_pools
            needs.append((model.min_size, f"its {pools} max-pools halve the image {pools} times"))
        else:
            side = max(getattr(model, "input_size", (size, size)))
            needs.append((side, f"the dense form of its {head} head was sized for the {side}x{side} training input"))
    return max(needs, key=lambda need: need[0])


def check_protocol(model: torch.nn.Module, preprocess, protocol: Protocol) -> None:
    """One-line errors, before any image is touched, for a protocol ``model`` cannot run."""
    if protocol.dense and not isinstance(model, VGG):
        raise ConfigError(f"dense evaluation needs a vggnet VGG (it converts the head with vggnet.to_dense), got "
                          f"{type(model).__name__}: use crops=(rows, columns) instead")
    smallest, reason = minimum_scale(model, preprocess.image_size, protocol)
    small = [q for q in protocol.scales if q < smallest]
    if small:
        name = getattr(model, "name", type(model).__name__)
        what = " + ".join((["dense"] if protocol.dense else []) + (["multi-crop"] if protocol.crops else []))
        raise InputSizeError(f"test scale {small[0]} is too small for {what} evaluation of {name}: {reason}, so "
                             f"every scale must be at least {smallest}; use scales >= {smallest}, e.g. "
                             f"{smallest},{smallest + smallest // 4},{smallest + smallest // 2}")


@torch.no_grad()
def multiscale_log_probs(model: torch.nn.Module, images: torch.Tensor, preprocess, protocol: Protocol,
                         device: torch.device | str = "cpu", precision: str = "fp32", batch_size: int | None = None,
                         channels_last: bool = True, progress: bool = False,
                         adaptive: AdaptiveThreads | None = None, small_maps: bool = True) -> torch.Tensor:
    """Float32 ``(N, classes)``: log of the class probabilities averaged as ``protocol`` says, for uint8 ``images``
    (N, C, H, W). ``model`` runs in eval mode and is put back in its own mode after. ``small_maps``: as for
    :func:`vggnet.evaluation.metrics.predict_logits`."""
    device = torch.device(device)
    with protocol_nets(model, preprocess, protocol, device, precision, channels_last, small_maps) as nets:
        return _log_probs(nets, images, preprocess, protocol, device, batch_size, channels_last, progress, adaptive)


@contextlib.contextmanager
def protocol_nets(model: torch.nn.Module, preprocess, protocol: Protocol, device: torch.device, precision: str,
                  channels_last: bool, small_maps: bool = True) -> Iterator["_Nets"]:
    """:func:`check_protocol`, then the nets ``protocol`` runs (``model`` in eval mode, put back in its own mode
    after): the one set-up of the in-memory and the streamed evaluation."""
    check_protocol(model, preprocess, protocol)
    was_training = model.training
    model.eval()
    try:
        yield _networks(model, protocol, device, precision, channels_last, small_maps)
    finally:
        model.train(was_training)


def evaluate_multiscale(model: torch.nn.Module, dataset, preprocess, protocol: Protocol,
                        device: torch.device | str = "cpu", precision: str = "fp32", batch_size: int | None = None,
                        progress: bool = False, channels_last: bool = True,
                        adaptive: AdaptiveThreads | None = None, small_maps: bool = True) -> EvalResult:
    """:func:`vggnet.evaluation.metrics.evaluate` under ``protocol``, on a whole :class:`~vggnet.data.ImageDataset`.
    ``adaptive``: polled before each chunk, so the CPU thread count follows the load (``Runtime.adaptive``)."""
    log_probs = multiscale_log_probs(model, dataset.images, preprocess, protocol, device, precision, batch_size,
                                     channels_last, progress, adaptive, small_maps)
    return result_from_log_probs(log_probs, dataset.labels, dataset.classes)


def result_from_log_probs(log_probs: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> EvalResult:
    """The metrics of averaged log-probabilities: top-1, top-5, per class, confusion, and the NLL as the loss."""
    labels = labels.to(torch.int64)
    if not len(labels):
        log_probs = torch.zeros(0, len(classes))
    loss = -log_probs.gather(1, labels.view(-1, 1)).mean().item() if len(labels) else float("nan")
    return metrics_from_logits(log_probs, labels, len(classes), classes, loss=loss)


@dataclass
class _Nets:
    crop: torch.nn.Module | None  # the original net, for S x S crops
    dense: torch.nn.Module | None  # the fully convolutional form, for whole Q x Q images
    mixed: contextlib.AbstractContextManager


def _networks(model, protocol: Protocol, device: torch.device, precision: str, channels_last: bool,
              small_maps: bool = True) -> _Nets:
    """The nets the protocol runs, in the form :func:`vggnet.evaluation.metrics.predict_logits` would run them."""
    dense = None
    if protocol.dense:
        dense = model if model.head in ("gap", "dense") else to_dense(model).eval()
    crop = model if protocol.crops else None
    mixed = autocast(device, precision)
    if uses_cpu_bf16_path(device, precision):  # the folded bf16 copy, as plain evaluation runs it
        crop, dense = (inference_form(net, device, precision, channels_last, small_maps=small_maps)[0]
                       if net is not None else None
                       for net in (crop, dense))
        mixed = contextlib.nullcontext()
    return _Nets(crop, dense, mixed)


def _log_probs(nets: _Nets, images, preprocess, protocol: Protocol, device, batch_size, channels_last,
               progress, adaptive: AdaptiveThreads | None = None) -> torch.Tensor:
    size = preprocess.image_size
    chunk = batch_size or auto_batch_size(size, size)
    out = []
    for x in preprocessed_batches(images, preprocess, device, chunk, progress, adaptive):
        views: list[torch.Tensor] = []  # log-probabilities (B, K) of every view of this chunk
        weights: list[float] = []  # and each view's share of the average
        for q in protocol.scales:
            more, shares = scale_views(nets, rescale(x, q), size, protocol, batch_size, channels_last)
            views += more
            weights += shares
        out.append(log_mean(torch.stack(views), weights))
    return torch.cat(out) if out else torch.zeros(0, 0)


def scale_views(nets: _Nets, xq: torch.Tensor, size: int, protocol: Protocol, batch_size: int | None,
                channels_last: bool, together: bool = False) -> tuple[list[torch.Tensor], list[float]]:
    """Every view of the preprocessed images ``xq`` (B, C, H, W) at one of ``protocol``'s scales, each as
    ``(B, classes)`` log-probabilities, and each view's weight in the average over all scales: the scale's share
    split evenly between dense and multi-crop, then over the flips and the crop positions (:func:`crop_grid` over
    H and W). A pass holds at most ``batch_size`` inputs (default :func:`auto_batch_size` at the input's size);
    ``together``: views of a batch smaller than that share passes (the crops of one image go in one pass)."""
    flips = (False, True) if protocol.flip else (False,)
    share = 1.0 / (len(protocol.scales) * (int(protocol.dense) + int(protocol.crops is not None)))
    h, w = xq.shape[-2:]
    views: list[torch.Tensor] = []
    weights: list[float] = []
    if protocol.dense:
        mirrors = (xq.flip(3) if flip else xq for flip in flips)
        views += _run(nets.dense, mirrors, batch_size or auto_batch_size(h, w), nets.mixed, channels_last, together)
        weights += [share / len(flips)] * len(flips)
    if protocol.crops:
        positions = crop_grid(h, w, size, protocol.crops)
        crops = (xq[..., top:top + size, left:left + size] for top, left in positions)
        inputs = (crop.flip(3) if flip else crop for crop in crops for flip in flips)
        views += _run(nets.crop, inputs, batch_size or auto_batch_size(size, size), nets.mixed, channels_last,
                      together)
        weights += [share / (len(positions) * len(flips))] * (len(positions) * len(flips))
    return views, weights


def log_mean(views: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """``log(sum_v w_v p_v)`` of log-probabilities ``views`` (V, B, K) and weights ``w_v`` (V), taken in log space
    (``logsumexp(log p_v + log w_v)``) so that a confident view cannot underflow to ``log 0``: (B, K)."""
    log_w = torch.tensor([math.log(w) for w in weights], dtype=torch.float32).view(-1, 1, 1)
    return torch.logsumexp(views + log_w, dim=0)


def _run(net, inputs: Iterable[torch.Tensor], limit: int, mixed, channels_last: bool,
         together: bool) -> list[torch.Tensor]:
    """:func:`_forward` of each of ``inputs`` (batches of one size, made one at a time); ``together``: as many of
    them as ``limit`` holds go through one pass."""
    out: list[torch.Tensor] = []
    pending: list[torch.Tensor] = []
    for x in inputs:
        pending.append(x)
        if not together or (len(pending) + 1) * len(x) > limit:
            batch = torch.cat(pending) if len(pending) > 1 else x
            out += _forward(net, batch, limit, mixed, channels_last).split(len(x))
            pending = []
    if pending:
        out += _forward(net, torch.cat(pending), limit, mixed, channels_last).split(len(pending[0]))
    return out


def _forward(net, x: torch.Tensor, limit: int, mixed, channels_last: bool) -> torch.Tensor:
    """Log-softmax of ``net`` on ``x``, at most ``limit`` inputs per pass, as float32 on the CPU."""
    out = []
    for start in range(0, len(x), limit):
        part = x[start:start + limit]
        part = part.contiguous(memory_format=torch.channels_last) if channels_last else part.contiguous()
        with mixed:
            logits = net(part)
        out.append(logits.float().log_softmax(1).cpu())
    return torch.cat(out)
