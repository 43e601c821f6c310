"""The paper's dense evaluation network: :func:`to_dense` turns a VGG's classifier into convolutions."""

from __future__ import annotations

import copy

import torch
from torch import nn

from vggnet.net.models import VGG, model_from_config


def _adaptive_pool_matrix(size: tuple[int, int], out: tuple[int, int]) -> torch.Tensor:
    """M with M[i*w + j, p, q] = weight of input pixel (i, j) in output cell (p, q) of AdaptiveAvgPool2d(out)."""
    h, w = size
    eye = torch.eye(h * w, dtype=torch.float64).view(h * w, 1, h, w)
    return nn.functional.adaptive_avg_pool2d(eye, out).view(h * w, *out)


def _linear_weight(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The (out, in) weight and bias of a classifier layer: an ``nn.Linear``'s own, else what the layer's
    ``dense_weight()`` materialises (the low-rank and int8 layers of :mod:`vggnet.use.compress`, not imported here)."""
    return (layer.weight, layer.bias) if isinstance(layer, nn.Linear) else layer.dense_weight()


@torch.no_grad()
def to_dense(model: VGG) -> VGG:
    """A fully convolutional copy of ``model``: FC1 becomes a k x k conv, FC2/FC3 1x1 convs.

    At the model's ``input_size`` the output equals the source's; larger input gives a class-score map that is
    averaged over space (the paper's dense evaluation). For the classic head the adaptive 7x7 pooling is folded
    into the conv kernel, so this is exact for any training size. A ``gap`` model already takes any input size
    and is returned as a copy.

    A compressed classifier (:mod:`vggnet.use.compress`) is materialised: low-rank factors are multiplied out and int8
    weights dequantised, so the copy is an ordinary float model of the first conv's dtype, as large as the
    uncompressed one; it equals the compressed model up to the int8 kernel's activation rounding.
    """
    if model.head in ("dense", "gap"):
        return copy.deepcopy(model)
    config = dict(model.config, head="dense")
    reference = next(model.parameters())
    dense = model_from_config(config).to(reference.device, reference.dtype)
    dense.features.load_state_dict(model.features.state_dict())
    (w1, b1), *rest = (_linear_weight(model.classifier[i]) for i in (0, 3, 6))
    hidden = w1.shape[0]
    channels = dense.classifier[0].in_channels
    fh, fw = model.feature_map_size
    if model.head == "classic":
        weight = w1.double().view(hidden, channels, 7, 7)
        pool = _adaptive_pool_matrix((fh, fw), (7, 7)).to(weight.device)
        kernel = torch.einsum("ocpq,kpq->ock", weight, pool).reshape(hidden, channels, fh, fw)
    else:
        kernel = w1.reshape(hidden, channels, fh, fw)
    dense.classifier[0].weight.copy_(kernel)
    dense.classifier[0].bias.copy_(b1)
    for (weight, bias), dst in zip(rest, (dense.classifier[3], dense.classifier[6])):
        dst.weight.copy_(weight.view(*weight.shape, 1, 1))
        dst.bias.copy_(bias)
    return dense.train(model.training)
