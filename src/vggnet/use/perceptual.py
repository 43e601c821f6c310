"""Perceptual (feature) and style losses on a frozen VGG (Johnson et al. 2016; Gatys et al. 2015).

::

    loss_fn = vggnet.PerceptualLoss("runs/RUN", layers=("relu1_2", "relu2_2", "relu3_3"))
    loss = loss_fn(output, target)         # images in [0, 1], float (B, C, H, W); gradients reach ``output``

The loss holds a frozen copy of the model's ``features`` up to the deepest layer asked for (no ``requires_grad``,
always in eval mode, even after ``.train()`` on a parent module), so gradients reach the input and never the VGG.

Normalisation: the input is in [0, 1] and goes through the loaded model's own colour transform before the first
conv. That transform is read off the model's :class:`~vggnet.data.Preprocess` by applying it to constant images
(:func:`colour_transform`): it is the per-pixel affine map ``x -> A x + b`` of the channel values (for the usual
preprocessing ``A = diag(1 / std)`` and ``b = -mean / std``; the ``bgr`` channel order or a 0..255 scale that
Preprocess applies is in ``A`` too). Its crop and resize are not applied: the loss takes images as they are. A bare :class:`~vggnet.net.models.VGG` has no preprocessing: its input is used as
is unless ``preprocess=`` is given. No resizing is done: any size at least the model's reduction at the deepest
layer works.

The loss is ``sum_l w_l * d(phi_l(x), phi_l(y))`` over the layers ``l``, with ``d`` the mean squared error
(``criterion="mse"``) or the mean absolute error (``"l1"``), ``phi_l`` the layer's map, or with ``style=True``
its Gram matrix ``G = F F^T / (C H W)`` (``F`` the map as ``(B, C, H*W)``, :func:`gram_matrix`).
"""

from __future__ import annotations

import copy
import re
import os
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vggnet.base.errors import ConfigError, InputSizeError
from vggnet.use.features import check_layers
from vggnet.net.models import VGG, tap
from vggnet.data import Preprocess
from vggnet.store.load import load

#: Johnson et al.'s content layers of VGG-16 (configs D and E); other configurations name their own.
DEFAULT_LAYERS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3")  # VGG-16's: default_layers gives them for it
CRITERIA = ("mse", "l1")


def gram_matrix(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, C, C)``: ``F F^T / (C H W)`` with ``F`` the map as ``(B, C, H*W)``."""
    b, c, h, w = x.shape
    f = x.reshape(b, c, h * w)
    return torch.bmm(f, f.transpose(1, 2)) / (c * h * w)


@torch.no_grad()
def colour_transform(preprocess) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, b)`` with ``preprocess`` on an image of values ``x`` in [0, 1] equal to ``A x + b`` per pixel.

    Found by applying ``preprocess`` to constant uint8 images at its own size and reading the centre pixel (a crop,
    pad or resize it does changes nothing there): black gives ``b``, full intensity in channel ``j`` alone gives
    ``b + A[:, j]``. A grey probe checks that the map is affine; if not, it fails in one line."""
    size, channels = int(preprocess.image_size), int(preprocess.channels)
    probes = torch.zeros(channels + 2, channels, size, size, dtype=torch.uint8)
    for j in range(channels):
        probes[1 + j, j] = 255
    probes[channels + 1] = 51  # 0.2 in every channel
    out = preprocess(probes)
    if out.dim() != 4 or out.shape[0] != channels + 2:
        raise ConfigError(f"the model's preprocessing returned shape {tuple(out.shape)} for a batch of "
                          f"{channels + 2} images: PerceptualLoss cannot read its colour transform")
    pixel = out[:, :, out.shape[2] // 2, out.shape[3] // 2].double()
    bias = pixel[0]
    matrix = (pixel[1:channels + 1] - bias).T  # column j: the response to channel j
    expected = matrix @ torch.full((channels,), 0.2, dtype=torch.float64) + bias
    if not torch.allclose(pixel[channels + 1], expected, rtol=1e-5, atol=1e-4):
        raise ConfigError("the model's preprocessing is not affine in the pixel values: PerceptualLoss cannot apply "
                          "it to float images; pass preprocess= explicitly")
    return matrix.float(), bias.float()


def _resolve(source: Any, preprocess) -> tuple[VGG, Any]:
    if isinstance(source, (str, os.PathLike)):
        source = load(source)
    if isinstance(source, VGG):
        return source, preprocess
    model = getattr(source, "model", None)
    if isinstance(model, VGG):  # a LoadedModel
        return model, preprocess if preprocess is not None else source.preprocess
    raise ConfigError(f"PerceptualLoss takes a run directory or weights file, a LoadedModel or a VGG module, got "
                      f"{type(source).__name__}")


def default_layers(model: VGG) -> list[str]:
    """The last ReLU of each of the model's first four blocks (VGG-16: :data:`DEFAULT_LAYERS`, Johnson et al.'s
    choice), so that the default exists in every VGG: VGG-11's are relu1_1, relu2_1, relu3_2, relu4_2."""
    last: dict[int, str] = {}
    for name in model.layer_names:
        match = re.fullmatch(r"relu(\d+)_(\d+)", name)
        if match:
            last[int(match.group(1))] = name  # layer_names run in order: the last one of a block wins
    return [last[block] for block in sorted(last)[:4]]


class PerceptualLoss(nn.Module):
    """Feature (``style=False``) or Gram-matrix (``style=True``) distance between two image batches on a frozen VGG.

    Args:
        source: what :func:`vggnet.load` takes (a run directory, ...), a ``LoadedModel`` or a ``VGG`` module.
            The module is copied (up to the deepest layer) and the copy frozen; the original is not changed.
        layers: layer names of the model (``relu1_2`` ...; see ``model.layer_names``).
        weights: one weight per layer (default 1 each).
        style: compare Gram matrices (:func:`gram_matrix`) instead of the maps.
        criterion: ``mse`` (mean squared error per layer) or ``l1`` (mean absolute error).
        preprocess: a :class:`~vggnet.data.Preprocess` whose colour transform to apply (default: the loaded
            model's; none for a bare ``VGG``).

    ``forward(input, target)`` takes float images in [0, 1] of the same shape ``(B, C, H, W)`` and returns a
    scalar. The target's maps are computed without a graph unless ``target`` requires a gradient.
    """

    def __init__(self, source: Any, layers: Sequence[str] | None = None, weights: Sequence[float] | None = None,
                 style: bool = False, criterion: str = "mse", preprocess=None) -> None:
        super().__init__()
        model, preprocess = _resolve(source, preprocess)
        layers = default_layers(model) if layers is None else [layers] if isinstance(layers, str) else list(layers)
        self.layers = tuple(check_layers(model, layers))
        if len(self.layers) != len(layers):
            raise ConfigError(f"layers must not repeat a name, got {list(layers)}")
        if weights is None:
            weights = [1.0] * len(self.layers)
        weights = [float(w) for w in weights]
        if len(weights) != len(self.layers):
            raise ConfigError(f"weights needs one number per layer ({len(self.layers)}: {', '.join(self.layers)}), "
                              f"got {len(weights)}")
        if criterion not in CRITERIA:
            raise ConfigError(f"criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")
        self.weights = weights
        self.style = bool(style)
        self.criterion = criterion
        self.in_channels = model.in_channels
        self._index = {name: model.layer_names[name] for name in self.layers}
        deepest = max(self._index.values())
        self.features = copy.deepcopy(nn.Sequential(*list(model.features)[:deepest + 1]))
        for p in self.features.parameters():
            p.requires_grad_(False)
        self.features.eval()
        if preprocess is None:
            matrix, bias = torch.eye(model.in_channels), torch.zeros(model.in_channels)
        else:
            if isinstance(preprocess, dict):
                preprocess = Preprocess.from_dict(preprocess)
            matrix, bias = colour_transform(preprocess)
        if matrix.shape[0] != model.in_channels:
            raise ConfigError(f"the preprocessing gives {matrix.shape[0]} channels, the model takes "
                              f"{model.in_channels}")
        reference = next(model.parameters(), None)
        where = {} if reference is None else {"device": reference.device}
        self.register_buffer("norm_matrix", matrix.to(**where), persistent=False)
        self.register_buffer("norm_bias", bias.to(**where), persistent=False)
        pools = sum(isinstance(m, nn.MaxPool2d) for m in self.features)
        self.min_size = 2**pools

    def train(self, mode: bool = True) -> "PerceptualLoss":
        """Sets the flag of this module; the frozen VGG stays in eval mode (BN keeps its running statistics)."""
        super().train(mode)
        self.features.eval()
        return self

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> the model's input (the colour transform of the module docstring)."""
        matrix = self.norm_matrix.to(x.dtype)
        return torch.einsum("oc,bchw->bohw", matrix, x) + self.norm_bias.to(x.dtype).view(1, -1, 1, 1)

    def _check(self, x: torch.Tensor, what: str) -> None:
        if x.dim() != 4:
            raise InputSizeError(f"PerceptualLoss expects {what} as a batch (B, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.norm_matrix.shape[1]:
            raise InputSizeError(f"PerceptualLoss expects {self.norm_matrix.shape[1]} channel(s) in {what}, got "
                                 f"{x.shape[1]}")
        if min(x.shape[2], x.shape[3]) < self.min_size:
            raise InputSizeError(f"PerceptualLoss needs {what} of at least {self.min_size}x{self.min_size} (its "
                                 f"layers follow {self.min_size.bit_length() - 1} max-pools), got "
                                 f"{x.shape[2]}x{x.shape[3]}")
        if not x.is_floating_point():
            raise InputSizeError(f"PerceptualLoss expects float images in [0, 1] as {what}, got {x.dtype}")

    def forward_layers(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The maps of ``layers`` for images ``x`` in [0, 1] (normalised first)."""
        self._check(x, "input")
        wanted = {index: name for name, index in self._index.items()}
        x = self.normalize(x)
        return tap(list(self.features), x, wanted)

    def layer_losses(self, input: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """The unweighted distance per layer. Feature distances need input and target of one shape; Gram matrices
        (``style=True``) only the same batch size or a target batch of one (a style image of any size)."""
        same = input.shape == target.shape
        if self.style:
            same = input.dim() == target.dim() == 4 and target.shape[0] in (1, input.shape[0])
        if not same:
            need = "a target batch of one or of the input's size" if self.style else "input and target of one shape"
            raise InputSizeError(f"PerceptualLoss needs {need}, got {tuple(input.shape)} and {tuple(target.shape)}")
        mine = self.forward_layers(input)
        with torch.set_grad_enabled(torch.is_grad_enabled() and target.requires_grad):
            theirs = self.forward_layers(target)
        distance = F.mse_loss if self.criterion == "mse" else F.l1_loss
        out = {}
        for name in self.layers:
            a, b = mine[name], theirs[name]
            if self.style:
                a, b = gram_matrix(a), gram_matrix(b).expand(a.shape[0], -1, -1)
            out[name] = distance(a, b)
        return out

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        losses = self.layer_losses(input, target)
        return sum(w * losses[name] for name, w in zip(self.layers, self.weights))

    def extra_repr(self) -> str:
        return (f"layers={list(self.layers)}, weights={self.weights}, style={self.style}, "
                f"criterion={self.criterion!r}")
