"""Batches straight out of an in-memory :class:`ImageDataset`: no DataLoader, no workers, no per-sample Python.

Each epoch's order is a permutation drawn from ``(seed, epoch)`` alone, so every rank of a distributed run computes
the same one without communicating. With ``world_size`` ranks the order is first trimmed to a multiple of
``world_size`` (dropping at most ``world_size - 1`` samples, a different few each shuffled epoch), then cut into
*global* batches of ``batch_size * world_size`` samples, exactly the batches one process with that batch size would
draw; rank ``r`` takes the ``r``-th contiguous slice of ``batch_size`` samples of every global batch (and the
``r``-th equal slice of a last, short global batch). So shards are disjoint, equally long and give every rank the same
number of batches, their union is the trimmed epoch order, and step ``i`` of a distributed run trains on the same
samples as step ``i`` of a single process with the global batch: with a mean loss per rank and gradients averaged
over ranks (DistributedDataParallel), the two take the same optimizer steps, and batch ``i`` means the same samples
whatever the world size (a mid-epoch resume on a different number of processes continues where it stopped).
(Interleaving, ``order[r::world_size]``, would also give disjoint equal shards, but different samples per step.)
Evaluate on a single rank (``world_size=1``) when every sample must count.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

from vggnet.data.dataset import ImageDataset
from vggnet.base.errors import ConfigError


def epoch_seed(seed: int, epoch: int) -> int:
    """A well-mixed 63-bit seed for ``(seed, epoch)`` (neighbouring pairs give unrelated permutations)."""
    state = np.random.SeedSequence([seed & 0xFFFFFFFF, seed >> 32 & 0xFFFFFFFF, epoch]).generate_state(2)
    return int(state[0]) << 31 ^ int(state[1])


class BatchLoader:
    """Iterate ``(images uint8 (B, C, H, W), labels int64 (B,))`` batches for one rank; ``batch_size`` is per rank.

    Call :meth:`set_epoch` before each epoch (as with ``DistributedSampler``); iterating twice without it repeats
    the same order. The dataset's tensors may live on any device; batches are moved to ``device`` (through pinned
    memory when that is a GPU and the data is on the CPU).
    """

    def __init__(self, ds: ImageDataset, batch_size: int, shuffle: bool, drop_last: bool = False, seed: int = 0,
                 rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu") -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1 sample per rank, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        self.ds = ds
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose permutation the next iteration uses."""
        self.epoch = epoch

    @property
    def num_samples(self) -> int:
        """Samples this rank sees per epoch (before ``drop_last``)."""
        return len(self.ds) // self.world_size

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def epoch_order(self) -> torch.Tensor:
        """The whole epoch's order (all ranks), trimmed to a multiple of ``world_size``."""
        n = len(self.ds)
        if self.shuffle:
            generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
            order = torch.randperm(n, generator=generator)
        else:
            order = torch.arange(n)
        return order[: n - n % self.world_size]

    def indices(self) -> torch.Tensor:
        """This rank's sample indices for the current epoch, in order: its slice of every global batch."""
        order = self.epoch_order()
        world, per_rank = self.world_size, self.batch_size
        full = len(order) // (per_rank * world) * per_rank * world  # samples in whole global batches
        mine = order[:full].view(-1, world, per_rank)[:, self.rank].reshape(-1)
        tail = order[full:]  # a multiple of world_size, shorter than a global batch: split it equally
        share = len(tail) // world
        return torch.cat([mine, tail[self.rank * share:(self.rank + 1) * share]])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.iterate(0)

    def iterate(self, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches from batch ``start`` on (a run resumed mid-epoch), the ones before not computed."""
        images, labels = self.ds.images, self.ds.labels
        mine = self.indices().to(images.device)
        pin = self.device.type == "cuda" and images.device.type == "cpu"
        for i in range(start, len(self)):
            idx = mine[i * self.batch_size:(i + 1) * self.batch_size]
            x, y = images.index_select(0, idx), labels.index_select(0, idx.to(labels.device))
            if pin:
                x, y = x.pin_memory(), y.pin_memory()
            yield x.to(self.device, non_blocking=pin), y.to(self.device, non_blocking=pin)
