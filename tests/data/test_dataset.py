"""ImageDataset invariants."""

import pytest
import torch

from vggnet.data import ImageDataset
from vggnet.base.errors import DataError


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
