"""The load_dataset dispatcher."""

import pytest

from vggnet.data import load_dataset
from vggnet.base.errors import DataError


def test_dispatch_fashion_mnist_aliases(data_env, data_fake_fashion_mnist):
    data_fake_fashion_mnist(data_env / "d")
    for spec in ("fashion-mnist", "Fashion_MNIST", " fmnist "):
        train, test = load_dataset(spec, data_dir=data_env / "d", image_size=99)  # image_size ignored here
        assert train.images.shape == (6, 1, 28, 28) and len(test) == 4


def test_unknown_spec_lists_choices():
    with pytest.raises(DataError, match=r"unknown dataset 'mnist'; known: fashion-mnist, cifar10, cifar100 .*folder:"):
        load_dataset("mnist")
