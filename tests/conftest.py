"""Shared fixtures. Fixtures of the data tests are prefixed ``data_``."""

import gzip
import struct

import numpy as np
import pytest


@pytest.fixture
def data_env(tmp_path, monkeypatch):
    """Isolate dataset lookup: no $VGGNET_DATA, caches under tmp_path, no system dataset directories."""
    from vggnet.data import DATASETS

    monkeypatch.delenv("VGGNET_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    for info in DATASETS.values():
        monkeypatch.setitem(info, "system_dirs", [str(tmp_path / "no-system-dir")])
    return tmp_path


def _write_idx(path, array, gz=False):
    """Write a uint8 array as an IDX file (magic 0x0000 08 ndim, big-endian dims), gzipped when ``gz``."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    data = struct.pack(">I", 0x800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


@pytest.fixture
def data_write_idx():
    """The IDX writer: ``data_write_idx(path, array, gz=False)``."""
    return _write_idx


@pytest.fixture
def data_fake_fashion_mnist():
    """Factory: write a tiny Fashion-MNIST (train 6 / test 4 images of 28x28) into a directory; returns arrays."""

    def make(directory, gz=True, seed=0):
        rng = np.random.default_rng(seed)
        directory.mkdir(parents=True, exist_ok=True)
        arrays = {}
        for prefix, n in (("train", 6), ("t10k", 4)):
            images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
            labels = rng.integers(0, 10, size=n, dtype=np.uint8)
            suffix = ".gz" if gz else ""
            _write_idx(directory / f"{prefix}-images-idx3-ubyte{suffix}", images, gz)
            _write_idx(directory / f"{prefix}-labels-idx1-ubyte{suffix}", labels, gz)
            arrays[prefix] = (images, labels)
        return arrays

    return make
