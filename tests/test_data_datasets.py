"""ImageDataset invariants and the load_dataset dispatcher."""

import pytest
import torch

from vggnet.data import DATASETS, ImageDataset, load_dataset
from vggnet.errors import DataError


def test_image_dataset_validates_and_subsets():
    ds = ImageDataset(torch.zeros(5, 3, 4, 4, dtype=torch.uint8), torch.tensor([0, 1, 2, 0, 1], dtype=torch.int32),
                      ["a", "b", "c"], "toy")
    assert len(ds) == 5 and ds.labels.dtype == torch.int64 and ds.image_shape == (3, 4, 4) and ds.num_classes == 3
    sub = ds.subset(2)
    assert len(sub) == 2 and sub.labels.tolist() == [0, 1] and sub.classes == ds.classes and sub.name == "toy"
    assert len(ds.subset(99)) == 5
    assert "n=5" in repr(ds) and "tensor" not in repr(ds)
    with pytest.raises(DataError, match=r"labels span \[0, 3\] but there are 3 classes"):
        ImageDataset(torch.zeros(2, 1, 2, 2, dtype=torch.uint8), torch.tensor([0, 3]), ["a", "b", "c"], "bad")
    with pytest.raises(DataError, match="images must be uint8"):
        ImageDataset(torch.zeros(2, 1, 2, 2), torch.tensor([0, 1]), ["a", "b"], "bad")
    with pytest.raises(DataError, match="one label per image"):
        ImageDataset(torch.zeros(2, 1, 2, 2, dtype=torch.uint8), torch.tensor([0]), ["a", "b"], "bad")


def test_non_contiguous_images_made_contiguous():
    images = torch.zeros(2, 4, 4, 3, dtype=torch.uint8).permute(0, 3, 1, 2)
    assert ImageDataset(images, torch.tensor([0, 1]), ["a", "b"], "t").images.is_contiguous()


def test_dispatch_fashion_mnist_aliases(data_env, data_fake_fashion_mnist):
    data_fake_fashion_mnist(data_env / "d")
    for spec in ("fashion-mnist", "Fashion_MNIST", " fmnist "):
        train, test = load_dataset(spec, data_dir=data_env / "d", image_size=99)  # image_size ignored here
        assert train.images.shape == (6, 1, 28, 28) and len(test) == 4


def test_unknown_spec_lists_choices():
    with pytest.raises(DataError, match=r"unknown dataset 'mnist'; known: fashion-mnist, cifar10, cifar100 .*folder:"):
        load_dataset("mnist")


def test_catalogue_metadata():
    assert DATASETS["cifar10"]["files"] == {"cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a"}
    assert DATASETS["cifar100"]["files"] == {"cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85"}
    assert len(DATASETS["cifar100"]["classes"]) == len(set(DATASETS["cifar100"]["classes"])) == 100
    assert DATASETS["fashion-mnist"]["classes"][6] == "Shirt"
    for info in DATASETS.values():
        assert all(len(md5) == 32 for md5 in info["files"].values())
        assert info["channels"] in (1, 3) and info["size"] in (28, 32)
