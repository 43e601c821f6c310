"""The ``data`` section (issue 21): decode + augment, in images/s per core, of vggnet's paper transform against the
torchvision-style pipeline a user writes, on the same folder of JPEGs, at the same output size.

- The folder: ``images`` photo-like JPEGs of 500x375 (smooth colour fields, shapes and film grain; about 80 KB at
  quality 90, as ImageNet photos), deterministic, in two class folders, written by the section to a temporary
  directory (:func:`write_folder`).
- Reference: ``ImageFolder`` + ``DataLoader`` with torchvision's PIL transforms, written out here with PIL, numpy
  and torch only (torchvision's wheels do not import beside the CPU torch build, and the references share no vggnet
  code: see :mod:`.reference`): the ``pil_loader`` (open, ``convert("RGB")``), ``Resize(256)`` (Pillow bilinear,
  antialiased), ``RandomCrop(224)``, ``RandomHorizontalFlip()``, ``ToTensor()`` and the PCA ``Lighting(0.1)``
  transform that reference ImageNet scripts add for AlexNet's colour shift (fb.resnet.torch's, on the float tensor).
- vggnet: each file's bytes through :class:`vggnet.data.paper.TrainTransform` with ``scale=256, crop=224`` (the same
  steps; a uint8 tensor out, the float conversion left to the batch), in the same ``DataLoader``.

Both run with 1 and 2 worker processes (one core's worth of decoding each), persistent workers, batches of
``batch``, one warm-up epoch, then ``rounds`` epochs alternating the two pipelines. images/s: images over the
median epoch's seconds; per core: that over the workers. ``ratio``: vggnet's images/s per core over the reference's,
with 1 worker each (the cleanest per-core figure; the 2-worker ratio is recorded too). ``cores_to_feed``: the cores
each pipeline needs for :data:`FEED_RATE` images/s, at its per-core rate with the most workers measured. Sizes:
160 images, batches of 20, 5 rounds (about 15 s); ``--quick``: 12 images, batches of 3, 1 round; ``--rounds``
sets the rounds.
"""

from __future__ import annotations

import io
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset

from vggnet.base.timing import Timing
from vggnet.bench.config import TARGETS, BenchConfig
from vggnet.data.paper import TrainTransform

SCALE, CROP, COLOUR = 256, 224, 0.1  # the paper's S = 256 and its 224 crops; AlexNet's colour-shift deviation
PHOTO_SIZE = (500, 375)  # ImageNet's most common size
#: images/s of a VGG-16 training step at 224x224 on one H100 in bf16 (issue 21): what the decoders must feed.
FEED_RATE = 2200.0
WORKERS = (1, 2)

# fb.resnet.torch's ImageNet PCA (datasets/imagenet.lua), written out again so the reference shares no vggnet code.
_EIGVAL = torch.tensor([0.2175, 0.0188, 0.0045])
_EIGVEC = torch.tensor([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]])


def photo_jpeg(seed: int, size: tuple[int, int] = PHOTO_SIZE, quality: int = 90) -> bytes:
    """A deterministic photo-like JPEG: a smooth random colour field, a dozen flat shapes, and grain at two scales
    (so it compresses, and decodes, like a photograph rather than like noise or a flat image)."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(size, Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(base)
    for _ in range(12):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(10, w // 2)), y0 + int(rng.integers(10, h // 2))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x0, y0, x1, y1), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    coarse = np.clip(rng.normal(128, 14, (h // 2, w // 2, 3)), 0, 255).astype(np.uint8)
    coarse = np.asarray(Image.fromarray(coarse).resize(size, Image.Resampling.BILINEAR), np.int16) - 128
    fine = rng.normal(0, 7, (h, w, 1)).astype(np.int16)
    pixels = np.clip(np.asarray(base, np.int16) + coarse + fine, 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=quality)
    return out.getvalue()


def write_folder(root: Path, images: int, classes: int = 2) -> int:
    """``images`` photo JPEGs in ``classes`` class folders under ``root`` (``class0/000000.jpg``, ...); returns the
    bytes written."""
    written = 0
    for i in range(images):
        folder = root / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        data = photo_jpeg(i)
        (folder / f"{i:06d}.jpg").write_bytes(data)
        written += len(data)
    return written


def folder_samples(root: str | os.PathLike) -> list[tuple[str, int]]:
    """``(path, label)`` of every file, classes and files sorted: torchvision's ``ImageFolder`` order."""
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    return [(os.path.join(root, name, file), label) for label, name in enumerate(classes)
            for file in sorted(os.listdir(os.path.join(root, name)))]


class ReferenceTrain:
    """torchvision's ``Compose([Resize(256), RandomCrop(224), RandomHorizontalFlip(), ToTensor(), Lighting(0.1)])``
    on a PIL image, written out: torch's random numbers, a float ``(3, 224, 224)`` tensor in [0, 1] plus the shift."""

    def __init__(self, scale: int = SCALE, crop: int = CROP, colour: float = COLOUR) -> None:
        self.scale, self.crop, self.colour = scale, crop, colour

    def __call__(self, image: Image.Image) -> torch.Tensor:
        w, h = image.size  # Resize(scale): the shorter side to scale, the longer int(scale * long / short)
        size = (self.scale, int(self.scale * h / w)) if w <= h else (int(self.scale * w / h), self.scale)
        image = image.resize(size, Image.Resampling.BILINEAR)
        top = int(torch.randint(0, size[1] - self.crop + 1, size=(1,)))  # RandomCrop
        left = int(torch.randint(0, size[0] - self.crop + 1, size=(1,)))
        image = image.crop((left, top, left + self.crop, top + self.crop))
        if torch.rand(1) < 0.5:  # RandomHorizontalFlip
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy(np.array(image, np.uint8, copy=True))  # ToTensor
        tensor = pixels.view(image.size[1], image.size[0], 3).permute(2, 0, 1).contiguous().to(torch.float32).div(255)
        alpha = torch.zeros(3).normal_(0, self.colour)  # Lighting: eigvec @ (alpha * eigval), added to every pixel
        return tensor.add((_EIGVEC * alpha.view(1, 3) * _EIGVAL.view(1, 3)).sum(1).view(3, 1, 1))


class ReferenceFolder(Dataset):
    """torchvision's ``ImageFolder`` as a user writes it: its ``pil_loader`` then the transform."""

    def __init__(self, root: str | os.PathLike, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.samples, self.transform = folder_samples(root), transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        with open(path, "rb") as f:
            image = Image.open(f).convert("RGB")
        return self.transform(image), label


class VggnetFolder(Dataset):
    """The same files' bytes through vggnet's :class:`TrainTransform`, seeded by the sample's index."""

    def __init__(self, root: str | os.PathLike, transform: TrainTransform) -> None:
        self.samples, self.transform = folder_samples(root), transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        with open(path, "rb") as f:
            data = f.read()
        return self.transform(data, path, index), label


def _epoch(loader: DataLoader) -> tuple[float, int, tuple[str, list[int]]]:
    """Seconds for one pass over ``loader``, the images it gave, and their dtype and shape."""
    start, images, first = time.perf_counter(), 0, None
    for batch, labels in loader:
        images += len(labels)
        first = first or (str(batch.dtype).removeprefix("torch."), list(batch.shape[1:]))
    return time.perf_counter() - start, images, first


def time_pipelines(datasets: dict[str, Dataset], workers: int, batch: int, rounds: int
                   ) -> dict[str, dict[str, Any]]:
    """Each dataset through a ``DataLoader`` with ``workers`` persistent workers: one warm-up epoch each (it starts
    the workers), then ``rounds`` epochs alternating them. Returns each one's epoch seconds, images and output."""
    loaders = {name: DataLoader(ds, batch_size=batch, num_workers=workers, persistent_workers=True)
               for name, ds in datasets.items()}
    try:
        out = {name: {"seconds": [], "images": [], "output": _epoch(loader)[2]} for name, loader in loaders.items()}
        for _ in range(rounds):
            for name, loader in loaders.items():
                seconds, images, _ = _epoch(loader)
                out[name]["seconds"].append(seconds)
                out[name]["images"].append(images)
    finally:
        loaders.clear()  # the last references: their worker processes are shut down and joined
    return out


def _row(name: str, workers: int, timed: dict[str, Any]) -> dict[str, Any]:
    dtype, shape = timed["output"]
    row = Timing(name, dtype, timed["images"][0], timed["seconds"]).to_dict()
    row.update(workers=workers, images_per_epoch=timed["images"], output_shape=shape,
               images_per_second_per_core=row["images_per_second"] / workers)
    return row


def bench_data(cfg: BenchConfig, results: dict[str, Any]) -> dict[str, Any]:
    images, batch = cfg.pick((160, 20), (12, 3))  # 8 batches: 4 for each of 2 workers, no uneven tail
    rounds = cfg.rounds or cfg.pick(5, 1)  # epochs vary by +-15% on a 2-vCPU VM: the median of 5
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="vggnet-bench-data-") as tmp:
        cfg.log(f"data: writing {images} JPEGs of {PHOTO_SIZE[0]}x{PHOTO_SIZE[1]}")
        written = write_folder(Path(tmp), images)
        datasets = {"reference": ReferenceFolder(tmp, ReferenceTrain()),
                    "vggnet": VggnetFolder(tmp, TrainTransform(SCALE, CROP, colour=COLOUR))}
        for workers in WORKERS:
            cfg.log(f"data: ImageFolder + DataLoader vs vggnet's TrainTransform, {workers} worker(s)")
            timed = time_pipelines(datasets, workers, batch, rounds)
            rows += [_row(name, workers, timed[name]) for name in datasets]
    per_core = {(r["name"], r["workers"]): r["images_per_second_per_core"] for r in rows}
    for r in rows:
        r["ratio"] = per_core[("vggnet", r["workers"])] / per_core[("reference", r["workers"])]
    most = max(WORKERS)
    return {"images": images, "image_size": list(PHOTO_SIZE), "mean_file_bytes": written / images, "scale": SCALE,
            "crop": CROP, "colour": COLOUR, "batch": batch, "rounds": rounds, "rows": rows,
            "ratio": per_core[("vggnet", 1)] / per_core[("reference", 1)],
            "ratio_definition": "vggnet images/s per core / reference images/s per core, 1 worker each",
            "feed_rate": FEED_RATE,
            "cores_to_feed": {name: FEED_RATE / per_core[(name, most)] for name in datasets},
            "cores_definition": f"{FEED_RATE:.0f} images/s / images/s per core with {most} workers",
            "reference_pipeline": "ImageFolder + DataLoader: pil_loader, Resize(256), RandomCrop(224), "
                                  "RandomHorizontalFlip, ToTensor, Lighting(0.1)",
            "vggnet_pipeline": "bytes + vggnet.data.paper.TrainTransform(scale=256, crop=224) in the same DataLoader",
            "target_ratio": TARGETS["data_per_core_ratio"]}
