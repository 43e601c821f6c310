"""Prepared datasets streamed from their shards: data bigger than memory (``vggnet data prepare``, issue 21).

A prepared directory (the format of :mod:`vggnet.data.shards`: webdataset tar shards written by the webdataset
engine, an index of each sample's byte offset) is read one sample at a time: :class:`StreamedSplit` is the split's
view (classes, labels, which samples), :class:`ShardReader` reads a sample's encoded bytes by its offset (a local
file with ``os.pread``, or an ``http(s)://`` URL with a range request), and :class:`StreamLoader` turns them into
uint8 batches, decoded and augmented by a per-sample transform (:mod:`vggnet.data.paper`) in worker processes.

Why offsets, not the engine's sequential reader: the global sample order must be a function of ``(seed, epoch)``
alone, whatever the number of processes, workers and nodes, and a run stopped mid-epoch must resume exactly. That
needs random access to any sample; webdataset's pipeline shuffles within a buffer, and its indexed reader (wids)
re-indexes a whole shard on every cache miss, which a global permutation makes the rule. The offsets are read from
the tar headers once, at prepare time.

Exactness: :class:`StreamLoader` shares :class:`~vggnet.data.loader.BatchLoader`'s order (a permutation of
``(seed, epoch)``, global batches, each rank its slice), and each sample's augmentation draws from its own seed,
:func:`sample_seed` of ``(seed, epoch, sample)``: the same images whichever worker or process decodes them.
Resident memory does not grow with the dataset: the index is memory-mapped, and only the batches in flight are held.
"""

from __future__ import annotations

import io
import os
import urllib.error
import urllib.request
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from vggnet.base.errors import ConfigError, DataError, VggnetError
from vggnet.data.loader import BatchLoader
from vggnet.data.shard_format import INDEX_DTYPE, MANIFEST, parse_manifest, read_manifest

#: Seconds a remote read may wait for an answer before it is a one-line DataError.
URL_TIMEOUT = 30.0
#: Open shard files kept per process (file descriptors are a limited resource).
OPEN_SHARDS = 64


def is_remote(root: str | os.PathLike) -> bool:
    return str(root).startswith(("http://", "https://"))


def _fetch(url: str, start: int | None = None, size: int | None = None) -> bytes:
    """``url``'s bytes (``size`` of them from ``start``); a one-line DataError naming it when it does not answer."""
    request = urllib.request.Request(url)
    if start is not None:
        request.add_header("Range", f"bytes={start}-{start + size - 1}")
    try:
        with urllib.request.urlopen(request, timeout=URL_TIMEOUT) as answer:
            data = answer.read()
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise DataError(f"{url} does not answer ({getattr(err, 'reason', None) or err}): check the address, or "
                        "prepare a local copy") from None
    if size is not None and len(data) != size:
        raise DataError(f"{url} gave {len(data)} bytes where {size} were asked for (no range requests?)")
    return data


class ShardReader:
    """Reads samples' bytes from the shards of one split: a local directory (``os.pread`` on files opened on first
    use, at most :data:`OPEN_SHARDS` at once, reopened after a fork) or an ``http(s)://`` base (range requests)."""

    def __init__(self, root: str, files: list[str]) -> None:
        self.root, self.files = root, files
        self._open: OrderedDict[int, int] = OrderedDict()
        self._pid = os.getpid()

    def read(self, shard: int, offset: int, size: int) -> bytes:
        if is_remote(self.root):
            return _fetch(f"{self.root.rstrip('/')}/{self.files[shard]}", offset, size)
        data = os.pread(self._fd(shard), size, offset)
        if len(data) != size:
            raise DataError(f"{Path(self.root) / self.files[shard]} is truncated: a sample at byte {offset} needs "
                            f"{size} bytes, {len(data)} are there; prepare the dataset again or restore the shard")
        return data

    def _fd(self, shard: int) -> int:
        if os.getpid() != self._pid:  # a forked worker: the parent's descriptors share its file offsets
            self._open, self._pid = OrderedDict(), os.getpid()
        fd = self._open.pop(shard, None)
        if fd is None:
            path = Path(self.root) / self.files[shard]
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as err:
                raise DataError(f"cannot read shard {path}: {err.strerror or err}") from None
            if len(self._open) >= OPEN_SHARDS:
                os.close(self._open.popitem(last=False)[1])
        self._open[shard] = fd
        return fd

    def __getstate__(self) -> dict:
        return {"root": self.root, "files": self.files}  # descriptors are per process

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["root"], state["files"])


def _manifest(root: str) -> dict:
    """The checked manifest of a local directory or of an ``http(s)://`` base."""
    if not is_remote(root):
        return read_manifest(root)
    where = f"{root.rstrip('/')}/{MANIFEST}"
    return parse_manifest(_fetch(where).decode("utf-8", "replace"), where)


def _load_index(root: str, name: str, samples: int) -> np.ndarray:
    """The split's index, memory-mapped (a remote one is read whole: 20 bytes a sample)."""
    try:
        if is_remote(root):
            index = np.load(io.BytesIO(_fetch(f"{root.rstrip('/')}/{name}")), allow_pickle=False)
        else:
            index = np.load(Path(root) / name, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DataError(f"{root}/{name} is not a readable index ({err}): prepare the dataset again") from None
    if index.dtype != INDEX_DTYPE or index.shape != (samples,):
        raise DataError(f"{root}/{name} does not match its manifest ({index.shape[0] if index.ndim else 0} rows of "
                        f"{index.dtype}, {samples} samples expected): prepare the dataset again")
    return index


@dataclass
class StreamedSplit:
    """One split of a prepared dataset, or a selection of it (``rows``: sample numbers; labels relabelled by
    ``relabel`` after :meth:`select_classes`). Holds no image: ``sample(i)`` reads one."""

    root: str
    split: str
    classes: list[str]
    reader: ShardReader
    index: np.ndarray
    rows: np.ndarray | None = None
    relabel: np.ndarray | None = None
    name: str = ""

    def __len__(self) -> int:
        return len(self.index) if self.rows is None else len(self.rows)

    def _row(self, i: int) -> int:
        return int(i) if self.rows is None else int(self.rows[i])

    @property
    def labels(self) -> torch.Tensor:
        """int64 labels of the selected samples, in order (read from the index, not the images)."""
        raw = np.asarray(self.index["label"] if self.rows is None else self.index["label"][self.rows], dtype=np.int64)
        return torch.from_numpy(raw if self.relabel is None else self.relabel[raw])

    def sample(self, i: int) -> tuple[bytes, int, str]:
        """The encoded image, the label and a name for messages of the ``i``-th selected sample."""
        row = self.index[self._row(i)]
        label = int(row["label"]) if self.relabel is None else int(self.relabel[int(row["label"])])
        data = self.reader.read(int(row["shard"]), int(row["offset"]), int(row["size"]))
        return data, label, f"{self.reader.files[int(row['shard'])]}:{self._row(i):09d}"

    def take(self, positions, name: str | None = None) -> "StreamedSplit":
        rows = np.arange(len(self.index)) if self.rows is None else self.rows
        return replace(self, rows=rows[np.asarray(positions, dtype=np.int64)], name=name or self.name)

    def subset(self, n: int) -> "StreamedSplit":
        """The first ``n`` selected samples (a prepared split's order interleaves the classes)."""
        return self.take(np.arange(min(n, len(self))))

    def select_classes(self, keep) -> "StreamedSplit":
        keep = [int(c) for c in keep]
        if not keep or len(set(keep)) != len(keep) or not all(0 <= c < len(self.classes) for c in keep):
            raise DataError(f"{self.name}: classes must be distinct indices in 0..{len(self.classes) - 1}, got {keep}")
        relabel = np.full(len(self.classes), -1, dtype=np.int64)
        relabel[keep] = np.arange(len(keep))
        labels = np.asarray(self.index["label"], dtype=np.int64)
        rows = np.flatnonzero(relabel[labels] >= 0)
        if self.rows is not None:
            rows = np.intersect1d(rows, self.rows)
        return replace(self, rows=rows, relabel=relabel, classes=[self.classes[c] for c in keep])


class StreamedImages:
    """The images of a :class:`StreamedSplit` as evaluation reads a tensor: ``len``, ``shape`` (the transform's
    output), slicing (a view: nothing decoded), and ``.to(device)``, which decodes the view's samples with
    ``transform(data, name, 0)`` (a deterministic test transform) in ``threads`` threads into one uint8 batch."""

    def __init__(self, split: StreamedSplit, transform: Callable[[bytes, str, int], torch.Tensor],
                 shape: tuple[int, int, int], threads: int = 1) -> None:
        self.split, self.transform, self.item_shape, self.threads = split, transform, tuple(shape), max(1, threads)
        self.device = torch.device("cpu")
        self.nbytes = 0  # nothing resident

    def __len__(self) -> int:
        return len(self.split)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.split), *self.item_shape)

    def __getitem__(self, key: slice) -> "StreamedImages":
        if not isinstance(key, slice):
            raise TypeError("streamed images are sliced, not indexed")
        return StreamedImages(self.split.take(np.arange(len(self.split))[key]), self.transform, self.item_shape,
                              self.threads)

    def to(self, device: str | torch.device, non_blocking: bool = False) -> torch.Tensor:
        def one(i: int) -> torch.Tensor:
            data, _, name = self.split.sample(i)
            return self.transform(data, name, 0)

        if len(self.split) == 0:
            return torch.zeros(0, *self.item_shape, dtype=torch.uint8, device=device)
        with ThreadPoolExecutor(self.threads) as pool:  # Pillow decodes with the GIL released
            images = list(pool.map(one, range(len(self.split))))
        return torch.stack(images).to(device, non_blocking=non_blocking)


@dataclass
class StreamedDataset:
    """A streamed split in :class:`~vggnet.data.ImageDataset`'s shape for evaluation: ``images`` (a
    :class:`StreamedImages`), ``labels``, ``classes``, ``name``."""

    images: StreamedImages
    labels: torch.Tensor
    classes: list[str]
    name: str

    def __len__(self) -> int:
        return len(self.labels)


def evaluation_set(split: StreamedSplit, transform: Callable[[bytes, str, int], torch.Tensor], image_size: int,
                   channels: int = 3, threads: int = 1) -> StreamedDataset:
    """``split`` as evaluation reads a dataset: its images decoded on demand by the (deterministic) ``transform``
    into ``channels`` x ``image_size`` x ``image_size``."""
    images = StreamedImages(split, transform, (channels, image_size, image_size), threads)
    return StreamedDataset(images, split.labels, list(split.classes), split.name)


def open_prepared(root: str | os.PathLike) -> tuple[StreamedSplit, StreamedSplit]:
    """``(train, test)`` of the prepared directory (or ``http(s)://`` base) ``root``, checked against its
    manifest; no image is read."""
    root = str(root) if is_remote(root) else str(Path(os.path.expanduser(str(root))))
    manifest = _manifest(root)
    splits = []
    for split in ("train", "test"):
        entry = manifest["splits"][split]
        files = [shard["file"] for shard in entry["shards"]]
        index = _load_index(root, entry["index"], int(entry["samples"]))
        if len(index) and int(index["shard"].max()) >= len(files):
            raise DataError(f"{root}/{entry['index']} names a shard its manifest does not list: prepare again")
        name = Path(root.rstrip("/")).name or root
        splits.append(StreamedSplit(root, split, list(manifest["classes"]), ShardReader(root, files), index,
                                    name=name))
    return splits[0], splits[1]


def is_prepared(spec: str) -> bool:
    """Whether the dataset spec names a prepared directory (a remote base always does)."""
    return is_remote(spec) or (Path(os.path.expanduser(spec)) / MANIFEST).is_file()


def paper_scales(scale: list[int] | None, image_size: int) -> tuple[tuple[int, int], int]:
    """The paper's scales for a crop of ``image_size``: training S as ``(SMIN, SMAX)`` (equal: fixed; default 8/7 of
    the crop, 256 for 224) and the single test scale Q (S, or the middle of the range: section 3.2)."""
    values = list(scale) if scale else [round(image_size * 8 / 7)]
    low, high = int(values[0]), int(values[-1])
    return (low, high), (low + high) // 2


def sample_seed(seed: int, epoch: int, sample: int) -> int:
    """The augmentation seed of one sample in one epoch: a function of the three alone."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, seed >> 32 & 0xFFFFFFFF, epoch, sample]).generate_state(1)[0])


class _Decode(torch.utils.data.Dataset):
    """What a worker computes: ``(sample, seed)`` -> (uint8 image, label, None), or (None, None, the one-line
    message) for a sample that cannot be read: the message crosses the process boundary as it is (DataLoader would
    wrap an exception in the worker's traceback)."""

    def __init__(self, split: StreamedSplit, transform: Callable[[bytes, str, int], torch.Tensor]) -> None:
        self.split, self.transform = split, transform

    def __getitem__(self, task: tuple[int, int]) -> tuple[torch.Tensor | None, int | None, str | None]:
        try:
            data, label, name = self.split.sample(task[0])
            return self.transform(data, name, task[1]), label, None
        except VggnetError as err:
            return None, None, str(err)


def _collate(items: list[tuple[torch.Tensor | None, int | None, str | None]]):
    errors = [message for _, _, message in items if message is not None]
    if errors:
        return None, None, errors[0]
    return (torch.stack([image for image, _, _ in items]),
            torch.tensor([label for _, label, _ in items], dtype=torch.int64), None)


class StreamLoader(BatchLoader):
    """:class:`~vggnet.data.loader.BatchLoader`'s batches (the same order, ranks and lengths) of a
    :class:`StreamedSplit`, each sample decoded and augmented by ``transform(data, name, seed)`` in ``workers``
    processes (0: in this one). ``iterate(start)`` begins at batch ``start`` without decoding the ones before."""

    def __init__(self, split: StreamedSplit, transform: Callable[[bytes, str, int], torch.Tensor], batch_size: int,
                 shuffle: bool, drop_last: bool = False, seed: int = 0, rank: int = 0, world_size: int = 1,
                 device: str | torch.device = "cpu", workers: int = 0) -> None:
        super().__init__(split, batch_size, shuffle, drop_last, seed, rank, world_size, device)
        if workers < 0:
            raise ConfigError(f"workers must be >= 0, got {workers}")
        self.transform, self.workers = transform, workers

    def iterate(self, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        mine = self.indices().tolist()
        tasks = [[(i, sample_seed(self.seed, self.epoch, i)) for i in mine[b * self.batch_size:(b + 1) * self.batch_size]]
                 for b in range(start, len(self))]
        if not tasks:
            return
        pin = self.device.type == "cuda"
        batches = torch.utils.data.DataLoader(_Decode(self.ds, self.transform), batch_sampler=tasks,
                                              num_workers=min(self.workers, len(tasks)), collate_fn=_collate,
                                              pin_memory=pin)
        for x, y, error in batches:
            if error is not None:
                raise DataError(error)
            yield x.to(self.device, non_blocking=pin), y.to(self.device, non_blocking=pin)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.iterate(0)
