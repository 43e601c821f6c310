"""Pickle-free files, written atomically: bytes, text, JSON and safetensors, and the optimizer state as tensors.

Every file is written to a temporary name in the same directory (``.NAME.XXXXXXXX.tmp``), flushed and fsynced,
renamed into place, and the directory fsynced after the rename, so a crash or a signal never leaves a half-written
file under a final name and a rename that returned survives a power loss. A kill between the write and the rename
leaves the temporary file: :func:`remove_temp_files` clears them (a run does at its start). Safetensors files may
carry string metadata (:func:`safetensors_bytes`, :func:`read_safetensors`), read with the same checks as the
tensors' header. Which files a run directory holds, and what is in them, is :mod:`vggnet.store.rundir`'s business; this
module only reads and writes them.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import struct
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from vggnet.base.errors import CheckpointError, OutputError
from vggnet.base.strictjson import dumps as strict_json


@lru_cache(maxsize=None)
def _umask() -> int:
    """The process umask, read without changing it where Linux shows it (``/proc/self/status``); elsewhere it is
    set and restored once, on the first write."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def cache_root() -> Path:
    """vggnet's cache directory: ``$XDG_CACHE_HOME/vggnet``, or ``~/.cache/vggnet``."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "vggnet"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """``data`` into ``path`` through a temporary file in the same folder, fsynced, a rename, and an fsync of the
    folder (the rename itself is durable once this returns). A folder that cannot be written (missing, read-only,
    full) raises :class:`OutputError` naming ``path``; no temporary file is left, except by a kill."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise OutputError(f"cannot write {path}: {err.strerror or err}") from None
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and not isinstance(err, OutputError):
            raise OutputError(f"cannot write {path}: {err.strerror or err}") from None
        raise
    fsync_dir(path.parent, path)


#: Errors of an fsync on a folder where the file system has no such thing (some network and FUSE file systems).
_NO_DIR_FSYNC = (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES)


def fsync_dir(directory: str | os.PathLike, written: str | os.PathLike | None = None) -> None:
    """Make the entries of ``directory`` (a rename into it) durable; :class:`OutputError` naming ``written`` (or the
    folder) when the disk reports a failure. File systems that cannot fsync a folder are left as they are."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as err:
        if err.errno in _NO_DIR_FSYNC:
            return
        raise OutputError(f"cannot write {written or directory}: {err.strerror or err}") from None
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in _NO_DIR_FSYNC:
            raise OutputError(f"cannot write {written or directory}: {err.strerror or err}") from None
    finally:
        os.close(fd)


#: The name of a temporary file of :func:`atomic_write_bytes` (mkstemp's 8 random characters between the dots).
TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


def remove_temp_files(directory: str | os.PathLike) -> list[str]:
    """Delete the temporary files a killed :func:`atomic_write_bytes` left directly in ``directory`` (only files
    named as it names them); returns their names. Call it only where no other process is writing."""
    removed = []
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return removed
    for entry in entries:
        if TEMP_NAME.match(entry.name) and entry.is_file(follow_symlinks=False):
            Path(entry.path).unlink(missing_ok=True)
            removed.append(entry.name)
    return sorted(removed)


def make_dirs(path: str | os.PathLike) -> Path:
    """``mkdir -p``, with :class:`OutputError` naming ``path`` when it cannot be made."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot create the folder {path}: {err.strerror or err}") from None
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """``obj`` as strict JSON (non-finite floats as strings: :mod:`vggnet.base.strictjson`), indented."""
    atomic_write_text(path, strict_json(obj, indent=2) + "\n")


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """The safetensors file of ``tensors`` (on the CPU, contiguous) with ``metadata`` (strings to strings) in its
    header's ``__metadata__``. Give at most one metadata key where the bytes must be reproducible: safetensors does
    not promise an order for several."""
    return st_save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, metadata)


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                 metadata: dict[str, str] | None = None) -> None:
    atomic_write_bytes(path, safetensors_bytes(tensors, metadata))


#: The largest safetensors header read (a JSON index of names, dtypes, shapes and offsets; a VGG's is a few KB).
MAX_HEADER_BYTES = 100 * 2**20
#: The dtypes a safetensors header may name, by its spelling.
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
                      "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U64": torch.uint64,
                      "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as a safetensors header declares it: dtype, shape and byte span ``[start, end)`` of the data."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def _entry(name: str, info: Any) -> TensorEntry | str:
    """The header's ``info`` for tensor ``name`` as a :class:`TensorEntry`, or what is wrong with it."""
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        return f"tensor {name!r} is not described by dtype, shape and data_offsets"
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in SAFETENSORS_DTYPES:
        return f"tensor {name!r} has dtype {dtype!r}, not one of {', '.join(SAFETENSORS_DTYPES)}"
    if not (isinstance(shape, list) and all(type(n) is int and n >= 0 for n in shape)):
        return f"tensor {name!r} has shape {shape!r}, not a list of sizes"
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(n) is int for n in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        return f"tensor {name!r} has data_offsets {offsets!r}, not [start, end] with 0 <= start <= end"
    entry = TensorEntry(SAFETENSORS_DTYPES[dtype], tuple(shape), *offsets)
    nbytes = math.prod(entry.shape) * entry.dtype.itemsize
    if entry.end - entry.start != nbytes:
        return f"tensor {name!r} spans {entry.end - entry.start} bytes, but {dtype} {list(shape)} takes {nbytes}"
    return entry


def _layout_problem(entries: dict[str, TensorEntry], data_bytes: int) -> str | None:
    """What is wrong with where the tensors lie in the ``data_bytes`` after the header, or None: their spans must
    tile the data exactly, back to back from byte 0, with no gap, overlap or byte left over."""
    position = 0
    for name, entry in sorted(entries.items(), key=lambda item: (item[1].start, item[1].end)):
        if entry.start < position:
            return f"tensor {name!r} at bytes {entry.start}-{entry.end} overlaps the tensor before it"
        if entry.start > position:
            return f"tensor {name!r} at bytes {entry.start}-{entry.end} leaves bytes {position}-{entry.start} unused"
        position = entry.end
    if position != data_bytes:
        return f"the tensors take {position} bytes of data, the file holds {data_bytes}"
    return None


def _unreadable(path: Path, detail: str, cause: str) -> CheckpointError:
    return CheckpointError(f"{path} is not a readable safetensors file ({detail}); {cause}")


def read_header(path: str | os.PathLike) -> dict[str, TensorEntry]:
    """The tensors a safetensors file declares, read from its header alone (an 8-byte little-endian length, then
    that many bytes of JSON) and checked against the file's size, before any tensor data is read: a header over
    :data:`MAX_HEADER_BYTES`, an unknown dtype, a span that is not ``numel x element size`` of its dtype, spans
    that do not tile the data back to back, or a file longer or shorter than header + data (a sparse or truncated
    file) raise a one-line :class:`CheckpointError` naming the file, as does a missing one. ``__metadata__`` is
    allowed (strings to strings) and left out; :func:`read_metadata` gives it."""
    with _opened(path) as (f, path):
        return _checked_header(f, path)[0]


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file (empty when it has none), from its header, checked as
    :func:`read_header` checks it."""
    with _opened(path) as (f, path):
        return _checked_header(f, path)[1]


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of the safetensors file ``path`` and its metadata, from one opening of the file (so both come
    from the same version of a file that is replaced by renames), after its header was checked against its size as
    :func:`read_header` does (a forged or sparse file is refused without reading its data)."""
    with _opened(path) as (f, path):
        _, metadata = _checked_header(f, path)
        try:
            f.seek(0)
            data = f.read()
        except OSError as err:
            raise CheckpointError(f"{path} cannot be read ({err.strerror or err})") from None
    try:
        return st_load(data), metadata
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file ({err}); it may be truncated") from None


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors file ``path`` (:func:`read_safetensors` without the metadata)."""
    return read_safetensors(path)[0]


@contextmanager
def _opened(path: str | os.PathLike) -> Iterator[tuple[BinaryIO, Path]]:
    """``path`` opened for reading, and the path; a missing or unreadable file is a one-line CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        f = path.open("rb")
    except OSError as err:
        raise CheckpointError(f"{path} cannot be read ({err.strerror or err})") from None
    with f:
        yield f, path


def _checked_header(f: BinaryIO, path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """The tensors and the metadata the header of the open file ``f`` declares, checked (see :func:`read_header`)."""
    try:
        size = os.fstat(f.fileno()).st_size
        prefix = f.read(8)
        if len(prefix) < 8:
            raise _unreadable(path, f"{size} bytes, shorter than the 8-byte header length", "it is truncated")
        (length,) = struct.unpack("<Q", prefix)
        if length > MAX_HEADER_BYTES:
            raise _unreadable(path, f"its header claims {length} bytes, more than the {MAX_HEADER_BYTES} vggnet "
                              "reads", "it is forged or not safetensors")
        if 8 + length > size:
            raise _unreadable(path, f"its header claims {length} bytes, the file holds {size - 8} after the "
                              "length", "it is truncated")
        text = f.read(length)
    except OSError as err:
        raise CheckpointError(f"{path} cannot be read ({err.strerror or err})") from None
    try:
        header = json.loads(text)
    except (ValueError, RecursionError) as err:
        raise _unreadable(path, f"its header is not JSON: {err}", "it is corrupt") from None
    if not isinstance(header, dict):
        raise _unreadable(path, "its header is not a JSON object", "it is corrupt")
    metadata = header.pop("__metadata__", None) or {}
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise _unreadable(path, "its __metadata__ is not an object of strings", "it is corrupt or forged")
    entries = {}
    for name, info in header.items():
        entry = _entry(name, info)
        if isinstance(entry, str):
            raise _unreadable(path, f"its header is inconsistent: {entry}", "it is corrupt or forged")
        entries[name] = entry
    problem = _layout_problem(entries, size - 8 - length)
    if problem is not None:
        raise _unreadable(path, problem, "it is truncated, padded or forged")
    return entries, metadata


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise CheckpointError(f"{path} cannot be read ({err.strerror or err})") from None
    except (ValueError, RecursionError) as err:  # bad JSON or UTF-8, a 5,000-digit number, absurd nesting
        raise CheckpointError(f"{path} is corrupt ({err})") from None


#: The prefixes wrappers put before state-dict keys: DDP's and torch.compile's.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def strip_prefixes(state: dict[str, Any]) -> dict[str, Any]:
    """Keys without DDP's ``module.`` and torch.compile's ``_orig_mod.`` prefixes (any nesting of them)."""
    out = {}
    for key, value in state.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix):], True
        out[key] = value
    return out


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with DDP's ``module.`` and torch.compile's ``_orig_mod.`` prefixes stripped."""
    return strip_prefixes(model.state_dict())


# ---------------------------------------------------------------------------------------------- training state
def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into tensors (for safetensors) and JSON-able rest."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/{index}/{key}"] = value
            else:
                scalars[f"{index}/{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], rest: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer/"):
            _, index, key = name.split("/", 2)
            state.setdefault(int(index), {})[key] = value
    for name, value in rest["scalars"].items():
        index, key = name.split("/", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": rest["param_groups"]})
