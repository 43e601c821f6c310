"""The prepared (sharded) data set format, as readers see it: names, the index's dtype, :func:`read_manifest` and
:func:`verify`. :mod:`vggnet.data.shards` writes it (``vggnet data prepare``); its docstring describes the files.

A prepared folder ``DIR`` holds ``SPLIT-NNNNNN.tar`` (webdataset shards: sample ``i`` of a split has the key
``f"{i:09d}"`` and the members ``KEY.EXT``, the encoded image, and ``KEY.cls``, the label in ASCII digits),
``SPLIT-index.npy`` (:data:`INDEX_DTYPE`, one row per sample: shard number, byte offset of the image member's data
in that shard, its length, label; read it with ``np.load(..., mmap_mode="r")``) and ``manifest.json``, written last.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from vggnet.base.errors import DataError
from vggnet.data.fetch import file_digest

FORMAT, VERSION, ENGINE = "vggnet-shards", 1, "webdataset"
MANIFEST, PROGRESS = "manifest.json", ".prepare-progress.json"
SPLITS = ("train", "test")
INDEX_DTYPE = np.dtype([("shard", "<i4"), ("offset", "<i8"), ("size", "<i4"), ("label", "<i4")])
MAX_MANIFEST_BYTES = 256 * 2**20
_HEX64 = re.compile(r"[0-9a-f]{64}")


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}.tar"


def index_name(split: str) -> str:
    return f"{split}-index.npy"


def check_file(path: Path, size: int, sha256: str | None, fix: str) -> None:
    """``path`` exists with ``size`` bytes and (unless None) the sha256 ``sha256``; else one-line DataError."""
    try:
        actual = path.stat().st_size
        if actual != size:
            raise DataError(f"{path}: {actual} bytes, {size} recorded (truncated or replaced); {fix}")
        if sha256 is not None and file_digest(path) != sha256:
            raise DataError(f"{path}: its sha256 does not match the one recorded (corrupt or replaced); {fix}")
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({err.strerror or err}); {fix}") from None


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def manifest_problem(manifest: Any) -> str | None:
    """What makes ``manifest`` other than a complete manifest of this format and version, or None."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return f"not a {FORMAT} manifest"
    if manifest.get("version") != VERSION:
        return f"version {manifest.get('version')!r} of the format, this vggnet reads version {VERSION}"
    if manifest.get("complete") is not True:
        return "the prepare that wrote it did not finish"
    classes, splits = manifest.get("classes"), manifest.get("splits")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        return "no list of class names"
    if not isinstance(splits, dict) or set(splits) != set(SPLITS) or not isinstance(manifest.get("bad"), list):
        return "no train and test splits, or no bad list"
    for split, entry in splits.items():
        shards = entry.get("shards") if isinstance(entry, dict) else None
        if not isinstance(shards, list) or entry.get("index") != index_name(split) \
                or not _HEX64.fullmatch(str(entry.get("index_sha256"))):
            return f"split {split} has no index or shard list"
        for number, s in enumerate(shards):
            if not isinstance(s, dict) or s.get("file") != shard_name(split, number) or not _is_count(s.get("bytes")) \
                    or not _is_count(s.get("samples")) or not _HEX64.fullmatch(str(s.get("sha256"))):
                return f"shard {number} of split {split} is not a record of file, samples, bytes and sha256"
        if not _is_count(entry.get("samples")) or entry["samples"] != sum(s["samples"] for s in shards):
            return f"split {split}: its samples are not the sum of its shards'"
    return None


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """The manifest of the prepared data set ``directory``; a one-line :class:`DataError` naming the file when it
    is missing, not JSON, of another format or version, or incomplete."""
    directory = Path(os.path.expanduser(directory))
    path = directory / MANIFEST
    if not path.is_file():
        if (directory / PROGRESS).is_file():
            raise DataError(f"{directory}: an unfinished prepare (no {MANIFEST} yet); run the same vggnet data "
                            "prepare again to finish it")
        if not directory.is_dir():
            raise DataError(f"{directory}: no such folder; name the folder vggnet data prepare wrote")
        raise DataError(f"{path}: no such file, so {directory} is not a prepared data set; write one with vggnet "
                        "data prepare folder:PATH --to DIR")
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise ValueError(f"larger than {MAX_MANIFEST_BYTES} bytes")
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({err.strerror or err})") from None
    except ValueError as err:
        raise DataError(f"{path}: not JSON ({' '.join(str(err).split())}); prepare the data set again") from None
    return parse_manifest(text, path)


def parse_manifest(text: str, where: str | os.PathLike) -> dict[str, Any]:
    """The manifest in ``text`` (read from ``where``: a file or a URL), checked; a one-line DataError naming
    ``where`` when it is not JSON or not a complete manifest of this format and version."""
    try:
        manifest = json.loads(text)
    except (ValueError, RecursionError) as err:
        raise DataError(f"{where}: not JSON ({' '.join(str(err).split())}); prepare the data set again") from None
    problem = manifest_problem(manifest)
    if problem is not None:
        raise DataError(f"{where}: {problem}; prepare the data set again with this vggnet")
    return manifest


def _check_index(path: Path, manifest: dict[str, Any], split: str) -> None:
    """The index of ``split`` has one row per sample, each inside its shard, with a known label."""
    entry, fix = manifest["splits"][split], "prepare the data set again"
    try:
        rows = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: not a readable index ({' '.join(str(err).split())}); {fix}") from None
    if not isinstance(rows, np.ndarray):
        rows.close()
        raise DataError(f"{path}: an archive of arrays, not one index array; {fix}")
    if rows.dtype != INDEX_DTYPE or rows.shape != (entry["samples"],):
        raise DataError(f"{path}: {rows.shape} rows of {rows.dtype}, expected ({entry['samples']},) of the index "
                        f"dtype; {fix}")
    sizes = np.array([s["bytes"] for s in entry["shards"]] + [0], dtype=np.int64)
    counts = [s["samples"] for s in entry["shards"]]
    shard = np.asarray(rows["shard"]).astype(np.int64)
    inside = (shard >= 0) & (shard < len(counts)) & (rows["offset"] >= 0) & (rows["size"] >= 0)
    inside &= rows["offset"] + rows["size"] <= sizes[np.clip(shard, 0, len(counts))]
    labels_ok = (rows["label"] >= 0) & (rows["label"] < len(manifest["classes"]))
    if not (inside.all() and labels_ok.all() and np.bincount(shard[inside], minlength=len(counts)).tolist() == counts):
        raise DataError(f"{path}: rows point outside their shards or name unknown labels; {fix}")


def verify(directory: str | os.PathLike, deep: bool = False) -> dict[str, Any]:
    """Check the prepared data set ``directory`` against its manifest and return the manifest: every shard's size,
    every index's rows; with ``deep``, every shard's and index's sha256 too. A mismatch is a one-line
    :class:`DataError` naming the file."""
    manifest = read_manifest(directory)
    directory = Path(os.path.expanduser(directory))
    fix = "prepare the data set again (vggnet data prepare)"
    for split in SPLITS:
        entry = manifest["splits"][split]
        for record in entry["shards"]:
            check_file(directory / record["file"], record["bytes"], record["sha256"] if deep else None, fix)
        index = directory / entry["index"]
        if deep:
            check_file(index, index.stat().st_size if index.is_file() else -1, entry["index_sha256"], fix)
        _check_index(index, manifest, split)
    return manifest


__all__ = ["ENGINE", "FORMAT", "INDEX_DTYPE", "MANIFEST", "PROGRESS", "SPLITS", "VERSION", "check_file", "index_name",
           "read_manifest", "shard_name", "verify"]
