"""CIFAR-10/100 from fake batches written in the exact official layout (archive and extracted folder)."""

import io
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch

from vggnet.data import find_cifar, load_cifar, load_dataset
from vggnet.base.errors import DataError

CIFAR10_NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]


def official_pickle(obj, protocol=2):
    """Pickle as the original files are: protocol 2, ndarray rebuilt via ``numpy.core.multiarray._reconstruct``."""
    raw = pickle.dumps(obj, protocol=protocol)
    return raw.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def batch_bytes(images, labels, label_key=b"labels", protocol=2):
    n = len(images)
    return official_pickle({
        b"batch_label": b"training batch 1 of 5",
        label_key: [int(v) for v in labels],
        b"data": images.reshape(n, 3072),
        b"filenames": [f"img_{i:04d}.png".encode() for i in range(n)],
    }, protocol)


def make_cifar10(root, rng, per_batch=2, n_test=3):
    """Write cifar-10-batches-py/ under ``root``; returns (train images, train labels, test images, test labels)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    images = rng.integers(0, 256, size=(5 * per_batch + n_test, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 10, size=len(images))
    for i in range(5):
        part = slice(i * per_batch, (i + 1) * per_batch)
        (folder / f"data_batch_{i + 1}").write_bytes(batch_bytes(images[part], labels[part]))
    (folder / "test_batch").write_bytes(batch_bytes(images[5 * per_batch:], labels[5 * per_batch:]))
    meta = {b"num_cases_per_batch": per_batch, b"label_names": CIFAR10_NAMES, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(official_pickle(meta))
    split = 5 * per_batch
    return images[:split], labels[:split], images[split:], labels[split:]


def make_archive(folder, archive):
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return archive


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def assert_split(ds, images, labels):
    assert ds.images.dtype == torch.uint8 and ds.images.shape == (len(images), 3, 32, 32)
    np.testing.assert_array_equal(ds.images.numpy(), images)
    np.testing.assert_array_equal(ds.labels.numpy(), labels)


def test_extracted_folder_round_trip(data_env, rng):
    tr_x, tr_y, te_x, te_y = make_cifar10(data_env / "d", rng)
    train, test = load_cifar("cifar10", data_env / "d")
    assert_split(train, tr_x, tr_y)
    assert_split(test, te_x, te_y)
    assert train.classes == [n.decode() for n in CIFAR10_NAMES] and train.name == "cifar10"


def test_archive_round_trip_without_extracting(data_env, rng):
    tr_x, tr_y, te_x, te_y = make_cifar10(data_env / "src", rng)
    (data_env / "d").mkdir()
    archive = make_archive(data_env / "src" / "cifar-10-batches-py", data_env / "d" / "cifar-10-python.tar.gz")
    assert find_cifar("cifar10", data_env / "d") == archive
    train, test = load_dataset("cifar-10", data_dir=data_env / "d")
    assert_split(train, tr_x, tr_y)
    assert_split(test, te_x, te_y)
    assert sorted(p.name for p in (data_env / "d").iterdir()) == ["cifar-10-python.tar.gz"]  # nothing extracted


@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar100_archive(data_env, rng, protocol):
    folder = data_env / "src" / "cifar-100-python"
    folder.mkdir(parents=True)
    images = rng.integers(0, 256, size=(7, 3, 32, 32), dtype=np.uint8)
    fine = np.array([0, 99, 5, 42, 17, 99, 3])
    (folder / "train").write_bytes(batch_bytes(images[:4], fine[:4], b"fine_labels", protocol))
    (folder / "test").write_bytes(batch_bytes(images[4:], fine[4:], b"fine_labels", protocol))
    names = [f"class_{i}".encode() for i in range(100)]
    (folder / "meta").write_bytes(official_pickle({b"fine_label_names": names, b"coarse_label_names": names[:20]}))
    make_archive(folder, data_env / "cifar-100-python.tar.gz")
    train, test = load_dataset("cifar100", data_dir=data_env)
    assert_split(train, images[:4], fine[:4])
    assert_split(test, images[4:], fine[4:])
    assert train.classes[99] == "class_99" and len(train.classes) == 100


def test_truncated_archive(data_env, rng):
    make_cifar10(data_env / "src", rng)
    archive = make_archive(data_env / "src" / "cifar-10-batches-py", data_env / "cifar-10-python.tar.gz")
    archive.write_bytes(archive.read_bytes()[:-200])
    with pytest.raises(DataError, match=r"cifar-10-python\.tar\.gz: corrupt or truncated archive"):
        load_cifar("cifar10", data_env)


def test_archive_member_with_dotdot_rejected(data_env, rng):
    make_cifar10(data_env / "src", rng)
    archive = make_archive(data_env / "src" / "cifar-10-batches-py", data_env / "cifar-10-python.tar.gz")
    with tarfile.open(archive, "r:gz") as tar:
        members = [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar]
    with tarfile.open(archive, "w:gz") as tar:
        evil = tarfile.TarInfo("../evil")
        evil.size = 4
        tar.addfile(evil, io.BytesIO(b"evil"))
        for member, data in members:
            tar.addfile(member, io.BytesIO(data) if data is not None else None)
    with pytest.raises(DataError, match=r"member '\.\./evil' has an absolute or '\.\.' path"):
        load_cifar("cifar10", data_env)
    assert not (data_env.parent / "evil").exists()


def test_wrong_data_shape(data_env, rng):
    make_cifar10(data_env / "d", rng)
    bad = official_pickle({b"data": np.zeros((2, 3000), np.uint8), b"labels": [0, 1]})
    (data_env / "d" / "cifar-10-batches-py" / "data_batch_3").write_bytes(bad)
    with pytest.raises(DataError, match=r"data_batch_3: 'data' must be a uint8 array \(N, 3072\), got uint8 \(2, 30"):
        load_cifar("cifar10", data_env / "d")


def test_label_out_of_range_and_count(data_env, rng):
    make_cifar10(data_env / "d", rng)
    batch = data_env / "d" / "cifar-10-batches-py" / "test_batch"
    batch.write_bytes(batch_bytes(np.zeros((2, 3, 32, 32), np.uint8), [3, 10]))
    with pytest.raises(DataError, match=r"test_batch: labels span \[3, 10\], expected 0\.\.9"):
        load_cifar("cifar10", data_env / "d")
    batch.write_bytes(batch_bytes(np.zeros((2, 3, 32, 32), np.uint8), [3]))
    with pytest.raises(DataError, match=r"test_batch: 'labels' must be 2 integers"):
        load_cifar("cifar10", data_env / "d")


class Exploit:
    """Unpickling this runs a shell command -- unless the unpickler refuses ``os.system``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("packed", [False, True])
def test_malicious_pickle_does_not_run(data_env, rng, packed):
    make_cifar10(data_env / "src", rng)
    marker = data_env / "MARKER"
    evil = official_pickle({b"data": Exploit(marker), b"labels": [0]})
    assert b"system" in evil
    (data_env / "src" / "cifar-10-batches-py" / "data_batch_1").write_bytes(evil)
    where = data_env / "src"
    if packed:
        where = data_env / "packed"
        where.mkdir()
        make_archive(data_env / "src" / "cifar-10-batches-py", where / "cifar-10-python.tar.gz")
    with pytest.raises(DataError, match=r"data_batch_1: not a plain CIFAR pickle .*refusing to load global (os|posix)"
                                        r"\.system"):
        load_cifar("cifar10", where)
    assert not marker.exists()


def test_garbage_pickle(data_env, rng):
    make_cifar10(data_env / "d", rng)
    (data_env / "d" / "cifar-10-batches-py" / "batches.meta").write_bytes(b"\x80\x02}q\x00(")
    with pytest.raises(DataError, match=r"batches\.meta: not a plain CIFAR pickle"):
        load_cifar("cifar10", data_env / "d")


def test_not_found_message(data_env):
    with pytest.raises(DataError) as info:
        load_dataset("cifar100", data_dir=data_env / "nothing")
    message = str(info.value)
    assert "CIFAR-100 not found" in message and str(data_env / "nothing") in message
    assert "cifar-100-python.tar.gz" in message and "vggnet data fetch cifar100" in message
    assert "\n" not in message
