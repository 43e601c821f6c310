"""``create_model`` with weights and the features-only wrapper: the network layer's builder, assembled one layer up
(as torchvision's ``_api`` and timm's ``build_model_with_cfg`` do), so that :mod:`vggnet.net.models` reads no file."""

from __future__ import annotations

import os
from typing import Any, Sequence

from torch import nn

from vggnet.base.errors import ConfigError
from vggnet.net import models
from vggnet.net.features_only import FeaturesOnly
from vggnet.store.weights import build_model


def create_model(name: str, *, weights: str | os.PathLike | None = None, features_only: bool = False,
                 out_indices: Sequence[int] | None = None, **kwargs: Any) -> nn.Module:
    """Build a registered VGG (``vgg16_bn``) or ``"custom"`` with ``arch=``; ``None`` kwargs are dropped.

    ``weights=PATH`` loads a weights file (torchvision ``.pth``, timm safetensors, Keras ``.h5``) strictly into this
    architecture; keywords not given (classes, input channels, head, ...) are read from the file
    (:func:`vggnet.store.weights.build_model`). ``features_only=True`` returns a
    :class:`~vggnet.net.features_only.FeaturesOnly` (one map per stage, timm-style; ``out_indices`` picks stages)
    instead of the classifier; without weights its head defaults to ``gap`` so that no 4096-wide FC layers are
    allocated only to be dropped."""
    if out_indices is not None and not features_only:
        raise ConfigError("out_indices picks the stages of a features_only model: pass features_only=True too")
    if weights is not None:
        model = build_model(weights, name, **kwargs)
    else:
        given = {k: v for k, v in kwargs.items() if v is not None}
        model = models.create_model(name, **({"head": "gap", **given} if features_only else given))
    return FeaturesOnly(model, out_indices) if features_only else model
