"""IDX parsing, the Fashion-MNIST loader and the dataset lookup order."""

import pathlib

import numpy as np
import pytest
import torch

from vggnet.data import find_fashion_mnist, load_dataset, load_fashion_mnist, read_idx
from vggnet.data.idx import MAGIC_IMAGES, MAGIC_LABELS
from vggnet.base.errors import DataError

SYSTEM_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")
FIRST_TRAIN_LABELS = [9, 0, 0, 3, 0]  # Ankle boot, T-shirt/top, T-shirt/top, Dress, T-shirt/top


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trip(tmp_path, data_write_idx, gz):
    images = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    path = data_write_idx(tmp_path / "img", images, gz)
    got = read_idx(path, MAGIC_IMAGES)
    assert got.dtype == np.uint8 and got.shape == (2, 3, 5)
    np.testing.assert_array_equal(got, images)


def test_read_idx_truncated_names_file_and_byte_counts(tmp_path, data_write_idx):
    path = data_write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((4, 28, 28), np.uint8))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.*need 3152 bytes, file has 3142.*truncated"):
        read_idx(path, MAGIC_IMAGES)


def test_read_idx_trailing_bytes_rejected(tmp_path, data_write_idx):
    path = data_write_idx(tmp_path / "labels", np.zeros(3, np.uint8))
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(DataError, match="longer than its header"):
        read_idx(path, MAGIC_LABELS)


def test_read_idx_wrong_magic(tmp_path, data_write_idx):
    path = data_write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(3, np.uint8))
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte: IDX magic 0x00000801, expected 0x00000803"):
        read_idx(path, MAGIC_IMAGES)


def test_read_idx_tiny_file(tmp_path):
    path = tmp_path / "stub"
    path.write_bytes(b"\0\0")
    with pytest.raises(DataError, match="stub: 2 bytes is too short"):
        read_idx(path, MAGIC_LABELS)


def test_corrupt_gzip_is_data_error(tmp_path, data_write_idx):
    path = data_write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(100, np.uint8), gz=True)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])  # truncated gzip stream
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte\.gz: corrupt or truncated gzip"):
        read_idx(path, MAGIC_LABELS)
    path.write_bytes(b"\x1f\x8b" + b"garbage" * 10)
    with pytest.raises(DataError, match="corrupt or truncated gzip"):
        read_idx(path, MAGIC_LABELS)


@pytest.mark.parametrize("gz", [False, True])
def test_load_fashion_mnist_exact(data_env, data_fake_fashion_mnist, gz):
    arrays = data_fake_fashion_mnist(data_env / "fm", gz=gz)
    train, test = load_fashion_mnist(data_env / "fm")
    assert train.images.shape == (6, 1, 28, 28) and train.images.dtype == torch.uint8
    assert test.images.shape == (4, 1, 28, 28)
    assert train.labels.dtype == torch.int64 and train.images.is_contiguous()
    np.testing.assert_array_equal(train.images[:, 0].numpy(), arrays["train"][0])
    np.testing.assert_array_equal(train.labels.numpy(), arrays["train"][1])
    np.testing.assert_array_equal(test.images[:, 0].numpy(), arrays["t10k"][0])
    np.testing.assert_array_equal(test.labels.numpy(), arrays["t10k"][1])
    assert train.classes[0] == "T-shirt/top" and train.classes[9] == "Ankle boot" and len(train.classes) == 10
    assert train.name == "fashion-mnist"


def test_count_mismatch(data_env, data_fake_fashion_mnist, data_write_idx):
    data_fake_fashion_mnist(data_env / "fm", gz=False)
    data_write_idx(data_env / "fm" / "train-labels-idx1-ubyte", np.zeros(5, np.uint8))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte has 6 images but .*train-labels-idx1-ubyte has 5"):
        load_fashion_mnist(data_env / "fm")


def test_label_out_of_range(data_env, data_fake_fashion_mnist, data_write_idx):
    data_fake_fashion_mnist(data_env / "fm", gz=False)
    data_write_idx(data_env / "fm" / "t10k-labels-idx1-ubyte", np.array([0, 1, 10, 2], np.uint8))
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte: label 10 outside 0\.\.9"):
        load_fashion_mnist(data_env / "fm")


def test_lookup_order(data_env, data_fake_fashion_mnist, monkeypatch):
    from vggnet.data import DATASETS

    explicit, env, system = data_env / "explicit", data_env / "env", data_env / "system"
    for d in (explicit, env / "fashion-mnist", system):
        data_fake_fashion_mnist(d)
    monkeypatch.setitem(DATASETS["fashion-mnist"], "system_dirs", [str(system)])
    monkeypatch.setenv("VGGNET_DATA", str(env))
    assert find_fashion_mnist(explicit) == explicit
    (data_env / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):  # an explicit data_dir without the files: no fallback
        find_fashion_mnist(data_env / "empty")
    assert find_fashion_mnist() == env / "fashion-mnist"
    monkeypatch.delenv("VGGNET_DATA")
    assert find_fashion_mnist() == system
    fetched = data_env / "xdg-cache" / "vggnet" / "data" / "fashion-mnist"
    data_fake_fashion_mnist(fetched)
    monkeypatch.setitem(DATASETS["fashion-mnist"], "system_dirs", [])
    assert find_fashion_mnist() == fetched


def test_not_found_lists_places_and_fixes(data_env, data_fake_fashion_mnist, monkeypatch):
    partial = data_env / "partial"
    data_fake_fashion_mnist(partial)
    (partial / "t10k-labels-idx1-ubyte.gz").unlink()
    monkeypatch.setenv("VGGNET_DATA", str(partial))
    with pytest.raises(DataError) as info:
        find_fashion_mnist()
    message = str(info.value)
    assert "\n" not in message
    for place in (partial, partial / "fashion-mnist", data_env / "no-system-dir",
                  data_env / "xdg-cache" / "vggnet" / "data" / "fashion-mnist"):
        assert str(place) in message
    assert "missing t10k-labels-idx1-ubyte" in message
    for fix in ("apt-get install dataset-fashion-mnist", "--data-dir", "$VGGNET_DATA", "vggnet data fetch"):
        assert fix in message


@pytest.mark.skipif(not SYSTEM_DIR.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_real_fashion_mnist(monkeypatch):
    monkeypatch.delenv("VGGNET_DATA", raising=False)
    train, test = load_dataset("fashion-mnist", data_dir=SYSTEM_DIR)
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert train.labels.bincount().tolist() == [6000] * 10
    assert test.labels.bincount().tolist() == [1000] * 10
    assert int(train.images.sum(dtype=torch.int64)) == 3431114169
    assert int(test.images.sum(dtype=torch.int64)) == 573469082
    assert train.labels[:5].tolist() == FIRST_TRAIN_LABELS
