"""IDX files (the MNIST / Fashion-MNIST format) and the Fashion-MNIST loader.

An IDX file is a 4-byte magic number -- two zero bytes, a type code (``0x08`` = unsigned byte) and the number of
dimensions -- followed by one big-endian uint32 per dimension and then the values in row-major order. Images are
``0x00000803`` (N, rows, cols), labels ``0x00000801`` (N). Files may be gzipped (detected from the content, not the
name). Everything is validated: magic, dimensions (capped before reading), exact byte length, label range,
image size, image/label counts.
"""

from __future__ import annotations

import gzip
import math
import os
import pathlib
import stat
import struct
import zlib
from typing import BinaryIO

import numpy as np
import torch

from vggnet.data.catalogue import DATASETS, not_found_fix, search_dirs
from vggnet.data.dataset import ImageDataset
from vggnet.base.errors import DataError

IDX_UBYTE = 0x08
MAGIC_IMAGES = 0x00000803
MAGIC_LABELS = 0x00000801

#: split -> (images file, labels file), without the optional ``.gz``.
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

#: Largest IDX payload read: 256 MiB, over five times Fashion-MNIST's 47 MB training images. A header declaring more
#: is refused before anything is read, so a small file cannot make the reader allocate gigabytes.
MAX_IDX_BYTES = 1 << 28
#: Most items (images or labels) an IDX file may declare: over sixteen times Fashion-MNIST's 60000.
MAX_IDX_ITEMS = 1_000_000
CHUNK_BYTES = 1 << 20


def _open_stream(raw: BinaryIO) -> BinaryIO:
    """``raw`` itself, or a gunzipping reader over it when the file starts with the gzip magic."""
    magic = raw.read(2)
    raw.seek(0)
    return gzip.GzipFile(fileobj=raw, mode="rb") if magic == b"\x1f\x8b" else raw


def _read_exactly(stream: BinaryIO, size: int) -> bytearray:
    """Up to ``size`` bytes of ``stream``, fewer only at its end; memory grows with the bytes actually there, never
    with the size a header declares."""
    buffer = bytearray()
    while len(buffer) < size and (chunk := stream.read(min(CHUNK_BYTES, size - len(buffer)))):
        buffer += chunk
    return buffer


def _parse_header(stream: BinaryIO, source: str, magic: int) -> tuple[int, ...]:
    """The dimensions of the IDX header at the start of ``stream``, checked against ``magic`` and the size caps."""
    head = _read_exactly(stream, 4)
    if len(head) < 4:
        raise DataError(f"{source}: {len(head)} bytes is too short for an IDX header; the file is truncated")
    found = struct.unpack(">I", head)[0]
    if found != magic:
        raise DataError(f"{source}: IDX magic 0x{found:08x}, expected 0x{magic:08x} "
                        f"({'images' if magic == MAGIC_IMAGES else 'labels'}); wrong or corrupt file")
    ndim = magic & 0xFF
    if ndim == 0:
        raise DataError(f"{source}: IDX header declares no dimensions; wrong or corrupt file")
    raw_dims = _read_exactly(stream, 4 * ndim)
    if len(raw_dims) < 4 * ndim:
        raise DataError(f"{source}: header needs {4 + 4 * ndim} bytes, file has {4 + len(raw_dims)}; "
                        "the file is truncated")
    dims = struct.unpack(f">{ndim}I", raw_dims)
    if dims[0] > MAX_IDX_ITEMS or math.prod(dims) > MAX_IDX_BYTES:
        raise DataError(f"{source}: header declares {'x'.join(map(str, dims))} ({dims[0]} items, {math.prod(dims)} "
                        f"bytes), over the limit of {MAX_IDX_ITEMS} items or {MAX_IDX_BYTES} bytes; corrupt or not a "
                        "Fashion-MNIST file, download it again")
    return dims


def _read_idx_stream(stream: BinaryIO, source: str, magic: int) -> np.ndarray:
    """Header, then exactly the bytes it declares, then nothing: trailing data is an error, and no more than the
    declared size is ever decompressed (plus one byte, to see that the file ends there)."""
    dims = _parse_header(stream, source, magic)
    header, size = 4 + 4 * len(dims), math.prod(dims)
    payload = _read_exactly(stream, size)
    if len(payload) < size or stream.read(1):
        found = f"{header + len(payload)}" if len(payload) < size else f"more than {header + size}"
        raise DataError(f"{source}: dimensions {'x'.join(map(str, dims))} need {header + size} bytes, file has "
                        f"{found}; the file is {'truncated' if len(payload) < size else 'longer than its header says'}"
                        ", download it again")
    return np.frombuffer(payload, dtype=np.uint8).reshape(dims)


def read_idx(path: str | os.PathLike, magic: int) -> np.ndarray:
    """Read one IDX file (gzipped or not) as a writable uint8 array, checking it carries ``magic``.

    The file is streamed: the header is checked (magic, size caps :data:`MAX_IDX_ITEMS` / :data:`MAX_IDX_BYTES`)
    before any payload is read, and exactly the declared bytes are read, so a gzip bomb costs no more memory than
    an honest file. Only regular files are read (a FIFO or device would block or never end).
    """
    path = pathlib.Path(path)
    try:
        if not stat.S_ISREG(path.stat().st_mode):  # checked before open(): opening a FIFO blocks
            raise DataError(f"{path}: not a regular file; pass the IDX file itself")
        with open(path, "rb") as raw:
            return _read_idx_stream(_open_stream(raw), str(path), magic)
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}: corrupt or truncated gzip ({exc}); download the file again") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc}); check the path and its permissions") from None


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

    Looked up in ``data_dir`` (and ``data_dir/fashion-mnist``) only, when given; otherwise in ``$VGGNET_DATA`` (and
    ``$VGGNET_DATA/fashion-mnist``), ``/usr/share/datasets/fashion-mnist``, then the ``vggnet data fetch`` directory.
    DataError naming every place searched, and the fixes, when none has them.
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
    raise DataError("Fashion-MNIST not found; searched: " + "; ".join(searched) + ". "
                    + not_found_fix("fashion-mnist", data_dir))


def _load_split(directory: pathlib.Path, split: str) -> ImageDataset:
    info = DATASETS["fashion-mnist"]
    image_path, label_path = (_existing(directory, stem) for stem in FASHION_MNIST_FILES[split])
    images = read_idx(image_path, MAGIC_IMAGES)
    size = info["size"]
    if images.shape[1:] != (size, size):
        raise DataError(f"{image_path}: images are {images.shape[1]}x{images.shape[2]}, Fashion-MNIST's are "
                        f"{size}x{size}; not a Fashion-MNIST file, download it again")
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
