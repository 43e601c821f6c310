"""CIFAR-10 and CIFAR-100 in the official "python version" format, read safely.

The data is either the archive as distributed (``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``, read in
place: members are streamed out of the tar, nothing is extracted to disk) or its extracted folder
(``cifar-10-batches-py/`` with ``data_batch_1..5``, ``test_batch``, ``batches.meta``; ``cifar-100-python/`` with
``train``, ``test``, ``meta``).

Each batch is a pickle of a dict: ``b'data'`` a uint8 ndarray ``(N, 3072)`` (1024 red, 1024 green, 1024 blue values
of a 32x32 image, row-major), ``b'labels'`` (CIFAR-10) or ``b'fine_labels'`` (CIFAR-100) a list of ints, plus
``b'filenames'`` and ``b'batch_label'``. Unpickling runs code named by the file, so these are read with
:class:`RestrictedUnpickler`, which resolves only the handful of numpy names an ndarray needs and refuses the rest:
a planted pickle cannot run anything.
"""

from __future__ import annotations

import codecs
import importlib
import io
import os
import pathlib
import pickle
import tarfile
import zlib

import numpy as np
import torch

from vggnet.data.catalogue import DATASETS, canonical_name, search_dirs
from vggnet.data.dataset import ImageDataset
from vggnet.errors import DataError

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


def _safe_globals() -> dict[tuple[str, str], object]:
    reconstruct = _numpy_global(("numpy._core.multiarray", "numpy.core.multiarray"), "_reconstruct")
    frombuffer = _numpy_global(("numpy._core.numeric", "numpy.core.numeric"), "_frombuffer")
    allowed: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{package}.numeric", "_frombuffer")] = frombuffer
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild plain numpy arrays, lists, dicts, strings and numbers, and nothing else.

    ``find_class`` is the only way a pickle reaches Python code; it returns the few numpy array constructors that
    CIFAR pickles name and raises :class:`pickle.UnpicklingError` for every other global (``os.system``,
    ``builtins.eval``, ...).
    """

    _ALLOWED: dict[tuple[str, str], object] | None = None

    def find_class(self, module: str, name: str):
        if RestrictedUnpickler._ALLOWED is None:
            RestrictedUnpickler._ALLOWED = _safe_globals()
        try:
            return RestrictedUnpickler._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}") from None


def restricted_loads(raw: bytes, source: str):
    """Unpickle ``raw`` with :class:`RestrictedUnpickler` (``encoding='bytes'`` as the official loader does).

    Any failure -- a forbidden global, a truncated or garbled stream -- is a DataError naming ``source``.
    """
    try:
        return RestrictedUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as exc:  # a corrupt pickle can raise almost anything; all of it means "bad file"
        raise DataError(f"{source}: not a plain CIFAR pickle ({type(exc).__name__}: {exc}); "
                        "download the dataset again from the official site") from None


def _str_keys(obj, source: str) -> dict:
    if not isinstance(obj, dict):
        raise DataError(f"{source}: expected a pickled dict, got {type(obj).__name__}; not a CIFAR batch file")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def parse_batch(raw: bytes, source: str, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, 3, 32, 32)`` uint8 and labels ``(N,)`` int64 from one pickled batch, validated."""
    batch = _str_keys(restricted_loads(raw, source), source)
    data, labels = batch.get("data"), batch.get(label_key)
    if data is None or labels is None:
        raise DataError(f"{source}: batch lacks 'data' or '{label_key}' (keys: {sorted(map(str, batch))}); "
                        "not a batch of this dataset")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != CIFAR_ROW_BYTES:
        shape = getattr(data, "shape", None)
        raise DataError(f"{source}: 'data' must be a uint8 array (N, {CIFAR_ROW_BYTES}), got "
                        f"{getattr(data, 'dtype', type(data).__name__)} {shape}; corrupt or not CIFAR")
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or len(labels) != len(data):
        raise DataError(f"{source}: '{label_key}' must be {len(data)} integers, got {labels.dtype} "
                        f"{labels.shape}; corrupt or not CIFAR")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{source}: labels span [{labels.min()}, {labels.max()}], expected 0..{num_classes - 1}; "
                        "corrupt file or the other CIFAR")
    return data.reshape(-1, *CIFAR_IMAGE_SHAPE), labels.astype(np.int64)


def parse_meta(raw: bytes, source: str, names_key: str, num_classes: int) -> list[str]:
    """Class names from ``batches.meta`` / ``meta``."""
    names = _str_keys(restricted_loads(raw, source), source).get(names_key)
    if not isinstance(names, list) or len(names) != num_classes:
        raise DataError(f"{source}: '{names_key}' must list {num_classes} class names, got "
                        f"{len(names) if isinstance(names, list) else type(names).__name__}; corrupt or not CIFAR")
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]


def _is_unsafe(name: str) -> bool:
    return name.startswith(("/", "\\")) or ".." in pathlib.PurePosixPath(name.replace("\\", "/")).parts


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
                    f"Fix: run `vggnet data fetch {name}`, pass --data-dir DIR, or set $VGGNET_DATA")


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
