"""Fuzzing every file format vggnet reads (issue 14): IDX headers, CIFAR pickles, safetensors headers, model.json
and image files. Whatever the bytes, a reader returns a well-formed result or raises a :class:`VggnetError` (the CLI's
one-line exit 2), never another exception, and an input under 1 MB never costs more than :data:`MEMORY_CAP` of
traced (Python and numpy) allocations. Device: the CPU.
"""

import gzip
import io
import json
import pickle
import struct
import tracemalloc

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from vggnet.base.errors import VggnetError

MEMORY_CAP = 32 * 2**20  # bytes of traced allocations for one input under 1 MB
FUZZ = settings(max_examples=60, deadline=None, derandomize=True,  # the same examples in every CI run
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def bounded(call):
    """``call()``'s result or its VggnetError, with the peak of traced allocations checked against the cap."""
    tracemalloc.start()
    try:
        try:
            result = call()
        except VggnetError as err:
            assert "\n" not in str(err), str(err)
            result = err
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < MEMORY_CAP, f"{peak} bytes traced"
    return result


# ------------------------------------------------------------------------------------------------------------ IDX
def _idx_bytes(magic, dims, payload, gz):
    raw = struct.pack(">I", magic) + struct.pack(f">{len(dims)}I", *dims) + payload
    return gzip.compress(raw) if gz else raw


@FUZZ
@given(ndim=st.integers(0, 5), dims=st.lists(st.integers(0, 2**32 - 1), min_size=0, max_size=5),
       small=st.lists(st.integers(0, 40), min_size=0, max_size=5), payload=st.binary(max_size=4096),
       type_code=st.sampled_from([0x08, 0x09, 0x0B, 0x0D, 0xFF]), gz=st.booleans(), use_small=st.booleans(),
       extra=st.integers(0, 3))
def test_idx_reader_on_any_header(tmp_path, ndim, dims, small, payload, type_code, gz, use_small, extra):
    from vggnet.data.idx import read_idx

    shape = (small if use_small else dims)[:ndim]
    magic = type_code << 8 | len(shape)
    if use_small:  # often exactly the declared size, sometimes with trailing bytes
        payload = bytes(int(np.prod(shape, dtype=np.int64)) if shape else 0) + bytes(extra)
    path = tmp_path / "fuzz-idx3-ubyte"
    path.write_bytes(_idx_bytes(magic, shape, payload, gz))
    result = bounded(lambda: read_idx(path, 0x800 | len(shape)))
    if isinstance(result, np.ndarray):
        assert result.dtype == np.uint8 and result.shape == tuple(shape) and type_code == 0x08
        assert len(payload) == result.size  # exactly the declared bytes: no trailing data accepted


def test_idx_gzip_bomb_is_refused_within_the_cap(tmp_path):
    from vggnet.data.idx import read_idx

    path = tmp_path / "bomb-idx3-ubyte.gz"
    # 1,000 declared images followed by 64 MiB more: the reader stops at the declared size and refuses the rest.
    # (An honest header may declare up to MAX_IDX_BYTES; that is the bound for a small .gz of zeros.)
    path.write_bytes(_idx_bytes(0x803, (1000, 28, 28), bytes(1000 * 28 * 28 + 64 * 2**20), gz=True))
    assert path.stat().st_size < 1_000_000
    assert isinstance(bounded(lambda: read_idx(path, 0x803)), VggnetError)  # trailing data: refused


# ---------------------------------------------------------------------------------------------------- CIFAR pickles
arrays = st.builds(lambda shape, dtype: np.zeros(shape, dtype=dtype),
                   st.lists(st.integers(0, 40), min_size=0, max_size=3),
                   st.sampled_from([np.uint8, np.int64, np.float32, np.int16]))
values = st.recursive(st.none() | st.integers(-2**70, 2**70) | st.text(max_size=8) | st.binary(max_size=8) | arrays,
                      lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                                 max_size=4), max_leaves=12)


@FUZZ
@given(batch=st.dictionaries(st.sampled_from(["data", "labels", "fine_labels", b"data", "x"]), values, max_size=4),
       protocol=st.integers(2, 5))
def test_cifar_batch_reader_on_any_pickled_structure(batch, protocol):
    from vggnet.data.cifar import parse_batch

    raw = pickle.dumps(batch, protocol=protocol)
    result = bounded(lambda: parse_batch(raw, "fuzz batch", "labels", 10))
    if not isinstance(result, VggnetError):
        images, labels = result
        assert images.dtype == np.uint8 and images.shape[1:] == (3, 32, 32) and len(labels) == len(images)


@FUZZ
@given(cut=st.integers(0, 400), flips=st.lists(st.tuples(st.integers(0, 399), st.integers(0, 255)), max_size=6))
def test_cifar_batch_reader_on_mutated_bytes(cut, flips):
    from vggnet.data.cifar import parse_batch

    good = pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [1, 2]}, protocol=2)
    raw = bytearray(good[:max(cut, 1)] if cut < len(good) else good)
    for where, value in flips:
        if where < len(raw):
            raw[where] = value
    result = bounded(lambda: parse_batch(bytes(raw), "fuzz batch", "labels", 10))
    if not isinstance(result, VggnetError):
        assert result[0].shape[1:] == (3, 32, 32)


# ------------------------------------------------------------------------------------------------------ safetensors
@FUZZ
@given(entries=st.dictionaries(
    st.text(min_size=1, max_size=6),
    st.fixed_dictionaries({"dtype": st.sampled_from(["F32", "F16", "U8", "I64", "F99", 7]),
                           "shape": st.lists(st.integers(-1, 2**40), max_size=3),
                           "data_offsets": st.lists(st.integers(-1, 2**40), min_size=0, max_size=3)}),
    max_size=3), payload=st.binary(max_size=2048), lie=st.integers(-16, 16))
def test_safetensors_reader_on_any_header(tmp_path, entries, payload, lie):
    from vggnet.base.files import load_tensors

    header = json.dumps(entries).encode()
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(struct.pack("<Q", max(0, len(header) + lie)) + header + payload)
    result = bounded(lambda: load_tensors(path))
    if not isinstance(result, VggnetError):
        assert all(isinstance(t, torch.Tensor) for t in result.values())


def test_a_huge_declared_header_length_is_refused_without_reading(tmp_path):
    from vggnet.base.files import load_tensors

    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 2**62) + b"{}")
    assert isinstance(bounded(lambda: load_tensors(path)), VggnetError)


# -------------------------------------------------------------------------------------------------------- model.json
JSON_VALUES = st.none() | st.booleans() | st.integers(-2**64, 2**64) | st.floats(allow_nan=True) | st.text(max_size=6) \
    | st.lists(st.integers(-5, 10**6), max_size=4)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run directory of a tiny model saved by vggnet itself (model.json + model.safetensors)."""
    from vggnet.net.models import create_model
    from vggnet.store.card import ModelCard
    from vggnet.store.rundir import save_model

    model = create_model("custom", arch=[4, "M"], num_classes=3, in_channels=1, input_size=8, head="gap")
    card = ModelCard(model=model.config, classes=["a", "b", "c"],
                     preprocess={"image_size": 8, "mean": [0.5], "std": [0.25]}, dataset="fashion-mnist",
                     image_size=8)
    path = tmp_path_factory.mktemp("tiny")
    save_model(path, model, card)
    return path


@FUZZ
@example(section="preprocess", key="image_size", value=None)  # found by this test: a TypeError in the size check
@given(section=st.sampled_from(["model", "preprocess", None]), key=st.text(max_size=12) | st.sampled_from(
    ["num_classes", "in_channels", "input_size", "arch", "width", "head", "hidden", "image_size", "mean", "std",
     "classes", "dataset", "crop_fraction", "channel_order", "batch_norm", "dropout"]), value=JSON_VALUES)
def test_a_run_with_any_model_json_value_loads_or_is_refused(tmp_path, tiny_run, section, key, value):
    import shutil

    from vggnet.base.files import load_tensors, safetensors_bytes
    from vggnet.store.card import CARD_KEY
    from vggnet.store.rundir import RunDir

    run = tmp_path / "run"
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(tiny_run, run)
    card = json.loads((run / "model.json").read_text())
    (card if section is None or not isinstance(card.get(section), dict) else card[section])[key] = value
    weights = run / "model.safetensors"  # the card loading reads is the one inside the weights file
    weights.write_bytes(safetensors_bytes(load_tensors(weights), {CARD_KEY: json.dumps(card)}))
    (run / "model.json").write_text(json.dumps(card))
    result = bounded(lambda: RunDir(run).load())
    if not isinstance(result, VggnetError):
        assert result.model(torch.zeros(1, 1, 8, 8)).shape == (1, 3)


# ------------------------------------------------------------------------------------------------------------ images
def _png(width, height, mode="L"):
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, (width, height)).save(buf, format="PNG")
    return buf.getvalue()


@FUZZ
@given(base=st.sampled_from(["png", "gray16", "rgba", "junk"]), cut=st.integers(0, 300),
       flips=st.lists(st.tuples(st.integers(0, 299), st.integers(0, 255)), max_size=4),
       size=st.sampled_from([None, 8, 64]))
def test_image_decoder_on_mutated_files(tmp_path, base, cut, flips, size):
    from vggnet.data.images import decode_image

    raw = bytearray({"png": _png(5, 7), "gray16": _png(5, 7, "I;16"), "rgba": _png(3, 3, "RGBA"),
                     "junk": b"\x89PNG\r\n\x1a\n" + bytes(40)}[base])
    raw = raw[:cut] if 0 < cut < len(raw) else raw
    for where, value in flips:
        if where < len(raw):
            raw[where] = value
    path = tmp_path / "fuzz.png"
    path.write_bytes(bytes(raw))
    result = bounded(lambda: decode_image(path, size, channels=3))
    if not isinstance(result, VggnetError):
        assert result.dtype == np.uint8 and result.shape[2] == 3
        assert size is None or result.shape[:2] == (size, size)


def test_a_tall_thin_png_is_refused_from_its_header(tmp_path):
    import zlib

    from vggnet.data.images import decode_image

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = zlib.compress(b"\x00\x00" * 50_000_000, 9)  # 1 x 50,000,000 grayscale: a few tens of KB compressed
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 50_000_000, 8, 0, 0, 0, 0))
           + chunk(b"IDAT", rows) + chunk(b"IEND", b""))
    path = tmp_path / "tall.png"
    path.write_bytes(png)
    assert len(png) < 1_000_000
    assert isinstance(bounded(lambda: decode_image(path, 32)), VggnetError)


def test_a_forged_memo_index_is_refused_before_the_unpickler_grows_its_memo():
    from vggnet.data.cifar import parse_batch

    raw = b"\x80\x02}r\x00(X\x04"  # PROTO 2, EMPTY_DICT, LONG_BINPUT 72886272: found by the fuzz (1.2 GB before)
    result = bounded(lambda: parse_batch(raw, "forged batch", "labels", 10))
    assert isinstance(result, VggnetError) and "memo index 72886272" in str(result)


def test_a_png_declaring_a_2_gb_chunk_is_read_within_the_file(tmp_path):
    from vggnet.data.images import decode_image

    raw = bytearray(_png(5, 7))
    raw[33] = 127  # the IDAT chunk's length, now about 2**31: found by the fuzz (2 GB allocated before)
    path = tmp_path / "forged.png"
    path.write_bytes(bytes(raw))
    result = bounded(lambda: decode_image(path, None, channels=3))
    assert isinstance(result, VggnetError) or result.shape == (7, 5, 3)
