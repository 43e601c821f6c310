"""Prepared (sharded) data sets: an image folder written once as webdataset tar shards with a byte-offset index.

``prepare(folder, to)`` (``vggnet data prepare folder:PATH --to DIR``) writes ``DIR``:

* ``SPLIT-NNNNNN.tar``: webdataset shards written by ``webdataset.TarWriter``; sample ``i`` of a split has the key
  ``f"{i:09d}"`` and the members ``KEY.EXT`` (the encoded image, ``EXT`` its format: jpg, png, webp, ...) and
  ``KEY.cls`` (the label as ASCII digits). Each shard holds ``shard_samples`` samples (the last one of a split fewer).
* ``SPLIT-index.npy``: one row per sample (:data:`INDEX_DTYPE`: shard number, byte offset of the image member's
  data in that shard, its length, label), read from the shards' own tar headers; readers ``np.load`` it with
  ``mmap_mode="r"``.
* ``manifest.json``, written last: format, classes, ``max_side``, source, per split its samples, index and shards
  (each with samples, bytes and sha256), and the ``bad`` list. Its presence means the set is complete.

The names, the index dtype and the readers (:func:`read_manifest`, :func:`verify`) are
:mod:`vggnet.data.shard_format`'s, re-exported here.

Splits and classes are those of ``folder:PATH`` (:func:`vggnet.data.folder.plan_split`), in its order. Every image is
checked by the one decoder (:func:`vggnet.data.images.decode_image`); one that cannot be read goes into ``bad`` with
its reason (none is skipped silently). An image whose shorter side is at most ``max_side`` is stored as its own
bytes (lossless, its own format); a larger one is resized (its decoded upright RGB pixels, shorter side to
``max_side``, the longer ``int(max_side * long / short)``, bilinear) and encoded as JPEG (quality 95) when it was a
JPEG, else as PNG. Shards are written to a temporary name and renamed; after each one, ``.prepare-progress.json``
records it, so a prepare that was stopped finishes when run again with the same arguments: the finished shards are
checked (sha256) and kept, only the rest is written, and the result is byte for byte that of an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import secrets
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import webdataset
from PIL import Image
from tqdm import tqdm

from vggnet.base.errors import ConfigError, DataError, OutputError
from vggnet.base.files import TEMP_NAME, atomic_write_bytes, atomic_write_json, fsync_dir, make_dirs, remove_temp_files
from vggnet.base.guard import json_of, new_folder
from vggnet.base.limits import IMAGE_SIZE, Range
from vggnet.base.lock import LOCK_NAME, hold
from vggnet.data.folder import DEFAULT_TEST_FRACTION, plan_split
from vggnet.data.images import ImageFileError, decode_image, resize_shorter
from vggnet.data.shard_format import (ENGINE, FORMAT, INDEX_DTYPE, MANIFEST, PROGRESS, SPLITS, VERSION, check_file,
                                      index_name, read_manifest, shard_name, verify)

DEFAULT_MAX_SIDE = 512
DEFAULT_SHARD_SAMPLES = 10_000  # about 1 GB of ImageNet photos at max_side 512
SHARD_SAMPLES = Range(1, 10**7, integer=True)
TEST_FRACTION = Range(0, 1, open_low=True, open_high=True)
JPEG_QUALITY = 95
#: The largest image member: the index stores sizes as int32.
MAX_MEMBER_BYTES = 2**31 - 1
_EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg"}


# ------------------------------------------------------------------------------------------------ planning
@dataclass(frozen=True)
class _Plan:
    root: Path
    classes: list[str]
    splits: dict[str, list[tuple[str, int]]]
    arguments: dict[str, Any]
    key: str


def _plan(folder: str | os.PathLike, max_side: int, shard_samples: int, test_fraction: float) -> _Plan:
    for name, value, allowed in (("max_side", max_side, IMAGE_SIZE), ("shard_samples", shard_samples, SHARD_SAMPLES),
                                 ("test_fraction", test_fraction, TEST_FRACTION)):
        if allowed.problem(value) is not None:
            raise ConfigError(f"{name} {allowed.problem(value)}")
    root = Path(os.path.expanduser(folder)).resolve()
    if not root.is_dir():
        raise DataError(f"folder:{folder}: no such directory; pass folder:PATH with one subfolder per class")
    classes, splits = plan_split(root, test_fraction)
    files = []
    for split in SPLITS:
        for rel, label in splits[split]:
            try:
                stat = (root / rel).stat()
            except OSError as err:
                raise DataError(f"{root / rel}: cannot be read ({err.strerror or err}); check the folder") from None
            files.append([split, rel, label, stat.st_size, stat.st_mtime_ns])
    arguments = {"source": str(root), "max_side": max_side, "shard_samples": shard_samples,
                 "test_fraction": test_fraction}
    key = hashlib.sha256(json.dumps([FORMAT, VERSION, arguments, classes, files]).encode()).hexdigest()
    return _Plan(root, classes, splits, arguments, key)


# ------------------------------------------------------------------------------------------------ the output folder
def _fresh_progress(plan: _Plan) -> dict[str, Any]:
    return {"format": FORMAT + "-progress", "version": VERSION, "key": plan.key, "arguments": plan.arguments,
            "splits": {split: {"next": 0, "samples": 0, "shards": [], "bad": []} for split in SPLITS}}


def _check_same(to: Path, progress: Any, plan: _Plan) -> None:
    """An unfinished prepare in ``to`` may be finished only with the same arguments and files."""
    if not isinstance(progress, dict) or progress.get("format") != FORMAT + "-progress" \
            or progress.get("version") != VERSION:
        raise OutputError(f"--to {to} holds a {PROGRESS} of another version or program; choose a new folder")
    if progress.get("key") == plan.key:
        return
    old = progress.get("arguments") if isinstance(progress.get("arguments"), dict) else {}
    changed = [f"{name} {old.get(name)!r}, now {value!r}" for name, value in plan.arguments.items()
               if old.get(name) != value]
    what = "; ".join(changed) or "the image files changed since (added, removed or modified)"
    raise OutputError(f"--to {to} holds an unfinished prepare of other arguments ({what}); rerun it with the same "
                      "arguments to finish it, or choose a new folder")


def _claim(to: Path, plan: _Plan) -> dict[str, Any]:
    """The progress record of ``to``: a fresh one in a new or empty folder, or the record of an unfinished prepare
    with the same arguments (whose own files, and nothing else, may be in the folder)."""
    target = Path(os.path.abspath(to))
    if target == plan.root or plan.root in target.parents:
        raise OutputError(f"--to {to} is inside the image folder {plan.root}, which prepare only reads; choose a "
                          "folder outside it")
    progress = json_of(target / PROGRESS) if target.is_dir() else None
    if progress is not None:
        _check_same(to, progress, plan)

    def blocking(names: list[str]) -> list[str]:  # our lock, and an unfinished prepare's own files, may be there
        names = [n for n in names if n != LOCK_NAME]
        if progress is None:
            return names
        return [n for n in names if n not in (PROGRESS, *map(index_name, SPLITS))
                and not TEMP_NAME.match(n) and not re.fullmatch(r"(train|test)-\d{6}\.tar", n)]

    new_folder(target, blocking=blocking, hint="vggnet data prepare writes a new prepared data set; give a new "
               "or empty folder, or one holding an unfinished prepare of the same arguments")
    make_dirs(target)
    remove_temp_files(target)
    if progress is None:
        progress = _fresh_progress(plan)
        atomic_write_json(target / PROGRESS, progress)
    else:
        _check_finished(target, plan, progress)
    return progress


def _check_finished(to: Path, plan: _Plan, progress: dict[str, Any]) -> None:
    """The progress record is whole and the shards an earlier run finished are there: size and sha256 as recorded."""
    foreign = OutputError(f"{to / PROGRESS}: not a record vggnet wrote; move the folder away and prepare again")
    try:
        for split in SPLITS:
            state, items = progress["splits"][split], plan.splits[split]
            shards = state["shards"]
            if [r["file"] for r in shards] != [shard_name(split, i) for i in range(len(shards))] \
                    or state["samples"] != sum(r["samples"] for r in shards) or not isinstance(state["bad"], list) \
                    or type(state["next"]) is not int or not 0 <= state["next"] <= len(items):
                raise foreign
            for r in shards:
                check_file(to / r["file"], r["bytes"], r["sha256"], f"delete {to} and prepare again")
    except (KeyError, TypeError):
        raise foreign from None


# ------------------------------------------------------------------------------------------------ writing
def _encoded(path: Path, max_side: int) -> tuple[str, bytes]:
    """``(ext, bytes)`` of the image member for the file ``path``; :class:`ImageFileError` when it cannot be read."""
    pixels = decode_image(path)  # the check, whatever is stored
    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            kind = image.format or "PNG"
    except Exception:  # noqa: BLE001 - the file changed since it was decoded
        raise ImageFileError(path, "changed while it was read; run prepare again") from None
    height, width = pixels.shape[:2]
    if min(height, width) > max_side:
        jpeg = kind in _EXTENSIONS
        image = resize_shorter(Image.fromarray(pixels, "RGB"), max_side)  # the decoder's own rescale
        out = io.BytesIO()
        if jpeg:
            image.save(out, "JPEG", quality=JPEG_QUALITY)
        else:
            image.save(out, "PNG")
        data, ext = out.getvalue(), "jpg" if jpeg else "png"
    else:
        ext = _EXTENSIONS.get(kind, kind.lower())
    if len(data) > MAX_MEMBER_BYTES:
        raise ImageFileError(path, f"{len(data)} bytes, more than the {MAX_MEMBER_BYTES} a sample may hold")
    return ext, data


class _ShardFile:
    """One shard being written: ``webdataset.TarWriter`` into a temporary file (hashed as it is written), renamed
    to its name by :meth:`finish`; :meth:`discard` removes the temporary file."""

    def __init__(self, path: Path) -> None:
        self.path, self.samples, self.bytes, self.hash = path, 0, 0, hashlib.sha256()
        self.tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"  # as remove_temp_files recognises
        try:
            self.file = open(self.tmp, "xb")
        except OSError as err:
            raise OutputError(f"cannot write {path}: {err.strerror or err}") from None
        self.tar = webdataset.TarWriter(self, encoder=False, mtime=0)  # a fixed mtime: reproducible bytes

    def write(self, data: bytes) -> int:  # the stream TarWriter writes into
        if self.file.closed:  # discarded: the tar stream's own clean-up writes nowhere
            return 0
        self.hash.update(data)
        self.bytes += len(data)
        return self.file.write(data)

    def add(self, key: str, ext: str, data: bytes, label: int) -> None:
        self.tar.write({"__key__": key, ext: data, "cls": str(label).encode("ascii")})
        self.samples += 1

    def finish(self) -> dict[str, Any]:
        self.tar.close()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)
        fsync_dir(self.path.parent, self.path)
        return {"file": self.path.name, "samples": self.samples, "bytes": self.bytes, "sha256": self.hash.hexdigest()}

    def discard(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def _write_split(to: Path, plan: _Plan, split: str, progress: dict[str, Any], bar: tqdm) -> None:
    """The shards of ``split`` from where ``progress`` says the last finished one ended; after each shard, the
    progress record (its shard, the bad images before its end, where the next starts) is written."""
    state, items, shard, pending = progress["splits"][split], plan.splits[split], None, []

    def commit(position: int) -> None:
        nonlocal shard
        if shard is not None:
            state["shards"].append(shard.finish())
            state["samples"] += shard.samples
            shard = None
        state["bad"] += pending
        state["next"] = position
        pending.clear()
        atomic_write_json(to / PROGRESS, progress)

    try:
        for position in range(state["next"], len(items)):
            rel, label = items[position]
            try:
                ext, data = _encoded(plan.root / rel, plan.arguments["max_side"])
            except ImageFileError as err:
                pending.append({"file": rel, "reason": err.reason})
            else:
                if shard is None:
                    shard = _ShardFile(to / shard_name(split, len(state["shards"])))
                shard.add(f"{state['samples'] + shard.samples:09d}", ext, data, label)
                if shard.samples == plan.arguments["shard_samples"]:
                    commit(position + 1)
            bar.update(1)
        if shard is not None or pending or state["next"] < len(items):
            commit(len(items))
    except OutputError:
        raise
    except OSError as err:
        raise OutputError(f"cannot write {shard.path if shard else to}: {err.strerror or err}") from None
    finally:
        if shard is not None:
            shard.discard()


# ------------------------------------------------------------------------------------------------ the index
def _shard_rows(path: Path, number: int, first: int, samples: int) -> list[tuple[int, int, int, int]]:
    """Index rows of the shard ``path`` from its tar headers: ``(number, offset_data, size, label)`` per sample."""
    found: dict[str, dict[str, int]] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                entry = found.setdefault(key, {})
                if ext == "cls":
                    entry["label"] = int(tar.extractfile(member).read(32))
                else:
                    entry["offset"], entry["size"] = member.offset_data, member.size
    except (OSError, ValueError, tarfile.TarError) as err:
        raise DataError(f"{path}: not a readable shard ({err}); delete the folder and prepare again") from None
    if list(found) != [f"{i:09d}" for i in range(first, first + samples)] or any(len(e) != 3 for e in found.values()):
        raise DataError(f"{path}: its samples are not those recorded; delete the folder and prepare again")
    return [(number, e["offset"], e["size"], e["label"]) for e in found.values()]


def _write_index(to: Path, split: str, shards: list[dict[str, Any]]) -> str:
    """``SPLIT-index.npy`` from the shards' headers; returns its sha256."""
    rows, first = [], 0
    for number, record in enumerate(shards):
        rows += _shard_rows(to / record["file"], number, first, record["samples"])
        first += record["samples"]
    out = io.BytesIO()
    np.save(out, np.array(rows, dtype=INDEX_DTYPE).reshape(len(rows)), allow_pickle=False)
    atomic_write_bytes(to / index_name(split), out.getvalue())
    return hashlib.sha256(out.getvalue()).hexdigest()


def _finish(to: Path, plan: _Plan, progress: dict[str, Any]) -> dict[str, Any]:
    splits, bad = {}, []
    for split in SPLITS:
        state = progress["splits"][split]
        bad += state["bad"]
        if state["samples"] == 0:
            first = state["bad"][0] if state["bad"] else {"file": "-", "reason": "no images"}
            raise DataError(f"{plan.root}: no readable image in the {split} split ({len(state['bad'])} unreadable, "
                            f"e.g. {first['file']}: {first['reason']}); replace them, then prepare into a new folder")
        splits[split] = {"samples": state["samples"], "index": index_name(split),
                         "index_sha256": _write_index(to, split, state["shards"]), "shards": state["shards"]}
    manifest = {"format": FORMAT, "version": VERSION, "engine": ENGINE, "classes": plan.classes,
                "max_side": plan.arguments["max_side"], "source": str(plan.root), "complete": True,
                "splits": splits, "bad": bad}
    atomic_write_json(to / MANIFEST, manifest)
    (to / PROGRESS).unlink(missing_ok=True)
    return manifest


def prepare(folder: str | os.PathLike, to: str | os.PathLike, *, max_side: int = DEFAULT_MAX_SIDE,
            shard_samples: int = DEFAULT_SHARD_SAMPLES, test_fraction: float = DEFAULT_TEST_FRACTION,
            progress: bool = True) -> dict[str, Any]:
    """Write the image folder ``folder`` as a prepared data set in ``to`` (see the module docstring) and return its
    manifest (as :func:`read_manifest` reads it). ``to`` must be new, empty, or hold an unfinished prepare of the
    same arguments, which this finishes. ``progress``: a progress bar over images (on a terminal)."""
    to = Path(os.path.abspath(os.path.expanduser(to)))
    if (to / MANIFEST).is_file():  # before the folder is scanned, which takes minutes for ImageNet
        raise OutputError(f"--to {to} already holds a complete prepared data set ({MANIFEST}); choose a new folder "
                          f"(vggnet data verify {to} checks the one there)")
    plan = _plan(folder, max_side, shard_samples, test_fraction)
    with hold(to, to / LOCK_NAME, create=True):  # one prepare per folder: a second is refused in one line
        record = _claim(to, plan)
        total = sum(len(items) for items in plan.splits.values())
        done = sum(record["splits"][split]["next"] for split in SPLITS)
        with tqdm(total=total, initial=done, desc=f"preparing {plan.root.name}", unit="img",
                  disable=None if progress else True, leave=False) as bar:
            for split in SPLITS:
                _write_split(to, plan, split, record, bar)
        return _finish(to, plan, record)


__all__ = ["DEFAULT_MAX_SIDE", "DEFAULT_SHARD_SAMPLES", "ENGINE", "FORMAT", "INDEX_DTYPE", "MANIFEST", "SHARD_SAMPLES",
           "TEST_FRACTION", "VERSION", "index_name", "prepare", "read_manifest", "shard_name",
           "verify"]
