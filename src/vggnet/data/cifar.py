"""CIFAR-10 and CIFAR-100 in the official "python version" format, read safely.

The data is either the archive as distributed (``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``, read in
place: members are streamed out of the tar, nothing is extracted to disk) or its extracted folder
(``cifar-10-batches-py/`` with ``data_batch_1..5``, ``test_batch``, ``batches.meta``; ``cifar-100-python/`` with
``train``, ``test``, ``meta``).

Each batch is a pickle of a dict: ``b'data'`` a uint8 ndarray ``(N, 3072)`` (1024 red, 1024 green, 1024 blue values
of a 32x32 image, row-major), ``b'labels'`` (CIFAR-10) or ``b'fine_labels'`` (CIFAR-100) a list of ints, plus
``b'filenames'`` and ``b'batch_label'``. Unpickling runs code named by the file, so these are read with
:class:`RestrictedUnpickler`, which resolves only the handful of numpy names an ndarray needs and refuses the rest:
a planted pickle cannot run anything. Nor can it describe more than it holds: arrays are built only as numpy
pickles them, never of object dtype, never stride-0 views, and their bytes must be in the file; batch files are
capped at :data:`MAX_MEMBER_BYTES` (checked from the size before reading) and :data:`MAX_BATCH_IMAGES` images.
"""

from __future__ import annotations

import codecs
import importlib
import io
import math
import os
import stat
import pathlib
import pickle
import tarfile
import zlib

import numpy as np
import torch

from vggnet.data.catalogue import DATASETS, canonical_name, not_found_fix, search_dirs
from vggnet.data.dataset import ImageDataset
from vggnet.base.errors import DataError

CIFAR_IMAGE_SHAPE = (3, 32, 32)
CIFAR_ROW_BYTES = 3 * 32 * 32


def _numpy_global(modules: tuple[str, ...], name: str):
    """``name`` from the first importable module of ``modules`` (numpy 2 moved ``numpy.core`` to ``numpy._core``)."""
    for module in modules:
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"numpy has no {name} in any of {modules}")


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles of ``bytes`` use it, restricted to latin-1."""
    if codecs.lookup(encoding).name != "iso8859-1":
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return text.encode("latin1")


_RECONSTRUCT = _numpy_global(("numpy._core.multiarray", "numpy.core.multiarray"), "_reconstruct")
_FROMBUFFER = _numpy_global(("numpy._core.numeric", "numpy.core.numeric"), "_frombuffer")


#: Largest batch member read, on disk or in the archive: 256 MiB, well above CIFAR-100's 155 MB ``train``. Checked
#: from the file's or tar member's size, before reading.
MAX_MEMBER_BYTES = 1 << 28
#: Most images one batch may hold: twice CIFAR-100's 50000 ``train``.
MAX_BATCH_IMAGES = 100_000


class _NdarrayName:
    """What the pickle global ``numpy.ndarray`` resolves to: a name that :meth:`RestrictedUnpickler._reconstruct`
    accepts, but that cannot be called. Calling the real ``numpy.ndarray(shape, dtype, buffer, offset, strides)``
    from a pickle builds arrays of any size over a few bytes (stride 0) or allocates any size uninitialised; CIFAR
    pickles never do it."""

    def __call__(self, *args, **kwargs):
        raise pickle.UnpicklingError("refusing to call numpy.ndarray directly (only _reconstruct may build arrays)")


_NDARRAY = _NdarrayName()


def _state_nbytes(state) -> int:
    """Bytes of the array an ndarray ``__setstate__`` state describes (``(version,) shape, dtype,
    is_fortran, rawdata``), without building it."""
    if not isinstance(state, tuple) or len(state) not in (4, 5):
        raise pickle.UnpicklingError("malformed ndarray state")
    shape, dtype = state[-4], state[-3]
    if (not isinstance(shape, tuple) or not isinstance(dtype, np.dtype)
            or not all(type(d) is int and d >= 0 for d in shape)):
        raise pickle.UnpicklingError("malformed ndarray state")
    if dtype.hasobject:
        raise pickle.UnpicklingError("refusing an object array")
    return math.prod(shape) * dtype.itemsize


class _ArrayBuilder:
    """Stands in for an array during unpickling: ``__setstate__`` charges the array's size to the stream's budget
    before numpy builds it (numpy copies the bytes for a byte-swapped dtype, so arrays that share one memoised byte
    string could otherwise multiply memory). :func:`restricted_loads` swaps builders for their arrays."""

    def __init__(self, unpickler: RestrictedUnpickler) -> None:
        self._unpickler = unpickler
        self.array: np.ndarray | None = None

    def __setstate__(self, state) -> None:
        self._unpickler.charge(_state_nbytes(state))
        array = _RECONSTRUCT(np.ndarray, (0,), b"b")
        array.__setstate__(state)
        self.array = array


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild plain numpy arrays, lists, dicts, strings and numbers, and nothing else.

    ``find_class`` is the only way a pickle reaches Python code; it returns the few numpy array constructors that
    CIFAR pickles name and raises :class:`pickle.UnpicklingError` for every other global (``os.system``,
    ``builtins.eval``, ...). Those constructors are bounded too: arrays are built only the two ways numpy pickles
    them (``_reconstruct`` + state, ``_frombuffer``), never of object dtype, and all arrays of one stream together
    hold at most as many bytes as the stream has (``budget``), so a small file cannot describe a large array.
    """

    def __init__(self, file, budget: int) -> None:
        super().__init__(file, encoding="bytes")
        self._budget = budget

    def charge(self, nbytes: int) -> None:
        """Account for an array of ``nbytes``; UnpicklingError once the arrays outgrow the stream."""
        self._budget -= nbytes
        if self._budget < 0:
            raise pickle.UnpicklingError("arrays larger than the file that holds them")

    def _reconstruct(self, subtype, shape, dtype) -> _ArrayBuilder:
        if subtype is not _NDARRAY or shape != (0,):
            raise pickle.UnpicklingError("_reconstruct is only allowed as numpy pickles ndarrays")
        return _ArrayBuilder(self)

    def _frombuffer(self, buffer, dtype, shape, order) -> np.ndarray:
        if not isinstance(dtype, np.dtype) or dtype.hasobject:
            raise pickle.UnpicklingError("_frombuffer needs a plain numeric dtype")
        self.charge(memoryview(buffer).nbytes)
        return _FROMBUFFER(buffer, dtype, shape, order)

    def find_class(self, module: str, name: str):
        allowed = {("numpy", "ndarray"): _NDARRAY, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): _latin1_encode}
        for package in ("numpy.core", "numpy._core"):
            allowed[(f"{package}.multiarray", "_reconstruct")] = self._reconstruct
            allowed[(f"{package}.numeric", "_frombuffer")] = self._frombuffer
        try:
            return allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}") from None


def _unwrap(obj):
    """``obj``, or the array an :class:`_ArrayBuilder` built (None while its state was never set)."""
    return obj.array if isinstance(obj, _ArrayBuilder) else obj


#: Opcodes that store into the unpickler's memo: an explicit index (PUT, BINPUT, LONG_BINPUT) or the next one.
_MEMO_PUTS = ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE")


def _memo_problem(raw: bytes) -> str | None:
    """What is wrong with the memo indices of the pickle ``raw``, read without running it, or None. A pickler numbers
    its memo entries 0, 1, 2, ...; an index beyond the entries so far is forged, and costs memory: CPython's
    unpickler grows its memo table to the index, so 8 bytes with ``LONG_BINPUT 72886272`` allocate 1.2 GB."""
    import pickletools

    puts = 0
    try:
        for opcode, arg, _ in pickletools.genops(raw):
            if opcode.name in _MEMO_PUTS:
                if arg is not None and not 0 <= int(arg) <= puts:
                    return f"memo index {arg} after {puts} entries"
                puts += 1
    except Exception as exc:  # noqa: BLE001 - a garbled stream: the unpickler would fail on it too
        return f"{type(exc).__name__}: {exc}"
    return None


def restricted_loads(raw: bytes, source: str):
    """Unpickle ``raw`` with :class:`RestrictedUnpickler` (``encoding='bytes'`` as the official loader does).

    Arrays directly in the top-level dict (where CIFAR keeps them) are returned as arrays; any other builder left
    in the result fails the batch checks. Any failure -- a forbidden global, a truncated or garbled stream, arrays
    larger than the stream -- is a DataError naming ``source``.
    """
    problem = _memo_problem(raw)
    if problem is not None:
        raise DataError(f"{source}: not a plain CIFAR pickle ({problem}); download the dataset again from the "
                        "official site")
    try:
        loaded = RestrictedUnpickler(io.BytesIO(raw), budget=len(raw)).load()
    except Exception as exc:  # a corrupt pickle can raise almost anything; all of it means "bad file"
        raise DataError(f"{source}: not a plain CIFAR pickle ({type(exc).__name__}: {exc}); "
                        "download the dataset again from the official site") from None
    return {key: _unwrap(value) for key, value in loaded.items()} if isinstance(loaded, dict) else loaded


def _str_keys(obj, source: str) -> dict:
    if not isinstance(obj, dict):
        raise DataError(f"{source}: expected a pickled dict, got {type(obj).__name__}; not a CIFAR batch file")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _check_data(data, source: str, raw_size: int) -> np.ndarray:
    """``data`` if it is what a CIFAR batch holds: a uint8 ``(N, 3072)`` array with its own contiguous rows (no
    stride-0 or broadcast view), N at most :data:`MAX_BATCH_IMAGES`, its bytes present in the file."""
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != CIFAR_ROW_BYTES:
        shape = getattr(data, "shape", None)
        raise DataError(f"{source}: 'data' must be a uint8 array (N, {CIFAR_ROW_BYTES}), got "
                        f"{getattr(data, 'dtype', type(data).__name__)} {shape}; corrupt or not CIFAR")
    if data.strides != (CIFAR_ROW_BYTES, 1) or data.nbytes > raw_size or len(data) > MAX_BATCH_IMAGES:
        raise DataError(f"{source}: 'data' declares {len(data)} images ({data.nbytes} bytes, strides {data.strides}) "
                        f"in a {raw_size}-byte file (at most {MAX_BATCH_IMAGES} contiguous images whose bytes are in "
                        "the file); corrupt or forged, download the dataset again from the official site")
    return data


def _describe(value) -> str:
    """A short description of what a pickle held, for error messages."""
    if isinstance(value, np.ndarray):
        return f"{value.dtype} array {value.shape}"
    return f"{type(value).__name__} of {len(value)}" if isinstance(value, (list, tuple)) else type(value).__name__


def _check_labels(labels, source: str, label_key: str, n: int, num_classes: int) -> np.ndarray:
    """``labels`` as int64 ``(n,)``: a list of ``n`` ints (or a 1-D integer array) in ``0..num_classes - 1``.

    Elements are checked before any conversion: ``np.asarray`` of a list of arrays would stack (copy) them all.
    """
    if isinstance(labels, np.ndarray) and labels.dtype.kind in "iu" and labels.shape == (n,):
        low, high = (int(labels.min()), int(labels.max())) if n else (0, 0)
    elif isinstance(labels, list) and len(labels) == n and all(type(v) is int for v in labels):
        low, high = (min(labels), max(labels)) if n else (0, 0)
    else:
        raise DataError(f"{source}: '{label_key}' must be {n} integers, got {_describe(labels)}; corrupt or not CIFAR")
    if low < 0 or high >= num_classes:
        raise DataError(f"{source}: labels span [{low}, {high}], expected 0..{num_classes - 1}; "
                        "corrupt file or the other CIFAR")
    return np.array(labels, dtype=np.int64)


def parse_batch(raw: bytes, source: str, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, 3, 32, 32)`` uint8 and labels ``(N,)`` int64 from one pickled batch, validated before anything
    is copied or reshaped."""
    batch = _str_keys(restricted_loads(raw, source), source)
    data, labels = batch.get("data"), batch.get(label_key)
    if data is None or labels is None:
        raise DataError(f"{source}: batch lacks 'data' or '{label_key}' (keys: {sorted(map(str, batch))}); "
                        "not a batch of this dataset")
    data = _check_data(data, source, len(raw))
    labels = _check_labels(labels, source, label_key, len(data), num_classes)
    return data.reshape(-1, *CIFAR_IMAGE_SHAPE), labels


def parse_meta(raw: bytes, source: str, names_key: str, num_classes: int) -> list[str]:
    """Class names from ``batches.meta`` / ``meta``."""
    names = _str_keys(restricted_loads(raw, source), source).get(names_key)
    if not isinstance(names, list) or len(names) != num_classes:
        raise DataError(f"{source}: '{names_key}' must list {num_classes} class names, got "
                        f"{len(names) if isinstance(names, list) else type(names).__name__}; corrupt or not CIFAR")
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]


def _is_unsafe(name: str) -> bool:
    return name.startswith(("/", "\\")) or ".." in pathlib.PurePosixPath(name.replace("\\", "/")).parts


def _check_member_size(size: int, source: str) -> None:
    """DataError when a batch file is larger than :data:`MAX_MEMBER_BYTES` (checked before it is read)."""
    if size > MAX_MEMBER_BYTES:
        raise DataError(f"{source}: {size} bytes, more than the {MAX_MEMBER_BYTES} a CIFAR batch file may have; "
                        "corrupt or forged, download the dataset again from the official site")


def read_archive_members(archive: pathlib.Path, folder: str, names: list[str]) -> dict[str, bytes]:
    """The bytes of each member ``folder/NAME`` for NAME in ``names``, streamed from the tar (never extracted).

    Members with absolute paths or ``..`` make the whole archive suspect: DataError. So does a truncated or corrupt
    archive, or a wanted member that is missing or not a regular file. The result is keyed by NAME.
    """
    wanted = {f"{folder}/{name}": name for name in names}
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                if _is_unsafe(member.name):
                    raise DataError(f"{archive}: member {member.name!r} has an absolute or '..' path; refusing this "
                                    "archive, download the official one again")
                name = wanted.get(member.name.removeprefix("./"))
                if name is not None and member.isfile():
                    _check_member_size(member.size, f"{archive}:{member.name}")
                    found[name] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise DataError(f"{archive}: corrupt or truncated archive ({exc}); delete it and download it again") from None
    missing = [f"{folder}/{name}" for name in names if name not in found]
    if missing:
        raise DataError(f"{archive}: missing member(s) {', '.join(missing)}; not the official archive, "
                        "download it again")
    return found


def read_folder_members(folder: pathlib.Path, names: list[str]) -> dict[str, bytes]:
    """The bytes of each file ``folder/NAME`` for NAME in ``names``, keyed by NAME."""
    found = {}
    for name in names:
        path = folder / name
        try:
            info = path.stat()
            if not stat.S_ISREG(info.st_mode):  # checked before opening: opening a FIFO blocks
                raise DataError(f"{path}: not a regular file; the extracted folder is damaged, extract the archive "
                                "again")
            _check_member_size(info.st_size, str(path))
            found[name] = path.read_bytes()
        except OSError as exc:
            raise DataError(f"{path}: cannot read ({exc.strerror or exc}); the extracted folder is incomplete, "
                            "extract the archive again") from None
    return found


def find_cifar(name: str, data_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """The extracted folder (preferred) or archive of ``cifar10`` / ``cifar100``, first hit in the search order."""
    name = canonical_name(name)
    info = DATASETS[name]
    folder, archive = info["folder"], next(iter(info["files"]))
    searched = []
    for directory in search_dirs(name, data_dir):
        if (directory / info["train_members"][0]).is_file():  # the extracted folder itself
            return directory
        if (directory / folder).is_dir():
            return directory / folder
        if (directory / archive).is_file():
            return directory / archive
        searched.append(str(directory))
    raise DataError(f"{info['title']} not found: no {folder}/ or {archive} in any of: {'; '.join(searched)}. "
                    + not_found_fix(name, data_dir))


def load_cifar(name: str, data_dir: str | os.PathLike | None = None) -> tuple[ImageDataset, ImageDataset]:
    """``(train, test)`` for ``cifar10`` or ``cifar100``: uint8 ``(N, 3, 32, 32)`` images, 50000 / 10000."""
    name = canonical_name(name)
    info = DATASETS[name]
    source = find_cifar(name, data_dir)
    names = info["train_members"] + info["test_members"] + [info["meta_member"]]
    in_folder = source.is_dir()
    if in_folder:
        members = read_folder_members(source, names)
    else:
        members = read_archive_members(source, info["folder"], names)

    def where(member: str) -> str:
        """How error messages name a member: its file, or ``archive:folder/member``."""
        return str(source / member) if in_folder else f"{source}:{info['folder']}/{member}"

    num_classes = len(info["classes"])
    meta = info["meta_member"]
    classes = parse_meta(members[meta], where(meta), info["names_key"], num_classes)

    def split(member_names: list[str]) -> ImageDataset:
        parts = [parse_batch(members[m], where(m), info["label_key"], num_classes) for m in member_names]
        images = np.concatenate([images for images, _ in parts])
        labels = np.concatenate([labels for _, labels in parts])
        return ImageDataset(torch.from_numpy(images), torch.from_numpy(labels), classes, name)

    return split(info["train_members"]), split(info["test_members"])
