"""IDX files (the MNIST / Fashion-MNIST format) and the Fashion-MNIST loader.

An IDX file is a 4-byte magic number -- two zero bytes, a type code (``0x08`` = unsigned byte) and the number of
dimensions -- followed by one big-endian uint32 per dimension and then the values in row-major order. Images are
``0x00000803`` (N, rows, cols), labels ``0x00000801`` (N). Files may be gzipped (detected from the content, not the
name). Everything is validated: magic, dimensions, exact byte length, label range, image/label counts.
"""

from __future__ import annotations

import gzip
import math
import os
import pathlib
import struct
import zlib

import numpy as np
import torch

from vggnet.data.catalogue import DATASETS, search_dirs
from vggnet.data.dataset import ImageDataset
from vggnet.errors import DataError

IDX_UBYTE = 0x08
MAGIC_IMAGES = 0x00000803
MAGIC_LABELS = 0x00000801

#: split -> (images file, labels file), without the optional ``.gz``.
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _read_bytes(path: pathlib.Path) -> bytes:
    """The file's content, gunzipped when it starts with the gzip magic; DataError when unreadable or corrupt."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc}); check the path and its permissions") from None
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: corrupt or truncated gzip ({exc}); download the file again") from None


def parse_idx(data: bytes, source: str, magic: int) -> np.ndarray:
    """Parse IDX bytes whose magic must be ``magic``; ``source`` names the file in error messages."""
    if len(data) < 4:
        raise DataError(f"{source}: {len(data)} bytes is too short for an IDX header; the file is truncated")
    found = struct.unpack(">I", data[:4])[0]
    if found != magic:
        raise DataError(f"{source}: IDX magic 0x{found:08x}, expected 0x{magic:08x} "
                        f"({'images' if magic == MAGIC_IMAGES else 'labels'}); wrong or corrupt file")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{source}: header needs {header} bytes, file has {len(data)}; the file is truncated")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = header + math.prod(dims)
    if len(data) != expected:
        raise DataError(f"{source}: dimensions {'x'.join(map(str, dims))} need {expected} bytes, file has {len(data)}; "
                        f"the file is {'truncated' if len(data) < expected else 'longer than its header says'}, "
                        "download it again")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()


def read_idx(path: str | os.PathLike, magic: int) -> np.ndarray:
    """Read one IDX file (gzipped or not) as a uint8 array, checking it carries ``magic``."""
    path = pathlib.Path(path)
    return parse_idx(_read_bytes(path), str(path), magic)


def _existing(directory: pathlib.Path, stem: str) -> pathlib.Path | None:
    """``directory/stem`` or ``directory/stem.gz``, whichever exists (raw first), else None."""
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def _missing_files(directory: pathlib.Path) -> list[str]:
    return [stem for pair in FASHION_MNIST_FILES.values() for stem in pair if _existing(directory, stem) is None]


def find_fashion_mnist(data_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """The first directory holding all four Fashion-MNIST IDX files (each raw or ``.gz``).

    Looked up in ``data_dir``, ``$VGGNET_DATA`` (and ``$VGGNET_DATA/fashion-mnist``),
    ``/usr/share/datasets/fashion-mnist``, then the ``vggnet data fetch`` directory. DataError naming every place
    searched, and the fixes, when none has them.
    """
    searched = []
    for directory in search_dirs("fashion-mnist", data_dir):
        missing = _missing_files(directory) if directory.is_dir() else None
        if missing == []:
            return directory
        if missing is None:
            searched.append(f"{directory} (no such directory)")
        elif len(missing) == 4:
            searched.append(f"{directory} (no IDX files)")
        else:
            searched.append(f"{directory} (missing {', '.join(missing)})")
    raise DataError("Fashion-MNIST not found; searched: " + "; ".join(searched)
                    + ". Fix: `apt-get install dataset-fashion-mnist`, pass --data-dir DIR, set $VGGNET_DATA, "
                    "or run `vggnet data fetch fashion-mnist`")


def _load_split(directory: pathlib.Path, split: str) -> ImageDataset:
    info = DATASETS["fashion-mnist"]
    image_path, label_path = (_existing(directory, stem) for stem in FASHION_MNIST_FILES[split])
    images = read_idx(image_path, MAGIC_IMAGES)
    labels = read_idx(label_path, MAGIC_LABELS)
    if len(images) != len(labels):
        raise DataError(f"{image_path} has {len(images)} images but {label_path} has {len(labels)} labels; "
                        "the files do not belong together, download them again")
    num_classes = len(info["classes"])
    if len(labels) and int(labels.max()) >= num_classes:
        raise DataError(f"{label_path}: label {int(labels.max())} outside 0..{num_classes - 1}; "
                        "not a Fashion-MNIST label file")
    return ImageDataset(images=torch.from_numpy(images).unsqueeze(1), labels=torch.from_numpy(labels).long(),
                        classes=list(info["classes"]), name="fashion-mnist")


def load_fashion_mnist(data_dir: str | os.PathLike | None = None) -> tuple[ImageDataset, ImageDataset]:
    """``(train, test)`` Fashion-MNIST: uint8 ``(N, 1, 28, 28)`` images, 60000 train and 10000 test."""
    directory = find_fashion_mnist(data_dir)
    return _load_split(directory, "train"), _load_split(directory, "test")
