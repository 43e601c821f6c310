"""The reference is the same network as vggnet's, and reads the IDX files as they were written."""

import numpy as np
import pytest
import torch

from vggnet import create_model
from vggnet.bench import ReferenceVGG, read_idx_file


@pytest.mark.parametrize("name,head,size", [("vgg11_bn", "gap", 32), ("vgg16", "classic", 32), ("vgg13", "fitted", 64)])
def test_reference_is_the_same_network_as_vggnet(name, head, size):
    torch.manual_seed(0)
    ref = ReferenceVGG(name, num_classes=10, head=head, input_size=size, width=0.25).eval()
    model = create_model(name, num_classes=10, head=head, input_size=size, width=0.25).eval()
    model.load_state_dict(ref.state_dict())  # strict: same modules, same shapes
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert torch.equal(ref(x), model(x))


def test_reference_like_a_vggnet_config_has_its_state_dict():
    model = create_model("vgg11_bn", num_classes=10, head="gap", input_size=32, width=0.25, in_channels=1)
    ReferenceVGG.like(model.config).load_state_dict(model.state_dict())  # strict


def test_reference_idx_reader_matches_written_file(tmp_path, data_write_idx):
    images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    data_write_idx(tmp_path / "train-images-idx3-ubyte.gz", images, gz=True)
    assert np.array_equal(read_idx_file(tmp_path, "train-images-idx3-ubyte"), images)
