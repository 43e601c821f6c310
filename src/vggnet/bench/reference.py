"""The reference: the plain PyTorch a user would otherwise write, sharing no vggnet code on purpose.

- :class:`ReferenceVGG`: torchvision's VGG layout as a user writes it (an ``nn.Sequential`` of features, the head).
- :func:`reference_train_step`: the ``train`` section's reference, eager fp32 NCHW with SGD (momentum) and
  cross-entropy, fed already-normalised float batches.
- :func:`reference_epoch`: the ``e2e`` section's reference, a ``Dataset`` with per-sample PIL transforms (pad,
  random crop, flip, to-tensor, normalise) over the IDX files read as torchvision does (:func:`read_idx_file`), a
  ``DataLoader`` with 2 workers, the same model in eager fp32, the same optimiser recipe.
- :func:`reference_gpu_epoch`: the ``gpu_epoch`` section's reference, the same epoch as the typical GPU pipeline
  writes it: 4 workers, pinned memory, non-blocking copies, channels_last, bf16 autocast (fp16 with a GradScaler
  where bf16 is unsupported).

The training step and the epoch take ``device``, ``precision`` and ``channels_last``; their defaults (CPU, fp32,
NCHW) are the CPU sections' references.

:func:`forward_macs` counts FLOPs for both sides with :func:`vggnet.summarize`.
"""

from __future__ import annotations

import contextlib
import gzip
import random
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from vggnet.data import find_fashion_mnist
from vggnet.evaluation.metrics import auto_batch_size
from vggnet.net.analysis import summarize
from vggnet.net.models import model_from_config

# torchvision's configurations, written out here so the reference shares no code with vggnet.
REFERENCE_CFGS = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530  # the constants tutorials paste into Normalize


class ReferenceVGG(nn.Module):
    """torchvision's VGG layout (``features``, ``avgpool``, ``classifier``) as a user would write it.

    ``head``: ``classic`` (adaptive 7x7 pool, FC-4096, FC-4096, FC-classes with dropout), ``fitted`` (the same FCs
    sized to the real feature map) or ``gap`` (global average pool, one linear layer). State-dict keys equal
    torchvision's, and so vggnet's for the same head.
    """

    def __init__(self, name: str, num_classes: int = 1000, in_channels: int = 3, width: float = 1.0,
                 head: str = "classic", input_size: int = 224, dropout: float = 0.5) -> None:
        super().__init__()
        batch_norm = name.endswith("_bn")
        cfg = REFERENCE_CFGS[name.removesuffix("_bn")]
        layers: list[nn.Module] = []
        channels = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            out = max(1, int(round(v * width)))
            layers.append(nn.Conv2d(channels, out, kernel_size=3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out))
            layers.append(nn.ReLU(inplace=True))
            channels = out
        self.features = nn.Sequential(*layers)
        fmap = input_size // 2 ** cfg.count("M")
        if head == "gap":
            self.avgpool: nn.Module = nn.AdaptiveAvgPool2d(1)
            self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(channels, num_classes))
        elif head in ("classic", "fitted"):
            self.avgpool = nn.AdaptiveAvgPool2d((7, 7)) if head == "classic" else nn.Identity()
            fc_in = channels * (49 if head == "classic" else fmap * fmap)
            self.classifier = nn.Sequential(
                nn.Linear(fc_in, 4096), nn.ReLU(True), nn.Dropout(dropout),
                nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(dropout),
                nn.Linear(4096, num_classes),
            )
        else:
            raise ValueError(f"the reference VGG has no {head!r} head (classic, fitted or gap)")
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    @classmethod
    def like(cls, model_config: dict[str, Any]) -> "ReferenceVGG":
        """The reference network with the architecture of the vggnet model whose ``config`` is ``model_config``."""
        return cls(model_config["name"], num_classes=model_config["num_classes"],
                   in_channels=model_config["in_channels"], width=model_config["width"], head=model_config["head"],
                   input_size=model_config["input_size"][0], dropout=model_config["dropout"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def forward_macs(model_config: dict[str, Any], input_size: int) -> int:
    """MACs of one image through the vggnet model described by ``model_config`` (counted on the meta device)."""
    with torch.device("meta"):
        model = model_from_config(model_config)
    return summarize(model, input_size=input_size).totals["macs"]


# ------------------------------------------------------------------------------------------- training step
def autocast_to(device: str | torch.device, precision: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``precision`` ("bf16" or "fp16") on ``device``'s type; nothing for "fp32"."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(torch.device(device).type, dtype=dtype)


def reference_train_step(model_config: dict[str, Any], inputs: list[tuple[torch.Tensor, torch.Tensor]],
                         device: str | torch.device = "cpu", precision: str = "fp32", channels_last: bool = False
                         ) -> Callable[[], float]:
    """One SGD step per call of the network ``model_config`` describes (:class:`ReferenceVGG`), cycling through
    ``inputs``: (already preprocessed float images, labels) batches on ``device``. Defaults: eager fp32 NCHW."""
    torch.manual_seed(0)
    return sgd_train_step(ReferenceVGG.like(model_config), inputs, device, precision, channels_last)


def sgd_train_step(model: nn.Module, inputs: list[tuple[torch.Tensor, torch.Tensor]],
                   device: str | torch.device = "cpu", precision: str = "fp32", channels_last: bool = False
                   ) -> Callable[[], float]:
    """One step per call of ``model`` (moved to ``device``) as a user writes it: SGD (momentum, weight decay),
    cross-entropy, under autocast to ``precision`` with a GradScaler for fp16, model and batches channels_last when
    asked. Any network runs through it: the GPU bench times vggnet's own module in this very step too."""
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    scaler = torch.amp.GradScaler(torch.device(device).type, enabled=precision == "fp16")
    state = {"i": 0}

    def step() -> float:
        x, y = inputs[state["i"] % len(inputs)]
        state["i"] += 1
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast_to(device, precision):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss.item()

    return step


# ------------------------------------------------------------------------------------------- one epoch
def read_idx_file(directory: Path, stem: str) -> np.ndarray:
    """An IDX file (or its .gz) as a numpy array, as torchvision's FashionMNIST reads it."""
    path = directory / stem
    raw = path.read_bytes() if path.exists() else gzip.decompress((directory / (stem + ".gz")).read_bytes())
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


class ReferenceFashionMNIST(torch.utils.data.Dataset):
    """A user's Dataset: one PIL image per ``__getitem__``, torchvision-style transforms in plain PIL/torch.

    Training: pad 28 -> 32, pad 2 more and take a random 32x32 crop, flip with probability 1/2, to a float tensor
    in [0, 1], normalise. Test: pad 28 -> 32, to tensor, normalise.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, train: bool) -> None:
        self.images, self.labels, self.train = images, labels, train

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image, ImageOps

        img = ImageOps.expand(Image.fromarray(self.images[i], mode="L"), border=2, fill=0)  # 32x32
        if self.train:
            padded = ImageOps.expand(img, border=2, fill=0)
            top, left = random.randint(0, 4), random.randint(0, 4)
            img = padded.crop((left, top, left + 32, top + 32))
            if random.random() < 0.5:
                img = ImageOps.mirror(img)
        x = torch.from_numpy(np.array(img, dtype=np.uint8)).unsqueeze(0).float().div(255)
        return (x - FASHION_MNIST_MEAN) / FASHION_MNIST_STD, int(self.labels[i])


def epoch_model(model_config: dict[str, Any]) -> ReferenceVGG:
    """The epoch references' network: ``model_config``'s architecture on one input channel (Fashion-MNIST)."""
    return ReferenceVGG.like({**model_config, "in_channels": 1})


def reference_epoch(data_dir: str | None, model_config: dict[str, Any], train_config: dict[str, Any],
                    subset: int | None, workers: int = 2, seed: int = 0, device: str | torch.device = "cpu",
                    precision: str = "fp32", channels_last: bool = False, pin_memory: bool = False
                    ) -> dict[str, Any]:
    """One epoch + test evaluation the way a typical PyTorch user writes it; seconds for each phase.

    Defaults: the CPU pipeline (eager fp32 NCHW). On CUDA every phase ends with a host read of a device value (the
    loss of the last step, the correct count of the last test batch), so the clocks are read after the GPU's work.
    """
    start = time.perf_counter()
    torch.manual_seed(seed)
    random.seed(seed)
    directory = find_fashion_mnist(data_dir)
    train_x = read_idx_file(directory, "train-images-idx3-ubyte")
    train_y = read_idx_file(directory, "train-labels-idx1-ubyte")
    test_x = read_idx_file(directory, "t10k-images-idx3-ubyte")
    test_y = read_idx_file(directory, "t10k-labels-idx1-ubyte")
    if subset:
        train_x, train_y = train_x[:subset], train_y[:subset]
    batch = min(train_config["batch_size"], len(train_y))
    size = model_config["input_size"][0]
    eval_batch = train_config["eval_batch_size"] or auto_batch_size(size, size)  # what vggnet's run uses
    train_loader = torch.utils.data.DataLoader(ReferenceFashionMNIST(train_x, train_y, True), batch_size=batch,
                                               shuffle=True, num_workers=workers, drop_last=True,
                                               pin_memory=pin_memory)
    test_loader = torch.utils.data.DataLoader(ReferenceFashionMNIST(test_x, test_y, False),
                                              batch_size=eval_batch, num_workers=workers, pin_memory=pin_memory)
    model = epoch_model(model_config).to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    optimizer = torch.optim.SGD(model.parameters(), lr=train_config["lr"], momentum=train_config["momentum"],
                                nesterov=train_config["nesterov"], weight_decay=train_config["weight_decay"])
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=train_config["lr"],
                                                    total_steps=max(1, len(train_loader)))
    criterion = nn.CrossEntropyLoss(label_smoothing=train_config["label_smoothing"])
    scaler = torch.amp.GradScaler(torch.device(device).type, enabled=precision == "fp16")
    setup = time.perf_counter()
    model.train()
    seen = 0
    for x, y in train_loader:
        x = x.to(device, non_blocking=True, memory_format=memory_format)
        y = y.to(device, non_blocking=True)
        with autocast_to(device, precision):
            loss = criterion(model(x), y)
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        loss.item()
        seen += len(y)
    trained = time.perf_counter()
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in test_loader:
            x = x.to(device, non_blocking=True, memory_format=memory_format)
            with autocast_to(device, precision):
                correct += int((model(x).argmax(1) == y.to(device, non_blocking=True)).sum())
            total += len(y)
    end = time.perf_counter()
    return {"seconds": end - start, "setup_seconds": setup - start, "train_seconds": trained - setup,
            "eval_seconds": end - trained, "train_images": seen, "test_images": total,
            "train_images_per_second": seen / (trained - setup), "test_acc": correct / max(total, 1)}


def reference_gpu_epoch(data_dir: str | None, model_config: dict[str, Any], train_config: dict[str, Any],
                        subset: int | None, device: str | torch.device, precision: str, workers: int = 4,
                        seed: int = 0) -> dict[str, Any]:
    """:func:`reference_epoch` as the typical GPU pipeline runs it: ``workers`` DataLoader workers with pinned
    memory (on CUDA), non-blocking copies to ``device``, model and batches channels_last, autocast to
    ``precision`` (bf16, or fp16 with a GradScaler where the GPU lacks bf16). The record names these choices."""
    choices = {"device": str(device), "precision": precision, "channels_last": True, "workers": workers,
               "pin_memory": torch.device(device).type == "cuda"}
    return {**reference_epoch(data_dir, model_config, train_config, subset, seed=seed, **choices), **choices}
