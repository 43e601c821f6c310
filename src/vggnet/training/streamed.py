"""Training on a prepared (streamed) dataset: the paper's protocol, decoded per sample in worker processes.

The one rule that picks the data path (also printed by ``vggnet train``): a ``--dataset`` that names a prepared
directory (it holds ``manifest.json``, written by ``vggnet data prepare``) or an ``http(s)://`` base of one is
streamed from its shards; every other dataset is decoded once into memory, as before.

Streamed training images go through the paper's training protocol (section 3.1): the shorter side rescaled to S
(``--scale S`` fixed, or ``--scale SMIN SMAX`` drawn per image), a random ``--image-size`` crop, a random flip and
AlexNet's RGB colour shift (``--colour-shift``); the test images through its single-scale test (section 3.2): the
shorter side rescaled to Q (S, or (SMIN + SMAX) / 2 for a jittered S) and the centre crop.
"""

from __future__ import annotations

from dataclasses import replace
import torch

from vggnet.data import Preprocess, channel_stats
from vggnet.data.paper import TestTransform, TrainTransform
from vggnet.data.stream import (StreamedDataset, StreamedSplit, StreamLoader, evaluation_set, is_prepared,
                                paper_scales)
from vggnet.runtime import available_cores
from vggnet.training.config import TrainConfig

#: Training images whose mean and std the preprocessing is computed from (decoded with the test transform).
STATS_SAMPLES = 256
RULE = ("prepared directories (manifest.json, from vggnet data prepare) and http(s) URLs of them are streamed from "
        "their shards; every other dataset is held in memory")


def streams(config: TrainConfig) -> bool:
    return is_prepared(config.dataset)


def workers(config: TrainConfig) -> int:
    return config.workers if config.workers is not None else available_cores()


def train_transform(config: TrainConfig) -> TrainTransform:
    (low, high), _ = paper_scales(config.scale, config.image_size)
    return TrainTransform(scale=low if low == high else (low, high), crop=config.image_size, flip=config.flip,
                          colour=config.colour_shift)


def test_transform(config: TrainConfig) -> TestTransform:
    return TestTransform(scale=paper_scales(config.scale, config.image_size)[1], crop=config.image_size)


def for_evaluation(config: TrainConfig, split: StreamedSplit | None) -> StreamedDataset | None:
    """A streamed split as evaluation reads it: its test-transformed images, decoded on demand."""
    if split is None:
        return None
    return evaluation_set(split, test_transform(config), config.image_size, threads=workers(config) or 1)


def preprocess_stats(config: TrainConfig, train: StreamedSplit) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of the first :data:`STATS_SAMPLES` training images (test transform)."""
    return channel_stats(for_evaluation(config, train.subset(STATS_SAMPLES)), chunk=32)  # 32 decoded at a time


def loader(config: TrainConfig, train: StreamedSplit, batch_size: int, rank: int, world_size: int,
           device: torch.device) -> StreamLoader:
    return StreamLoader(train, train_transform(config), batch_size, shuffle=True, drop_last=True, seed=config.seed,
                        rank=rank, world_size=world_size, device=device, workers=workers(config))


def card_preprocess(config: TrainConfig, preprocess: Preprocess) -> Preprocess:
    """The card's preprocessing of a streamed run: its normalisation, with image files decoded at the test scale Q
    and centre-cropped to the training size (``crop_fraction`` = size / Q: torchvision's 224 of 256), as the test
    images were during training."""
    q = paper_scales(config.scale, config.image_size)[1]
    return replace(preprocess, in_size=None, crop_fraction=config.image_size / q)
