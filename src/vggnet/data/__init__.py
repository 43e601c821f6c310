"""Datasets as in-memory uint8 tensors, batch preprocessing and augmentation, and a sharded batch iterator.

Typical use::

    from vggnet.data import Augment, BatchLoader, Preprocess, channel_stats, load_dataset

    train, test = load_dataset("fashion-mnist")            # or "cifar10", "cifar100", "folder:PATH"
    mean, std = channel_stats(train)
    prep = Preprocess(32, mean, std, fit="auto", in_size=28)   # 28 -> 32 by centre padding
    aug = Augment(crop_padding=4, flip=True)
    for images, labels in BatchLoader(train, batch_size=128, shuffle=True):
        x = aug(prep(images))

Every user-caused problem (missing, truncated, corrupt or unsafe data) raises :class:`vggnet.base.errors.DataError`
with a one-line message naming the file, what is wrong and the fix.
"""

from vggnet.data.augment import Augment, Preprocess, channel_stats
from vggnet.data.catalogue import DATASETS, search_dirs
from vggnet.data.cifar import find_cifar, load_cifar
from vggnet.data.dataset import ImageDataset
from vggnet.data.fetch import fetch
from vggnet.data.folder import load_folder
from vggnet.data.idx import find_fashion_mnist, load_fashion_mnist, read_idx
from vggnet.data.images import decode_bytes, decode_image
from vggnet.data.load import load_dataset
from vggnet.data.loader import BatchLoader
from vggnet.data.paper import TestTransform, TrainTransform
from vggnet.data.shards import prepare as prepare_shards
from vggnet.data.shards import read_manifest
from vggnet.data.shards import verify as verify_shards
from vggnet.data.split import stratified_holdout

__all__ = [
    "DATASETS",
    "Augment",
    "BatchLoader",
    "ImageDataset",
    "Preprocess",
    "TestTransform",
    "TrainTransform",
    "channel_stats",
    "decode_bytes",
    "decode_image",
    "fetch",
    "find_cifar",
    "find_fashion_mnist",
    "load_cifar",
    "load_dataset",
    "load_fashion_mnist",
    "load_folder",
    "prepare_shards",
    "read_idx",
    "read_manifest",
    "search_dirs",
    "stratified_holdout",
    "verify_shards",
]
