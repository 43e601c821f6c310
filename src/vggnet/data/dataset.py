"""The dataset record every loader returns.

Every loader returns :class:`ImageDataset` pairs (train, test) held entirely in memory as uint8 tensors, so training
indexes batches straight out of one tensor (see :mod:`vggnet.data.loader`) and never decodes per sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from vggnet.base.errors import DataError


@dataclass(repr=False)
class ImageDataset:
    """A labelled image dataset held in memory.

    ``images`` is uint8 ``(N, C, H, W)`` and contiguous, ``labels`` int64 ``(N,)`` with values in
    ``[0, len(classes))``; ``classes[i]`` names label ``i``. Constructing one validates all of that.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    name: str

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DataError(f"{self.name}: images must be uint8 (N, C, H, W), got {self.images.dtype} "
                            f"{tuple(self.images.shape)}; convert them before building an ImageDataset")
        if self.labels.dim() != 1 or len(self.labels) != len(self.images):
            raise DataError(f"{self.name}: {len(self.images)} images but labels of shape {tuple(self.labels.shape)}; "
                            "there must be one label per image")
        self.images = self.images.contiguous()
        self.labels = self.labels.to(torch.int64).contiguous()
        self.classes = [str(c) for c in self.classes]
        if len(self.labels) and (int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.classes)):
            raise DataError(f"{self.name}: labels span [{int(self.labels.min())}, {int(self.labels.max())}] but there "
                            f"are {len(self.classes)} classes; the label and class lists do not belong together")

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return (f"ImageDataset(name={self.name!r}, n={len(self)}, image_shape={self.image_shape}, "
                f"classes={len(self.classes)})")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of every image."""
        return tuple(self.images.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to(self, device: torch.device | str) -> ImageDataset:
        """The same dataset with its tensors on ``device`` (itself when they are already there)."""
        device = torch.device(device)
        if self.images.device == device:
            return self
        return ImageDataset(self.images.to(device), self.labels.to(device), list(self.classes), self.name)

    def subset(self, n: int) -> ImageDataset:
        """The first ``n`` samples (all of them when ``n >= len(self)``); shares memory with ``self``."""
        if n < 0:
            raise DataError(f"{self.name}: subset size must be >= 0, got {n}")
        return ImageDataset(self.images[:n], self.labels[:n], list(self.classes), self.name)

    def take(self, indices: torch.Tensor, name: str | None = None) -> ImageDataset:
        """The samples at ``indices`` (in that order), as a new dataset with the same classes."""
        return ImageDataset(self.images[indices], self.labels[indices], list(self.classes), name or self.name)

    def select_classes(self, keep: Sequence[int]) -> ImageDataset:
        """Only the samples of the classes ``keep`` (indices into :attr:`classes`), relabelled ``0..len(keep)-1`` in
        the order given, with those class names."""
        keep = [int(c) for c in keep]
        bad = [c for c in keep if not 0 <= c < len(self.classes)]
        if bad or not keep or len(set(keep)) != len(keep):
            raise DataError(f"{self.name}: classes must be distinct indices in 0..{len(self.classes) - 1}, got {keep}")
        relabel = torch.full((len(self.classes),), -1, dtype=torch.int64)
        relabel[torch.tensor(keep)] = torch.arange(len(keep))
        new = relabel[self.labels]
        mask = new >= 0
        return ImageDataset(self.images[mask], new[mask], [self.classes[c] for c in keep], self.name)
