"""Image-folder datasets (``folder:PATH``): one subfolder per class, as Caltech-101 is laid out.

::

    PATH/                      or   PATH/train/CLASS/...  and  PATH/test/CLASS/...
      accordion/image_0001.jpg
      airplanes/...

* Classes are the non-hidden subfolders, sorted by name; label ``i`` is ``classes[i]``. Images are the non-hidden
  files under a class folder (recursively) whose extension Pillow knows; other files are ignored.
* With ``train/`` and ``test/`` subfolders those are the split (classes come from ``train/``). Otherwise each class
  is split deterministically: its files are ordered by the SHA-1 of their relative path and the first
  ``round(test_fraction * n)`` go to test -- at least one when the class has two or more images, never all of them.
  The split depends only on the file names, so it is the same on every machine and every run.
* Within a split, samples are ordered by that same hash, which interleaves the classes: ``subset(n)`` draws from
  all of them.
* Every image is decoded by :func:`vggnet.data.images.decode_image`, the decoder ``vggnet predict`` uses too:
  upright (EXIF orientation), transparency composited over black, RGB, shorter side resized to ``image_size`` and
  centre-cropped to ``image_size`` squared. Images that cannot be decoded are collected and reported together, by
  path; none is skipped silently.
* The decoded tensors are cached in the user's cache, ``$XDG_CACHE_HOME/vggnet/folders/HASH/`` (:func:`cache_dir`,
  ``HASH`` from the folder's resolved path), never in the image folder itself: loading a folder (a dataset named by
  a run's model.json, say) only reads it. Cache files are safetensors, keyed by ``image_size``, the decoder's version
  (:data:`vggnet.data.images.DECODER_VERSION`), the split rule and a fingerprint of every file's path, size and
  modification time; any change to the files or to the decoder means a fresh decode, and a cache whose tensor
  shapes or labels differ from the plan (train and test at another size, say) is ignored and decoded afresh. Cache
  files are written atomically, and replace the earlier cache files of the same ``image_size``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import pathlib
import tempfile
import warnings

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from vggnet.base.files import cache_root
from vggnet.data.dataset import ImageDataset
from vggnet.data.images import DECODER_VERSION, ImageFileError, decode_image
from vggnet.base.errors import ConfigError, DataError

CACHE_VERSION = 1
DEFAULT_TEST_FRACTION = 0.2
MAX_REPORTED_FAILURES = 5


def _hash(text: str) -> str:
    """A stable digest of a path: undecodable bytes of a file name (os.fsdecode's surrogates) hash as themselves."""
    return hashlib.sha1(text.encode("utf-8", "surrogateescape")).hexdigest()


def _image_extensions() -> frozenset[str]:
    return frozenset(ext.lower() for ext in Image.registered_extensions())


def _visible_subdirs(directory: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(class_dir: pathlib.Path, extensions: frozenset[str]) -> list[pathlib.Path]:
    """Image files under ``class_dir`` (recursively), skipping anything hidden, sorted."""
    found = []
    for path in class_dir.rglob("*"):
        hidden = any(part.startswith(".") for part in path.relative_to(class_dir).parts)
        if not hidden and path.suffix.lower() in extensions and path.is_file():
            found.append(path)
    return sorted(found)


def _scan_classes(directory: pathlib.Path, root: pathlib.Path) -> dict[str, list[str]]:
    """``{class name: [paths relative to root, ...]}`` for every class folder in ``directory``."""
    extensions = _image_extensions()
    return {d.name: [p.relative_to(root).as_posix() for p in _image_files(d, extensions)]
            for d in _visible_subdirs(directory)}


def _split_class(files: list[str], test_fraction: float) -> tuple[list[str], list[str]]:
    """(train, test) files of one class, chosen by the hash of each relative path."""
    ordered = sorted(files, key=_hash)
    n = len(ordered)
    n_test = min(max(round(test_fraction * n), 1), n - 1) if n >= 2 else 0
    return ordered[n_test:], ordered[:n_test]


def _check_classes(root: pathlib.Path, per_class: dict[str, list[str]]) -> None:
    if len(per_class) < 2:
        raise DataError(f"{root}: found {len(per_class)} class folder(s), need at least 2; put each class's images "
                        "in its own subfolder (PATH/CLASS/image.jpg)")
    empty = [name for name, files in per_class.items() if not files]
    if empty:
        raise DataError(f"{root}: class folder(s) {', '.join(empty[:MAX_REPORTED_FAILURES])} hold no images; "
                        "add images or remove those folders")


def plan_split(root: pathlib.Path, test_fraction: float) -> tuple[list[str], dict[str, list[tuple[str, int]]]]:
    """Classes and ``{"train": [(relative path, label), ...], "test": [...]}``, without decoding anything."""
    if (root / "train").is_dir() and (root / "test").is_dir():
        train, test = _scan_classes(root / "train", root), _scan_classes(root / "test", root)
        _check_classes(root / "train", train)
        unknown = sorted(set(test) - set(train))
        if unknown:
            raise DataError(f"{root / 'test'}: class folder(s) {', '.join(unknown)} do not exist in "
                            f"{root / 'train'}; test classes must be a subset of the train classes")
    else:
        per_class = _scan_classes(root, root)
        _check_classes(root, per_class)
        pairs = {name: _split_class(files, test_fraction) for name, files in per_class.items()}
        train = {name: pair[0] for name, pair in pairs.items()}
        test = {name: pair[1] for name, pair in pairs.items()}
    classes = sorted(train)
    label = {name: i for i, name in enumerate(classes)}
    splits = {split_name: sorted(((rel, label[name]) for name, files in split.items() for rel in files),
                                 key=lambda item: _hash(item[0]))
              for split_name, split in (("train", train), ("test", test))}
    if not splits["test"]:
        raise DataError(f"{root}: no test images (every class has a single image, or test/ is empty); "
                        "add images or provide train/ and test/ subfolders")
    return classes, splits


def _fingerprint(root: pathlib.Path, image_size: int, channels: int, test_fraction: float,
                 splits: dict[str, list[tuple[str, int]]]) -> str:
    """Digest of everything the cached tensors depend on: sizes, decoder, split rule, every file's name/size/mtime."""
    files = []
    for split in ("train", "test"):
        for rel, label in splits[split]:
            stat = (root / rel).stat()
            files.append([split, rel, label, stat.st_size, stat.st_mtime_ns])
    shape = image_size if channels == 3 else [image_size, channels]  # RGB keys stay those of earlier versions
    key = json.dumps([CACHE_VERSION, DECODER_VERSION, shape, test_fraction, files])
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def cache_dir(root: str | os.PathLike) -> pathlib.Path:
    """Where the decode cache of the image folder ``root`` lives: under the user's cache directory
    (:func:`vggnet.base.files.cache_root`), named by a hash of the folder's resolved path; never inside it."""
    return cache_root() / "folders" / _hash(str(pathlib.Path(os.path.expanduser(root)).resolve()))[:16]


def _read_cache(root: pathlib.Path, filename: str, classes: list[str], splits: dict[str, list[tuple[str, int]]],
                image_size: int, channels: int) -> dict[str, torch.Tensor] | None:
    """The cached tensors if a cache file exists and matches the plan (classes, shapes, labels), else None: a bad or
    foreign cache is ignored, and the images decoded again. Shapes are checked from the file's header, before any
    tensor is read."""
    path = cache_dir(root) / filename
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            if json.loads(f.metadata()["classes"]) != classes or not _cache_shapes_match(f, splits, image_size, channels):
                return None
            cached = {k: f.get_tensor(k) for k in ("train_images", "train_labels", "test_images", "test_labels")}
    except Exception:  # unreadable or foreign cache: decode again and overwrite it
        return None
    if all(cached[f"{split}_labels"].tolist() == [label for _, label in items] for split, items in splits.items()):
        return cached
    return None


def _cache_shapes_match(f, splits: dict[str, list[tuple[str, int]]], image_size: int, channels: int) -> bool:
    """The cache file ``f`` (open with ``safe_open``) holds what decoding would give: per split, uint8 ``(n, 3,
    image_size, image_size)`` images -- so train and test are never of different sizes -- and ``n`` int64 labels."""
    expected = {}
    for split, items in splits.items():
        expected[f"{split}_images"] = ([len(items), channels, image_size, image_size], "U8")
        expected[f"{split}_labels"] = ([len(items)], "I64")
    return all((f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) == want for k, want in expected.items())


def _cache_prefix(image_size: int, channels: int) -> str:
    """What every cache file of this size starts with, whatever decoder or files it was made from."""
    return f"folder-{image_size}px-" + ("" if channels == 3 else f"{channels}ch-")


def _cache_filename(image_size: int, channels: int, fingerprint: str) -> str:
    return f"{_cache_prefix(image_size, channels)}dec{DECODER_VERSION}-{fingerprint[:20]}.safetensors"


def _write_cache(root: pathlib.Path, filename: str, tensors: dict[str, torch.Tensor], classes: list[str],
                 image_size: int, channels: int) -> None:
    """Write atomically (temp file + os.replace) into :func:`cache_dir`; drop stale files of this size (older file
    sets or older decoders). A cache that cannot be written is a warning: the next load decodes again."""
    directory, tmp = cache_dir(root), None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".safetensors")
        os.close(fd)
        save_file(tensors, tmp, metadata={"classes": json.dumps(classes), "root": str(root)})
        os.replace(tmp, directory / filename)
    except OSError:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        warnings.warn(f"could not write a decode cache for {root} in {directory}; the next load decodes the images "
                      "again", stacklevel=3)
        return
    prefix = _cache_prefix(image_size, channels)
    for stale in directory.glob(f"{prefix}*.safetensors"):
        other_channels = re.match(r"\d+ch-", stale.name[len(prefix):]) is not None and channels == 3
        if stale.name != filename and not other_channels:  # a grey cache is not an older RGB one
            stale.unlink(missing_ok=True)


def _decode_all(root: pathlib.Path, splits: dict[str, list[tuple[str, int]]],
                image_size: int, channels: int = 3) -> dict[str, torch.Tensor]:
    """Decode every image of both splits (with a progress bar); DataError listing the ones that fail."""
    out: dict[str, torch.Tensor] = {}
    failures: list[str] = []
    total = sum(len(items) for items in splits.values())
    with tqdm(total=total, desc=f"decoding {root.name}", unit="img", disable=None, leave=False) as bar:
        for split, items in splits.items():
            pixels = np.zeros((len(items), image_size, image_size, channels), dtype=np.uint8)
            for i, (rel, _) in enumerate(items):
                try:
                    pixels[i] = decode_image(root / rel, image_size, channels)
                except ImageFileError as exc:  # collected, reported together by relative path
                    failures.append(f"{rel} ({exc.reason})")
                bar.update(1)
            out[f"{split}_images"] = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
            out[f"{split}_labels"] = torch.tensor([label for _, label in items], dtype=torch.int64)
    if failures:
        shown = "; ".join(failures[:MAX_REPORTED_FAILURES])
        more = f"; and {len(failures) - MAX_REPORTED_FAILURES} more" if len(failures) > MAX_REPORTED_FAILURES else ""
        raise DataError(f"{root}: {len(failures)} unreadable image(s): {shown}{more}; delete or replace them")
    return out


def load_folder(path: str | os.PathLike, image_size: int = 64, test_fraction: float = DEFAULT_TEST_FRACTION,
                cache: bool = True, channels: int = 3) -> tuple[ImageDataset, ImageDataset]:
    """``(train, test)`` from an image folder, images uint8 ``(N, channels, image_size, image_size)`` (``channels``:
    3 decodes RGB, 1 grey, as :func:`vggnet.data.images.decode_image` converts).

    See the module docstring for the layout, split, decoding and cache rules. ``cache=False`` always decodes and
    writes nothing.
    """
    root = pathlib.Path(os.path.expanduser(path)).resolve()
    if not root.is_dir():
        raise DataError(f"folder:{path}: no such directory; pass folder:PATH with one subfolder per class")
    if image_size < 1:
        raise ConfigError(f"image_size must be >= 1 pixel, got {image_size}")
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test_fraction must be in (0, 1), got {test_fraction}")
    classes, splits = plan_split(root, test_fraction)
    filename = _cache_filename(image_size, channels, _fingerprint(root, image_size, channels, test_fraction, splits))
    tensors = _read_cache(root, filename, classes, splits, image_size, channels) if cache else None
    if tensors is None:
        tensors = _decode_all(root, splits, image_size, channels)
        if cache:
            _write_cache(root, filename, tensors, classes, image_size, channels)
    return (ImageDataset(tensors["train_images"], tensors["train_labels"], classes, root.name),
            ImageDataset(tensors["test_images"], tensors["test_labels"], classes, root.name))
