"""Hostile inputs to the data readers: every file here is built by the test to make a reader allocate far more than
the file holds, block forever, fall back to another copy of the data, or return wrong pixels. The readers must
refuse each one with a one-line DataError naming the file, and -- for the memory attacks -- before allocating: the
peak of traced allocations (tracemalloc sees numpy and Python, and every check runs before a torch tensor exists)
stays within a few MB for inputs of under 1 MB."""

import gzip
import json
import os
import pickle
import re
import struct
import tarfile
import threading
import tracemalloc
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from vggnet.data import decode_image, load_dataset, load_folder
from vggnet.data.cifar import load_cifar, parse_batch
from vggnet.data.folder import _cache_filename, _fingerprint, cache_dir, plan_split
from vggnet.data.idx import MAGIC_IMAGES, MAGIC_LABELS, read_idx
from vggnet.base.errors import DataError

MB = 1 << 20
ROW = 3072  # bytes of one CIFAR image
_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1))[0]  # numpy's own ndarray rebuilder, whatever its module


def peak_while_refused(call, match):
    """Run ``call``, which must raise a one-line DataError matching ``match``; return the peak traced bytes."""
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=match) as info:
            call()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "\n" not in str(info.value)
    return peak


def refused_within(call, fifo, match, seconds=5.0):
    """``call`` reads ``fifo`` (a named pipe with no writer); it must raise a DataError matching ``match`` within
    ``seconds`` instead of blocking. A reader that blocks is released afterwards by opening the pipe for writing."""
    outcome = {}

    def run():
        try:
            call()
            outcome["result"] = "returned"
        except Exception as exc:  # the outcome is asserted below, in the test's thread
            outcome["result"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        with open(fifo, "wb"):  # let the blocked reader see end of file, so the thread ends
            pass
        thread.join(seconds)
        pytest.fail(f"reading the FIFO {fifo} blocked for {seconds} s")
    assert isinstance(outcome["result"], DataError), outcome["result"]
    assert str(fifo) in str(outcome["result"]) and re.search(match, str(outcome["result"]))


# ------------------------------------------------------------------------------------------------ CIFAR pickles
class StridedArray:
    """Pickles as ``numpy.ndarray(shape, dtype, buffer, 0, strides)`` -- the globals the CIFAR reader allows
    (``numpy.ndarray``, ``numpy.dtype``, ``_codecs.encode``) -- so it unpickles as a view of ``buffer`` with the
    given strides: ``strides=(0, 1)`` repeats one row N times, a broadcast array of a few bytes of file."""

    def __init__(self, shape, dtype, buffer, strides):
        self.args = (shape, np.dtype(dtype), buffer, 0, strides)

    def __reduce__(self):
        return np.ndarray, self.args


class UninitialisedArray:
    """Pickles as ``numpy.ndarray(shape, dtype)``: an array of any size, allocated from a few bytes of file."""

    def __init__(self, shape):
        self.args = (shape, np.dtype(np.uint8))

    def __reduce__(self):
        return np.ndarray, self.args


class SharedBytesArray:
    """Pickles as numpy does (``_reconstruct`` + state) but with a byte-swapped dtype over ``raw``, one byte string
    that every such array of the pickle shares through the memo: numpy copies it for each array."""

    def __init__(self, raw):
        self.raw = raw

    def __reduce__(self):
        return _RECONSTRUCT, (np.ndarray, (0,), b"b"), (1, (len(self.raw) // 2,), np.dtype(">u2"), False, self.raw)


def cifar_batch(data, labels, **extra):
    """A protocol-2 CIFAR-10 batch pickle with ``data`` and ``labels`` (any objects) and extra entries."""
    return pickle.dumps({b"batch_label": b"hostile", b"labels": labels, b"data": data,
                         **{k.encode(): v for k, v in extra.items()}}, protocol=2)


@pytest.mark.parametrize("n", [1000, 1_000_000])
def test_stride0_data_is_refused_before_any_copy(n):
    raw = cifar_batch(StridedArray((n, ROW), np.uint8, bytes(ROW), (0, 1)),
                      StridedArray((n,), np.int64, bytes(8), (0,)))
    assert len(raw) < 8000  # n images "in" a file of a few KB
    peak = peak_while_refused(lambda: parse_batch(raw, "data_batch_1", "labels", 10), r"data_batch_1: .*numpy\.ndarray")
    assert peak < 2 * MB


def test_uninitialised_array_of_any_size_is_refused():
    raw = cifar_batch(UninitialisedArray((100_000, ROW)), [0] * 100_000)
    peak = peak_while_refused(lambda: parse_batch(raw, "test_batch", "labels", 10),
                              r"test_batch: not a plain CIFAR pickle .*refusing to call numpy\.ndarray")
    assert peak < 4 * MB  # the labels list itself is about 1 MB of Python ints


def test_shared_bytes_cannot_multiply_into_many_arrays():
    shared = bytes(64 * 1024)
    raw = cifar_batch(np.zeros((1, ROW), np.uint8), [0], filenames=[SharedBytesArray(shared) for _ in range(200)])
    assert len(raw) < 100 * 1024  # 200 arrays of 64 KB each = 12.5 MB described by under 100 KB of file
    peak = peak_while_refused(lambda: parse_batch(raw, "data_batch_2", "labels", 10),
                              "data_batch_2: not a plain CIFAR pickle .*arrays larger than the file")
    assert peak < 2 * MB


def test_object_arrays_are_refused_while_unpickling():
    raw = cifar_batch(np.zeros((1, ROW), np.uint8), np.array([0], dtype=object))
    with pytest.raises(DataError, match="data_batch_3: not a plain CIFAR pickle .*refusing an object array"):
        parse_batch(raw, "data_batch_3", "labels", 10)


def test_labels_that_are_arrays_are_not_stacked():
    block = np.zeros(64 * 1024, np.uint8)
    raw = cifar_batch(np.zeros((1, ROW), np.uint8), [block] * 500)  # one memoised array, referenced 500 times
    assert len(raw) < 80 * 1024
    peak = peak_while_refused(lambda: parse_batch(raw, "data_batch_4", "labels", 10),
                              r"data_batch_4: 'labels' must be 1 integers, got list of 500")
    assert peak < 2 * MB


def test_honest_batch_still_loads_exactly():
    data = np.arange(3 * ROW, dtype=np.uint64).astype(np.uint8).reshape(3, ROW)
    images, labels = parse_batch(cifar_batch(data, [7, 0, 9]), "b", "labels", 10)
    assert np.array_equal(images.reshape(3, ROW), data) and labels.tolist() == [7, 0, 9]
    assert labels.dtype == np.int64 and images.shape == (3, 3, 32, 32)


def write_cifar10(folder, batch):
    """cifar-10-batches-py/ in ``folder`` whose six batches are ``batch`` and whose meta is valid."""
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(batch)
    names = [name.encode() for name in "abcdefghij"]
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}, protocol=2))


def test_oversized_batch_file_is_refused_from_its_size(data_env, monkeypatch):
    folder = data_env / "d" / "cifar-10-batches-py"
    write_cifar10(folder, cifar_batch(np.zeros((2, ROW), np.uint8), [1, 2]))
    monkeypatch.setattr("vggnet.data.cifar.MAX_MEMBER_BYTES", 1000, raising=False)  # the batches have ~6 KB
    with pytest.raises(DataError, match=r"data_batch_1: \d+ bytes, more than the 1000 a CIFAR batch file may have"):
        load_cifar("cifar10", data_env / "d")


def test_oversized_archive_member_is_refused_before_reading(data_env, monkeypatch):
    write_cifar10(data_env / "src" / "cifar-10-batches-py", cifar_batch(np.zeros((2, ROW), np.uint8), [1, 2]))
    with tarfile.open(data_env / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(data_env / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    monkeypatch.setattr("vggnet.data.cifar.MAX_MEMBER_BYTES", 1000, raising=False)
    with pytest.raises(DataError, match=r"cifar-10-python\.tar\.gz:cifar-10-batches-py/\S+: \d+ bytes, more than"):
        load_cifar("cifar10", data_env)


def test_fifo_batch_does_not_block(data_env):
    folder = data_env / "d" / "cifar-10-batches-py"
    write_cifar10(folder, cifar_batch(np.zeros((2, ROW), np.uint8), [1, 2]))
    (folder / "data_batch_1").unlink()
    os.mkfifo(folder / "data_batch_1")
    refused_within(lambda: load_cifar("cifar10", data_env / "d"), folder / "data_batch_1", "not a regular file")


# ------------------------------------------------------------------------------------------------ IDX files
def idx_header(magic, *dims):
    return struct.pack(">I", magic) + struct.pack(f">{len(dims)}I", *dims)


def test_gzip_bomb_stops_at_the_declared_size(tmp_path):
    """100 images declared, 64 MB of zeros after them: refused once the declared bytes are read, with the
    decompressed size never held in memory."""
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(idx_header(MAGIC_IMAGES, 100, 28, 28) + bytes(100 * 784 + 64 * MB), 1))
    assert path.stat().st_size < MB
    peak = peak_while_refused(lambda: read_idx(path, MAGIC_IMAGES),
                              r"train-images-idx3-ubyte\.gz: .*longer than its header says")
    assert peak < 4 * MB


@pytest.mark.parametrize("dims, gz", [((0xFFFFFFFF, 28, 28), False), ((2_000_000,), True)])
def test_header_over_the_caps_is_refused_before_reading(tmp_path, dims, gz):
    """Absurd dimensions (4 G images), and 2 M labels (2 MB, under the byte cap but over the item cap) that are
    really there: refused from the header alone."""
    magic = MAGIC_IMAGES if len(dims) == 3 else MAGIC_LABELS
    content = idx_header(magic, *dims) + (bytes(dims[0]) if gz else b"")
    path = tmp_path / "hostile-idx"
    path.write_bytes(gzip.compress(content, 1) if gz else content)
    peak = peak_while_refused(lambda: read_idx(path, magic), r"hostile-idx: header declares .* over the limit")
    assert peak < MB


def test_real_sizes_pass_with_margin_and_one_copy(tmp_path):
    """Fashion-MNIST's training images (60000x28x28, 47 MB) read with about one payload of memory, not two."""
    payload = 60000 * 28 * 28
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(idx_header(MAGIC_IMAGES, 60000, 28, 28) + bytes(range(256)) * (payload // 256), 1))
    tracemalloc.start()
    try:
        images = read_idx(path, MAGIC_IMAGES)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert images.shape == (60000, 28, 28) and images.flags.writeable
    assert images[0, 0, :3].tolist() == [0, 1, 2] and int(images[-1, -1, -1]) == (payload - 1) % 256
    assert peak < payload + 12 * MB


def test_fashion_mnist_images_of_another_size_are_refused(data_env, data_fake_fashion_mnist, data_write_idx):
    data_fake_fashion_mnist(data_env / "fm")
    data_write_idx(data_env / "fm" / "t10k-images-idx3-ubyte.gz", np.zeros((4, 5, 5), np.uint8), gz=True)
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz: images are 5x5, Fashion-MNIST's are 28x28"):
        load_dataset("fashion-mnist", data_dir=data_env / "fm")


def test_fifo_idx_does_not_block(tmp_path):
    os.mkfifo(tmp_path / "labels")
    refused_within(lambda: read_idx(tmp_path / "labels", MAGIC_LABELS), tmp_path / "labels", "not a regular file")


# ------------------------------------------------------------------------------------------------ --data-dir
@pytest.fixture
def fallback_copies(data_env, data_fake_fashion_mnist, monkeypatch):
    """Fashion-MNIST in $VGGNET_DATA and in the download directory: places an explicit --data-dir must not reach."""
    data_fake_fashion_mnist(data_env / "env")
    data_fake_fashion_mnist(data_env / "xdg-cache" / "vggnet" / "data" / "fashion-mnist")
    monkeypatch.setenv("VGGNET_DATA", str(data_env / "env"))
    return data_env


@pytest.mark.parametrize("spec", ["fashion-mnist", "cifar10", "cifar100"])
def test_missing_data_dir_is_an_error_not_a_fallback(fallback_copies, spec):
    missing = fallback_copies / "nonexistent"
    with pytest.raises(DataError, match=rf"not found: --data-dir {missing} does not exist") as info:
        load_dataset(spec, data_dir=missing)
    message = str(info.value)
    assert "\n" not in message and "omit --data-dir" in message and str(fallback_copies / "env") not in message


def test_data_dir_without_the_dataset_searches_nowhere_else(fallback_copies, data_fake_fashion_mnist):
    partial = fallback_copies / "partial"
    data_fake_fashion_mnist(partial)
    (partial / "train-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DataError, match="Fashion-MNIST not found") as info:
        load_dataset("fashion-mnist", data_dir=partial)
    message = str(info.value)
    assert f"{partial} (missing train-images-idx3-ubyte)" in message
    assert f"{partial / 'fashion-mnist'} (no such directory)" in message
    assert str(fallback_copies / "env") not in message and "xdg-cache" not in message


def test_data_dir_that_is_a_file_or_empty_is_an_error(fallback_copies):
    (fallback_copies / "afile").write_text("x")
    with pytest.raises(DataError, match=r"--data-dir \S*afile is not a directory"):
        load_dataset("fashion-mnist", data_dir=fallback_copies / "afile")
    with pytest.raises(DataError, match="--data-dir . is empty"):
        load_dataset("cifar10", data_dir="")


def test_without_data_dir_the_fallbacks_remain(fallback_copies):
    train, test = load_dataset("fashion-mnist")
    assert len(train) == 6 and len(test) == 4


# ------------------------------------------------------------------------------------------------ images
def png_chunk(kind, body):
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def test_sixteen_bit_gray_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 300, 32767, 32768, 65535]], np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    # round(v * 255 / 65535): 0, 1, 1.167 -> 1, 127.498 -> 127, 127.502 -> 128, 255
    expected = [0, 1, 1, 127, 128, 255]
    assert decode_image(tmp_path / "deep.png", None, 1)[0, :, 0].tolist() == expected
    assert decode_image(tmp_path / "deep.png", None, 3)[0].tolist() == [[v] * 3 for v in expected]


def test_sixteen_bit_transparency_key_becomes_black(tmp_path):
    Image.fromarray(np.array([[65535, 300, 65535]], np.uint16)).save(tmp_path / "key.png", transparency=300)
    assert decode_image(tmp_path / "key.png", None, 1)[0, :, 0].tolist() == [255, 0, 255]


def test_float_tiff_in_unit_range_is_scaled(tmp_path):
    Image.fromarray(np.array([[0.0, 0.25, 0.5, 1.0]], np.float32)).save(tmp_path / "float.tif")
    # round(v * 255), halves to even: 0, 63.75 -> 64, 127.5 -> 128, 255
    assert decode_image(tmp_path / "float.tif", None, 1)[0, :, 0].tolist() == [0, 64, 128, 255]


@pytest.mark.parametrize("bad", [2.0, -0.5, float("nan")])
def test_float_tiff_outside_unit_range_is_refused(tmp_path, bad):
    Image.fromarray(np.array([[0.0, bad]], np.float32)).save(tmp_path / "hdr.tif")
    with pytest.raises(DataError, match=r"hdr\.tif: floating-point pixels outside \[0, 1\]") as info:
        decode_image(tmp_path / "hdr.tif", None, 3)
    assert "\n" not in str(info.value)


def test_huge_png_is_refused_from_its_header(tmp_path):
    """A valid 1 x 50,000,000 grayscale PNG of 100 KB (50 M rows of one black pixel): refused before decoding."""
    height = 50_000_000
    ihdr = struct.pack(">IIBBBBB", 1, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(bytes(2 * height), 9)
    path = tmp_path / "strip.png"
    chunks = png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunks)
    assert path.stat().st_size < MB
    peak = peak_while_refused(lambda: decode_image(path, None, 3), r"strip\.png: 1x50000000 pixels exceed the limit")
    assert peak < 2 * MB


def test_extreme_aspect_ratio_is_refused_before_resizing(tmp_path, monkeypatch):
    """The resized intermediate counts too. With the limit lowered to 10000 pixels, a 2x100 strip (200 pixels)
    resized to 32 on its short side would be 32x1600 = 51200 pixels: refused; to 8, 8x400 = 3200: decoded."""
    Image.new("RGB", (2, 100), (9, 8, 7)).save(tmp_path / "strip.png")
    monkeypatch.setattr("vggnet.data.images.MAX_IMAGE_PIXELS", 10_000, raising=False)
    assert decode_image(tmp_path / "strip.png", 8, 3).tolist() == [[[9, 8, 7]] * 8] * 8
    with pytest.raises(DataError, match=r"strip\.png: 2x100 pixels resized to 32 on the shorter side would exceed"):
        decode_image(tmp_path / "strip.png", 32, 3)


def test_fifo_image_does_not_block(tmp_path):
    os.mkfifo(tmp_path / "photo.jpg")
    refused_within(lambda: decode_image(tmp_path / "photo.jpg", 8), tmp_path / "photo.jpg", "not a regular file")


# ------------------------------------------------------------------------------------------------ folders
def test_folder_cache_with_test_images_of_another_size_is_not_served(tmp_path, data_env):
    """A cache file under the right name whose test images are 10x10 while training's are 12x12 (a foreign or
    damaged cache): ignored and replaced, so train and test always come out at ``image_size``."""
    root = tmp_path / "pets"
    for name, colour in (("cat", (200, 10, 10)), ("dog", (10, 200, 10))):
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (20 + i, 16), colour).save(root / name / f"{name}{i}.png")
    root = root.resolve()
    classes, splits = plan_split(root, 0.2)
    name = _cache_filename(12, 3, _fingerprint(root, 12, 3, 0.2, splits))
    cache_dir(root).mkdir(parents=True)
    forged = {f"{split}_images": torch.zeros((len(splits[split]), 3, size, size), dtype=torch.uint8)
              for split, size in (("train", 12), ("test", 10))}
    forged.update({f"{split}_labels": torch.tensor([label for _, label in splits[split]]) for split in splits})
    from safetensors.torch import save_file
    save_file(forged, str(cache_dir(root) / name), metadata={"classes": json.dumps(classes)})
    train, test = load_folder(root, image_size=12)
    assert train.image_shape == test.image_shape == (3, 12, 12)
    fresh_train, fresh_test = load_folder(root, image_size=12, cache=False)
    assert torch.equal(train.images, fresh_train.images) and torch.equal(test.images, fresh_test.images)
