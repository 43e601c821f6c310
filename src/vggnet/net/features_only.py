"""timm's ``features_only`` for a VGG: one map per stage (the output of each block's max-pool).

Stage outputs: one map per entry of the model's ``feature_info``, i.e. the output of each block's max-pool
(reductions 2, 4, 8, 16, 32 for the five-block VGGs), so its ``feature_info`` is the model's. timm's VGG differs: its
stages are the last ReLU *before* each pool (reductions 1 to 16) plus the last pool's output (32); those pre-pool maps
are ``relu1_2``, ``relu2_2`` ... through :meth:`VGG.forward_named` here.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from vggnet.base.errors import ConfigError, InputSizeError
from vggnet.net.models import VGG, tap


class FeaturesOnly(nn.Module):
    """timm's ``features_only`` for a :class:`~vggnet.net.models.VGG`: ``forward(x)`` returns a list of maps, one per
    stage, each the output of that block's max-pool (the module ``feature_info[i]["module"]`` names).

    ``feature_info`` is the model's own (channels ``num_chs``, ``reduction``, ``module``) for the stages kept;
    ``out_indices`` picks stages (default: all). The wrapper shares the model's modules (no copy) and holds only
    ``features`` up to the last stage kept, under the same indices, so ``features.N`` keys match the model's state
    dict. Input must have the model's channel count and at least the last stage's reduction in height and width.
    """

    def __init__(self, model: VGG, out_indices: Sequence[int] | None = None) -> None:
        super().__init__()
        info = model.feature_info
        if not info:
            raise ConfigError(f"{model.name} has no max-pool, so no stages to return")
        if out_indices is None:
            out_indices = range(len(info))
        out_indices = [int(i) for i in out_indices]
        bad = [i for i in out_indices if not -len(info) <= i < len(info)]
        if bad or not out_indices:
            raise ConfigError(f"out_indices must name stages 0..{len(info) - 1} of {model.name}, got {out_indices}")
        out_indices = sorted({i % len(info) for i in out_indices})
        self.out_indices = tuple(out_indices)
        self.feature_info = [dict(info[i]) for i in out_indices]
        self.taps = [int(entry["module"].split(".")[1]) for entry in self.feature_info]
        self.features = nn.Sequential(*list(model.features)[:max(self.taps) + 1])
        self.in_channels = model.in_channels
        self.min_size = self.feature_info[-1]["reduction"]
        self.name = model.name

    def channels(self) -> list[int]:
        return [entry["num_chs"] for entry in self.feature_info]

    def reductions(self) -> list[int]:
        return [entry["reduction"] for entry in self.feature_info]

    def check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4:
            raise InputSizeError(f"{self.name} features expect a 4-D batch (N, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise InputSizeError(f"{self.name} expects {self.in_channels} input channels, got {x.shape[1]}")
        if min(x.shape[2], x.shape[3]) < self.min_size:
            raise InputSizeError(f"{self.name} features to reduction {self.min_size} need input of at least "
                                 f"{self.min_size}x{self.min_size}, got {x.shape[2]}x{x.shape[3]}: pad or resize")

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if not (torch.jit.is_tracing() or torch.compiler.is_compiling()):
            self.check_input(x)
        maps = tap(list(self.features), x, {index: k for k, index in enumerate(self.taps)})
        return [maps[k] for k in range(len(self.taps))]


def features_only(model: VGG, out_indices: Sequence[int] | None = None) -> FeaturesOnly:
    """:class:`FeaturesOnly` (``create_model(name, features_only=True)`` in timm)."""
    return FeaturesOnly(model, out_indices)
