"""``vggnet bench``: vggnet against what a user would otherwise write, in one process, on one machine.

Sections (``--only`` picks some):

- ``peak``: FLOP/s of one large 3x3 convolution (channels_last, forward) in fp32 and in bf16: the practical limit
  of this machine, the denominator of every "share of peak".
- ``train``: one training step of VGG-11-BN (GAP head, i.e. one linear layer after global average pooling, in both)
  at 32x32, batch 128, on real Fashion-MNIST batches. Reference: a torchvision-style ``nn.Sequential`` in eager fp32
  NCHW with SGD (momentum) and cross-entropy, fed already-normalised float batches. vggnet: the real
  ``Trainer.train_step`` (uint8 batch -> preprocess -> augment -> channels_last -> bf16 autocast -> SGD).
- ``infer``: VGG-16 (classic head) at 224x224, batch 8. Reference: the same network in eager fp32 NCHW under
  ``torch.no_grad``. vggnet: :func:`vggnet.inference.optimize_for_inference` with its defaults, same weights; the
  relative error of its logits against the reference is reported with the tolerance.
- ``e2e``: one Fashion-MNIST epoch plus evaluation on the test set, from the files on disk to the test accuracy.
  Reference: a ``Dataset`` with per-sample PIL transforms (pad, random crop, flip, to-tensor, normalise), a
  ``DataLoader`` with 2 workers, the same model (``vggnet train``'s default architecture) in eager fp32, the same
  optimiser recipe. vggnet: ``vggnet train --epochs 1`` (a real :class:`vggnet.training.Trainer` run, writing its
  run directory), with the ``train_images_per_second`` it records.
- ``memory``: the analysis' training-memory estimate against the measured peak of a fp32 eager training step, for
  3 architectures x 2 batch sizes, each in a fresh subprocess: tensor memory from ``torch.profiler``'s memory
  timeline, and the process's peak RSS growth.
- ``ablation``: what each optimisation contributes (training step and inference, one change at a time).
- ``profile``: ``torch.profiler`` tables of vggnet's training step and inference (where the time goes).

Counting: FLOPs = 2 x MACs (one multiply-add = 2 FLOPs), MACs from :func:`vggnet.summarize` (conv and linear
layers, padding taps included); a training step counts 3 x the forward FLOPs. Times are medians over rounds that
alternate reference and vggnet, after warm-up. Other processes' CPU use during each section is recorded
(``other_load_cores``): with 2 cores, any load there makes OpenMP timings unreliable.

Compute (:func:`run`) returns plain records (dicts); :func:`render` formats them.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SECTIONS = ("peak", "train", "infer", "e2e", "memory", "ablation", "profile")
DEFAULT_SECTIONS = SECTIONS
TARGETS = {"train_ratio": 2.5, "train_peak_share": 0.70, "infer_ratio": 3.0, "e2e_ratio": 3.0,
           "memory_error": 0.15}
SCHEMA = 1


# ------------------------------------------------------------------------------------------------- settings
@dataclass
class BenchConfig:
    """What to run and how big. ``quick`` shrinks every section to a smoke test of a few seconds."""

    sections: tuple[str, ...] = DEFAULT_SECTIONS
    quick: bool = False
    data_dir: str | None = None
    threads: int | None = None  # intra-op threads (default: every available core)
    rounds: int | None = None  # timed rounds per measurement (default 10; quick 2)
    e2e_subset: int | None = None  # training images in the e2e epoch (default all; quick 1024)
    wait_idle: float = 0.0  # seconds to wait for other processes to go quiet before starting
    progress: Callable[[str], None] | None = None

    # Sizes of each section: (full, quick).
    def pick(self, full: Any, quick: Any) -> Any:
        return quick if self.quick else full

    @property
    def n_rounds(self) -> int:
        return self.rounds or self.pick(10, 2)

    def log(self, message: str) -> None:
        if self.progress is not None:
            self.progress(message)


# ---------------------------------------------------------------------------------------------- conditions
class CpuMonitor:
    """CPU time that *other* processes used during a block, in cores (busy time of /proc/stat minus our own).

    Our own time includes reaped children (DataLoader workers, the memory subprocesses).
    """

    def __enter__(self) -> "CpuMonitor":
        self.start = (_proc_stat_busy(), _own_cpu(), time.perf_counter())
        self.other_cores: float | None = None
        return self

    def __exit__(self, *exc: Any) -> None:
        busy0, own0, t0 = self.start
        busy1, own1, t1 = _proc_stat_busy(), _own_cpu(), time.perf_counter()
        if busy0 is None or busy1 is None or t1 <= t0:
            return
        self.other_cores = max(0.0, ((busy1 - busy0) - (own1 - own0)) / (t1 - t0))


def _proc_stat_busy() -> float | None:
    """Seconds of non-idle CPU time of the whole machine since boot (None where /proc/stat is missing)."""
    try:
        fields = open("/proc/stat", encoding="ascii").readline().split()[1:]
    except OSError:
        return None
    ticks = [int(v) for v in fields[:8]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = ticks
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu() -> float:
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def other_load(seconds: float = 1.0) -> float | None:
    """Average cores used by other processes over the next ``seconds``."""
    with CpuMonitor() as mon:
        time.sleep(seconds)
    return mon.other_cores


def wait_for_quiet(max_seconds: float, threshold: float = 0.15, log: Callable[[str], None] = lambda m: None) -> float:
    """Wait (up to ``max_seconds``) until other processes use less than ``threshold`` cores; returns the last load."""
    deadline = time.monotonic() + max_seconds
    load = other_load(1.0) or 0.0
    while load > threshold and time.monotonic() < deadline:
        log(f"other processes use {load:.2f} cores; waiting for a quiet machine")
        time.sleep(4.0)
        load = other_load(1.0) or 0.0
    return load


def machine_info(threads: int) -> dict[str, Any]:
    from . import __version__
    from .hardware import available_cores, cpu_has_bf16

    model = platform.processor() or platform.machine()
    try:
        cpuinfo = open("/proc/cpuinfo", encoding="ascii", errors="ignore").read()
    except OSError:
        cpuinfo = ""
    name = re.search(r"^model name\s*:\s*(.*?)\s*$", cpuinfo, re.M)
    model = name.group(1) if name else model
    isa = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if re.search(rf"\b{f}\b", cpuinfo)]
    return {"cpu": model, "cores": available_cores(), "threads": threads, "isa": isa, "bf16_native": cpu_has_bf16(),
            "torch": torch.__version__, "vggnet": __version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


# --------------------------------------------------------------------------------------------------- timing
def interleaved(fns: dict[str, Callable[[], Any]], rounds: int, warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per call of each function: warm-up calls, then ``rounds`` rounds that call each function once."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


@dataclass
class Timing:
    """One timed thing: ``images`` per call, seconds of every timed call, FLOPs per call, same-precision peak."""

    name: str
    precision: str
    images: int
    seconds: list[float]
    flops: float | None = None
    peak: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def to_dict(self) -> dict[str, Any]:
        median = self.median
        flop_s = self.flops / median if self.flops else None
        return {
            "name": self.name,
            "precision": self.precision,
            "images_per_call": self.images,
            "seconds_median": median,
            "seconds_min": min(self.seconds),
            "seconds_max": max(self.seconds),
            "rounds": len(self.seconds),
            "images_per_second": self.images / median,
            "flop_per_second": flop_s,
            "peak_share": flop_s / self.peak if flop_s and self.peak else None,
            **self.extra,
        }


def comparison(reference: Timing, fast: Timing, **extra: Any) -> dict[str, Any]:
    ref, vgg = reference.to_dict(), fast.to_dict()
    return {"reference": ref, "vggnet": vgg, "ratio": vgg["images_per_second"] / ref["images_per_second"], **extra}


# ------------------------------------------------------------------------------------- the reference models
# torchvision's configurations, written out here so the reference shares no code with vggnet.
REFERENCE_CFGS = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def forward_macs(model_config: dict[str, Any], input_size: int) -> int:
    """MACs of one image through the vggnet model described by ``model_config`` (counted on the meta device)."""
    from .analysis import summarize
    from .models import model_from_config

    with torch.device("meta"):
        model = model_from_config(model_config)
    return summarize(model, input_size=input_size).totals["macs"]


# ------------------------------------------------------------------------------------------------------ peak
def bench_peak(cfg: BenchConfig) -> dict[str, Any]:
    """Best FLOP/s of a large 3x3 convolution (N, C, H, W) -> (N, C, H, W), channels_last, no autograd."""
    n, c, hw = cfg.pick((16, 256, 56), (4, 64, 28))
    flops = 2 * n * c * c * 9 * hw * hw
    out: dict[str, Any] = {"shape": [n, c, hw, hw], "kernel": 3, "flops_per_call": flops}
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        x = torch.randn(n, c, hw, hw, dtype=dtype).contiguous(memory_format=torch.channels_last)
        w = (torch.randn(c, c, 3, 3) * 0.05).to(dtype).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            times = interleaved({precision: lambda: F.conv2d(x, w, padding=1)}, rounds=cfg.pick(8, 2), warmup=2)
        best = min(times[precision])
        out[precision] = {"flop_per_second": flops / best, "seconds_min": best,
                          "seconds_median": statistics.median(times[precision])}
    return out


# ----------------------------------------------------------------------------------------------------- train
@contextlib.contextmanager
def _quiet_stdout():
    """The Trainer prints epoch lines; keep them out of ``--json`` output."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def make_trainer(cfg: BenchConfig, run_dir: Path, **overrides: Any):
    """A real :class:`vggnet.training.Trainer` on Fashion-MNIST (the defaults, then ``overrides``)."""
    from .training import Trainer, resolve_config

    options = {"epochs": 1, "progress": False, "out": str(run_dir), "data_dir": cfg.data_dir,
               "threads": cfg.threads, **overrides}
    config = resolve_config(None, **options)
    with _quiet_stdout():
        return Trainer(config, run_dir)


def _train_setup(cfg: BenchConfig, run_dir: Path, **overrides: Any):
    """Trainer for the training-step benchmark and a few real batches from its loader."""
    batch = cfg.pick(128, 16)
    trainer = make_trainer(cfg, run_dir, width=1.0, batch_size=batch, head="gap", dropout=0.0, **overrides)
    return trainer, _first_batches(trainer)


def _first_batches(trainer, n: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Put ``trainer`` in training mode at epoch 0 and take the first ``n`` (images, labels) batches of its loader."""
    trainer.net.train()
    trainer.start_epoch(0)
    return [batch for _, batch in zip(range(n), trainer.loader)]


def _vggnet_step(trainer, batches) -> Callable[[], float]:
    state = {"i": 0}

    def step() -> float:
        images, labels = batches[state["i"] % len(batches)]
        state["i"] += 1
        loss, _ = trainer.train_step(images, labels)
        return loss.item()  # train_epoch reads the loss every step too

    return step


def _reference_train_step(trainer, batches) -> Callable[[], float]:
    """The same architecture as ``trainer.model`` in eager fp32 NCHW, on the same batches, preprocessed once."""
    config = trainer.model.config
    torch.manual_seed(0)
    model = ReferenceVGG(config["name"], num_classes=config["num_classes"], in_channels=config["in_channels"],
                         width=config["width"], head=config["head"], input_size=config["input_size"][0],
                         dropout=config["dropout"])
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    inputs = [(trainer.preprocess(images).contiguous(), labels) for images, labels in batches]
    state = {"i": 0}

    def step() -> float:
        x, y = inputs[state["i"] % len(inputs)]
        state["i"] += 1
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def bench_train(cfg: BenchConfig, results: dict[str, Any]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="vggnet-bench-") as tmp:
        trainer, batches = _train_setup(cfg, Path(tmp) / "run")
        batch = trainer.loader.batch_size
        config = trainer.model.config
        flops = 3 * 2 * forward_macs(config, config["input_size"][0]) * batch
        ref_step = _reference_train_step(trainer, batches)
        times = interleaved({"reference": ref_step, "vggnet": _vggnet_step(trainer, batches)}, cfg.n_rounds,
                            warmup=cfg.pick(3, 1))
        reference = Timing("reference: eager fp32 NCHW nn.Sequential", "fp32", batch, times["reference"], flops)
        fast = Timing(f"vggnet: Trainer.train_step ({trainer.precision}, "
                      f"{'channels_last' if trainer.config.channels_last else 'NCHW'})", trainer.precision, batch,
                      times["vggnet"], flops)
        return comparison(reference, fast, model=config["name"], head=config["head"], width=config["width"],
                          input_size=config["input_size"], in_channels=config["in_channels"], batch=batch,
                          flops_per_step=flops, flop_convention="3 x forward; 2 FLOPs per MAC",
                          target_ratio=TARGETS["train_ratio"], target_peak_share=TARGETS["train_peak_share"])


# ----------------------------------------------------------------------------------------------------- infer
def _infer_models(name: str, input_size: int, head: str = "classic", seed: int = 0):
    """The reference network and the same weights in a vggnet model (torchvision state-dict layout)."""
    from .models import create_model

    torch.manual_seed(seed)
    reference = ReferenceVGG(name, head=head, input_size=input_size).eval()
    model = create_model(name, head=head, input_size=input_size)
    model.load_state_dict(reference.state_dict())
    if name.endswith("_bn"):  # give BN non-trivial running statistics, so folding has something to fold
        with torch.no_grad():
            for ref_bn, bn in zip((m for m in reference.modules() if isinstance(m, nn.BatchNorm2d)),
                                  (m for m in model.modules() if isinstance(m, nn.BatchNorm2d))):
                for module in (ref_bn, bn):
                    gen = torch.Generator().manual_seed(bn.num_features)
                    module.running_mean.copy_(torch.randn(bn.num_features, generator=gen) * 0.1)
                    module.running_var.copy_(torch.rand(bn.num_features, generator=gen) + 0.5)
                    module.weight.copy_(torch.rand(bn.num_features, generator=gen) + 0.5)
    return reference, model.eval()


def _logit_error(reference_out: torch.Tensor, fast_out: torch.Tensor) -> dict[str, float]:
    diff = (fast_out.float() - reference_out.float()).norm() / reference_out.float().norm()
    agree = (fast_out.argmax(1) == reference_out.argmax(1)).float().mean()
    return {"rel_l2_error": float(diff), "top1_agreement": float(agree)}


def bench_infer(cfg: BenchConfig, results: dict[str, Any]) -> dict[str, Any]:
    from .inference import BF16_RTOL, optimize_for_inference

    name, size, batch, head = cfg.pick(("vgg16", 224, 8, "classic"), ("vgg11", 32, 2, "gap"))
    reference, model = _infer_models(name, size, head)
    fast = optimize_for_inference(model)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref_out = reference(x)
    with torch.inference_mode():
        fast_out = fast(x)
    flops = 2 * forward_macs(model.config, size) * batch

    def ref_fn() -> None:
        with torch.no_grad():
            reference(x)

    def fast_fn() -> None:
        with torch.inference_mode():
            fast(x)

    times = interleaved({"reference": ref_fn, "vggnet": fast_fn}, rounds=cfg.pick(6, 2), warmup=cfg.pick(2, 1))
    ref_t = Timing("reference: eager fp32 NCHW, torch.no_grad", "fp32", batch, times["reference"], flops)
    fast_t = Timing(f"vggnet: optimize_for_inference ({', '.join(fast.steps)})", fast.precision, batch,
                    times["vggnet"], flops)
    return comparison(ref_t, fast_t, model=name, head=head, input_size=size, batch=batch, flops_per_batch=flops,
                      steps=fast.steps, tolerance={"rel_l2_error_max": BF16_RTOL if fast.precision == "bf16" else 1e-5},
                      **_logit_error(ref_out, fast_out), target_ratio=TARGETS["infer_ratio"])


# ------------------------------------------------------------------------------------------------------- e2e
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530  # the constants tutorials paste into Normalize


def _read_idx_file(directory: Path, stem: str) -> np.ndarray:
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


def reference_epoch(data_dir: str | None, model_config: dict[str, Any], train_config: dict[str, Any],
                    subset: int | None, workers: int = 2, seed: int = 0) -> dict[str, Any]:
    """One epoch + test evaluation the way a typical PyTorch user writes it; seconds for each phase."""
    from .data import find_fashion_mnist
    from .evaluation import auto_batch_size

    start = time.perf_counter()
    torch.manual_seed(seed)
    random.seed(seed)
    directory = find_fashion_mnist(data_dir)
    train_x = _read_idx_file(directory, "train-images-idx3-ubyte")
    train_y = _read_idx_file(directory, "train-labels-idx1-ubyte")
    test_x = _read_idx_file(directory, "t10k-images-idx3-ubyte")
    test_y = _read_idx_file(directory, "t10k-labels-idx1-ubyte")
    if subset:
        train_x, train_y = train_x[:subset], train_y[:subset]
    batch = min(train_config["batch_size"], len(train_y))
    size = model_config["input_size"][0]
    eval_batch = train_config["eval_batch_size"] or auto_batch_size(size, size)  # what vggnet's run uses
    train_loader = torch.utils.data.DataLoader(ReferenceFashionMNIST(train_x, train_y, True), batch_size=batch,
                                               shuffle=True, num_workers=workers, drop_last=True)
    test_loader = torch.utils.data.DataLoader(ReferenceFashionMNIST(test_x, test_y, False),
                                              batch_size=eval_batch, num_workers=workers)
    model = ReferenceVGG(model_config["name"], num_classes=model_config["num_classes"], in_channels=1,
                         width=model_config["width"], head=model_config["head"],
                         input_size=size, dropout=model_config["dropout"])
    optimizer = torch.optim.SGD(model.parameters(), lr=train_config["lr"], momentum=train_config["momentum"],
                                nesterov=train_config["nesterov"], weight_decay=train_config["weight_decay"])
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=train_config["lr"],
                                                    total_steps=max(1, len(train_loader)))
    criterion = nn.CrossEntropyLoss(label_smoothing=train_config["label_smoothing"])
    setup = time.perf_counter()
    model.train()
    seen = 0
    for x, y in train_loader:
        loss = criterion(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss.item()
        seen += len(y)
    trained = time.perf_counter()
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in test_loader:
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    end = time.perf_counter()
    return {"seconds": end - start, "setup_seconds": setup - start, "train_seconds": trained - setup,
            "eval_seconds": end - trained, "train_images": seen, "test_images": total,
            "train_images_per_second": seen / (trained - setup), "test_acc": correct / max(total, 1)}


def vggnet_epoch(cfg: BenchConfig, subset: int | None, **overrides: Any) -> dict[str, Any]:
    """``vggnet train --epochs 1`` in this process: wall time from the files to the test accuracy."""
    with tempfile.TemporaryDirectory(prefix="vggnet-bench-") as tmp:
        start = time.perf_counter()
        trainer = make_trainer(cfg, Path(tmp) / "run", subset=subset, **overrides)
        setup = time.perf_counter()
        with _quiet_stdout():
            result = trainer.run()
        end = time.perf_counter()
    record = result["history"][-1]
    return {"seconds": end - start, "setup_seconds": setup - start, "train_seconds": record["epoch_seconds"],
            "eval_and_files_seconds": end - setup - record["epoch_seconds"],
            "train_images": int(round(record["train_images_per_second"] * record["epoch_seconds"])),
            "test_images": len(trainer.test_set), "train_images_per_second": record["train_images_per_second"],
            "recorded_train_images_per_second": record["train_images_per_second"], "test_acc": record["test_acc"],
            "precision": trainer.precision, "channels_last": trainer.config.channels_last,
            "model": trainer.model.config, "train_config": trainer.config.to_dict()}


def bench_e2e(cfg: BenchConfig, results: dict[str, Any]) -> dict[str, Any]:
    subset = cfg.e2e_subset if cfg.e2e_subset is not None else cfg.pick(None, 1024)
    batch = cfg.pick(None, 128)
    overrides = {"batch_size": batch} if batch else {}
    cfg.log("e2e: vggnet train --epochs 1")
    fast = vggnet_epoch(cfg, subset, **overrides)
    cfg.log("e2e: reference pipeline (Dataset + per-sample PIL transforms + DataLoader(num_workers=2), eager fp32)")
    reference = reference_epoch(cfg.data_dir, fast["model"], fast["train_config"], subset)
    model = fast.pop("model")
    train_config = fast.pop("train_config")
    for run in (reference, fast):
        run["images_per_second"] = (run["train_images"] + run["test_images"]) / run["seconds"]
    return {"reference": reference, "vggnet": fast, "ratio": reference["seconds"] / fast["seconds"],
            "train_phase_ratio": fast["train_images_per_second"] / reference["train_images_per_second"],
            "model": {k: model[k] for k in ("name", "width", "head", "dropout", "in_channels", "input_size")},
            "batch_size": train_config["batch_size"], "subset": subset, "workers": 2,
            "ratio_definition": "reference wall seconds / vggnet wall seconds, data files to test accuracy",
            "target_ratio": TARGETS["e2e_ratio"]}


# ---------------------------------------------------------------------------------------------------- memory
MEMORY_CASES = (("vgg11_bn", 32, "gap"), ("vgg16_bn", 64, "fitted"), ("vgg19", 32, "classic"))
MEMORY_BATCHES = (32, 128)


def _status_bytes(key: str) -> int:
    text = open("/proc/self/status", encoding="ascii").read()
    return int(re.search(rf"^{key}:\s+(\d+) kB", text, re.M).group(1)) * 1024


def memory_child(name: str, size: int, head: str, batch: int, threads: int) -> dict[str, Any]:
    """Measure one fp32 eager NCHW SGD training step; runs in a fresh process (see :func:`bench_memory`).

    - ``tensor_peak_bytes``: the peak of live tensor memory over one step (weights, gradients, momentum, input,
      activations, temporaries), from ``torch.profiler``'s memory timeline.
    - ``rss_peak_bytes``: the peak RSS growth over two steps, against the RSS after a warm-up step of the same
      shapes was run and freed (so library code pages and oneDNN's caches are not counted).
    """
    import ctypes
    import gc

    from .models import create_model

    torch.set_num_threads(threads)

    def build():
        torch.manual_seed(0)
        model = create_model(name, num_classes=10, input_size=size, head=head)
        x = torch.randn(batch, 3, size, size)
        y = torch.randint(0, 10, (batch,))
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step() -> None:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return model, opt, step

    model, opt, step = build()
    step()  # warm-up: page in kernels, build oneDNN primitives
    del model, opt, step
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    base = _status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")  # reset VmHWM to the current RSS
    model, opt, step = build()
    step()
    step()
    rss_peak = _status_bytes("VmHWM") - base

    tensor_peak = None
    try:
        from torch.profiler import profile
        from torch.profiler._memory_profiler import MemoryProfileTimeline

        with profile(profile_memory=True, record_shapes=True, with_stack=True) as prof:
            step()
        _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline("cpu")
        tensor_peak = int(max(sum(s) for s in sizes))
    except Exception as err:  # noqa: BLE001 - a private API; report RSS only when it changes
        print(f"tensor timeline unavailable: {err}", file=sys.stderr)
    return {"rss_peak_bytes": rss_peak, "tensor_peak_bytes": tensor_peak}


def bench_memory(cfg: BenchConfig, results: dict[str, Any]) -> dict[str, Any]:
    from .analysis import summarize
    from .models import create_model

    cases = cfg.pick(MEMORY_CASES, MEMORY_CASES[:1])
    batches = cfg.pick(MEMORY_BATCHES, (8,))
    threads = results["conditions"]["threads"]  # what run() set
    rows = []
    for name, size, head in cases:
        with torch.device("meta"):
            summary = summarize(create_model(name, num_classes=10, input_size=size, head=head))
        for batch in batches:
            cfg.log(f"memory: {name} {head} head, {size}x{size}, batch {batch}")
            estimate = summary.training_memory(batch, "sgd")
            args = json.dumps([name, size, head, batch, threads])
            proc = subprocess.run([sys.executable, "-m", "vggnet.bench", "--memory-child", args],
                                  capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise RuntimeError(f"memory measurement for {name} batch {batch} failed: {proc.stderr.strip()[-500:]}")
            measured = json.loads(proc.stdout.strip().splitlines()[-1])
            row = {"model": name, "head": head, "input_size": size, "batch": batch,
                   "estimate_bytes": estimate.total, "estimate": estimate.to_dict(), **measured}
            for key in ("tensor_peak_bytes", "rss_peak_bytes"):
                if measured.get(key):
                    row[key.replace("_peak_bytes", "_error")] = estimate.total / measured[key] - 1
            rows.append(row)
    return {"rows": rows, "precision": "fp32", "layout": "NCHW", "optimizer": "sgd (momentum)",
            "error_definition": "estimate / measured - 1", "target_abs_error": TARGETS["memory_error"]}


# -------------------------------------------------------------------------------------------------- ablation
def bench_ablation(cfg: BenchConfig, results: dict[str, Any]) -> dict[str, Any]:
    """One optimisation at a time, each row timed against the same reference in the same rounds."""
    from .speedups import SmallMapConv2d
    from .inference import optimize_for_inference

    out: dict[str, Any] = {}
    # Training step: the Trainer with fp32 NCHW, + channels_last, + bf16 autocast, + small-map GEMM convs.
    with tempfile.TemporaryDirectory(prefix="vggnet-bench-") as tmp:
        variants = [("vggnet fp32, NCHW", dict(precision="fp32", channels_last=False), True),
                    ("+ channels_last", dict(precision="fp32"), True),
                    ("+ bf16 autocast", {}, False),
                    ("+ small-map GEMM convs (vggnet default)", {}, True)]
        setups = [(label, small_maps, *_train_setup(cfg, Path(tmp) / f"run{i}", **overrides))
                  for i, (label, overrides, small_maps) in enumerate(variants)]
        first, batches = setups[0][2:]
        steps: dict[str, Callable[[], Any]] = {"reference: eager fp32 NCHW": _reference_train_step(first, batches)}
        precisions = {"reference: eager fp32 NCHW": "fp32"}
        batch = first.loader.batch_size
        flops = 3 * 2 * forward_macs(first.model.config, 32) * batch
        for label, small_maps, trainer, batches in setups:
            if not small_maps:
                for m in trainer.model.modules():
                    if isinstance(m, SmallMapConv2d):
                        m.max_pixels = 0
            steps[label] = _vggnet_step(trainer, batches)
            precisions[label] = trainer.precision
        times = interleaved(steps, rounds=cfg.pick(5, 1), warmup=cfg.pick(2, 1))
        ref_ips = batch / statistics.median(times["reference: eager fp32 NCHW"])
        out["train"] = [dict(Timing(k, precisions[k], batch, v, flops).to_dict(),
                             ratio=batch / statistics.median(v) / ref_ips) for k, v in times.items()]
    # Inference: VGG-16-BN, so that folding BN has something to do.
    name, size, batch, head = cfg.pick(("vgg16_bn", 224, 8, "classic"), ("vgg11_bn", 32, 2, "gap"))
    reference, model = _infer_models(name, size, head)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    flops = 2 * forward_macs(model.config, size) * batch
    with torch.no_grad():
        ref_out = reference(x)
    rows = [("reference: eager fp32 NCHW", reference, "fp32"),
            ("fold BN (fp32, NCHW)", optimize_for_inference(model, "fp32", channels_last=False, fuse_relu=False),
             "fp32"),
            ("+ channels_last (fp32)", optimize_for_inference(model, "fp32", fuse_relu=False), "fp32"),
            ("+ bf16 weights", optimize_for_inference(model, "bf16", fuse_relu=False), "bf16"),
            ("+ conv+ReLU fused (vggnet default)", optimize_for_inference(model, "bf16"), "bf16")]
    compiled = None
    if not cfg.quick:
        compiled = optimize_for_inference(model, "bf16", compile=True)
        start = time.perf_counter()
        with torch.inference_mode():
            compiled(x)
        compile_seconds = time.perf_counter() - start
        rows.append(("+ torch.compile", compiled, "bf16"))
    fns, errors = {}, {}
    for label, module, _ in rows:
        with torch.inference_mode():
            errors[label] = _logit_error(ref_out, module(x))

        def call(module=module) -> None:
            with torch.inference_mode():
                module(x)

        fns[label] = call
    times = interleaved(fns, rounds=cfg.pick(4, 1), warmup=1)
    ref_ips = batch / statistics.median(times[rows[0][0]])
    out["infer"] = [dict(Timing(label, prec, batch, times[label], flops).to_dict(),
                         ratio=batch / statistics.median(times[label]) / ref_ips, **errors[label])
                    for label, _, prec in rows]
    out["infer_model"] = {"model": name, "input_size": size, "batch": batch}
    if compiled is not None:
        out["infer_compile_seconds"] = compile_seconds
    return out


# --------------------------------------------------------------------------------------------------- profile
def profile_table(fn: Callable[[], Any], steps: int = 3, rows: int = 15) -> list[dict[str, Any]]:
    """The ``rows`` most expensive ops (self CPU time) over ``steps`` calls of ``fn``, per call."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return [{"op": e.key, "self_ms_per_call": e.self_cpu_time_total / 1000 / steps,
             "share": e.self_cpu_time_total / total, "calls_per_call": e.count / steps} for e in events[:rows]]


def small_map_sweep(cfg: BenchConfig) -> list[dict[str, Any]]:
    """Forward + backward of each 3x3 conv of VGG-11 at 32x32 (full and quarter width), bf16 channels_last:
    oneDNN against the im2col + GEMM path of :mod:`vggnet.speedups` (the evidence for its dispatch rule)."""
    from .speedups import _GemmConv3x3

    batch = cfg.pick(128, 8)
    shapes = [(64, 128, 16), (128, 256, 8), (256, 256, 8), (256, 512, 4), (512, 512, 4), (512, 512, 2),
              (32, 64, 8), (64, 128, 4), (128, 128, 4), (128, 128, 2)]
    rows = []
    for cin, cout, size in shapes if not cfg.quick else shapes[4:6]:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(batch, cin, size, size, generator=gen).bfloat16()
        x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
        w = (torch.randn(cout, cin, 3, 3, generator=gen) * 0.05).bfloat16()
        w = w.contiguous(memory_format=torch.channels_last).requires_grad_()
        b = torch.zeros(cout, dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn(batch, cout, size, size, generator=gen).bfloat16().contiguous(memory_format=torch.channels_last)

        def onednn() -> None:
            F.conv2d(x, w, b, padding=1).backward(g)

        def gemm() -> None:
            _GemmConv3x3.apply(x, w, b).backward(g)

        times = interleaved({"onednn": onednn, "gemm": gemm}, rounds=cfg.pick(5, 1), warmup=1)
        flops = 3 * 2 * batch * cout * cin * 9 * size * size
        onednn_s, gemm_s = statistics.median(times["onednn"]), statistics.median(times["gemm"])
        rows.append({"in_channels": cin, "out_channels": cout, "size": size, "batch": batch,
                     "onednn_ms": 1e3 * onednn_s, "gemm_ms": 1e3 * gemm_s, "onednn_flop_per_second": flops / onednn_s,
                     "gemm_flop_per_second": flops / gemm_s, "gemm_speedup": onednn_s / gemm_s})
    return rows


def bench_profile(cfg: BenchConfig, results: dict[str, Any]) -> dict[str, Any]:
    from .inference import optimize_for_inference

    out: dict[str, Any] = {"small_map_sweep": small_map_sweep(cfg)}
    with tempfile.TemporaryDirectory(prefix="vggnet-bench-") as tmp:
        trainer, batches = _train_setup(cfg, Path(tmp) / "run")
        out["train"] = profile_table(_vggnet_step(trainer, batches))
        ref_step = _reference_train_step(trainer, batches)
        out["train_reference"] = profile_table(ref_step)
        # The e2e model: `vggnet train`'s defaults (quarter width, batch 256).
        trainer = make_trainer(cfg, Path(tmp) / "default", batch_size=cfg.pick(None, 16))
        out["train_default_model"] = profile_table(_vggnet_step(trainer, _first_batches(trainer)))
    name, size, batch, head = cfg.pick(("vgg16", 224, 8, "classic"), ("vgg11", 32, 2, "gap"))
    _, model = _infer_models(name, size, head)
    fast = optimize_for_inference(model)
    x = torch.randn(batch, 3, size, size)

    def infer() -> None:
        with torch.inference_mode():
            fast(x)

    out["infer"] = profile_table(infer, steps=2)
    return out


# ------------------------------------------------------------------------------------------------------ run
RUNNERS: dict[str, Callable[[BenchConfig, dict[str, Any]], dict[str, Any]]] = {
    "peak": lambda cfg, results: bench_peak(cfg), "train": bench_train, "infer": bench_infer, "e2e": bench_e2e, "memory": bench_memory,
    "ablation": bench_ablation, "profile": bench_profile,
}


def run(cfg: BenchConfig) -> dict[str, Any]:
    """Run the chosen sections; returns one JSON-able dict (see docs/BENCHMARKS.md for the keys)."""
    from .hardware import set_threads

    unknown = [s for s in cfg.sections if s not in SECTIONS]
    if unknown:
        from .errors import ConfigError

        raise ConfigError(f"unknown bench section(s) {', '.join(unknown)}: choose from {', '.join(SECTIONS)}")
    threads = set_threads(cfg.threads)
    load_before = wait_for_quiet(cfg.wait_idle, log=cfg.log) if cfg.wait_idle else other_load(cfg.pick(1.0, 0.2))
    results: dict[str, Any] = {"schema": SCHEMA, "quick": cfg.quick, "targets": TARGETS,
                               "conditions": {**machine_info(threads), "other_load_cores_before": load_before}}
    loads: dict[str, float | None] = {}
    sections = list(cfg.sections)
    if "peak" not in sections and any(s in sections for s in ("train", "infer", "ablation")):
        sections.insert(0, "peak")  # every share of peak needs it
    for section in sections:
        cfg.log(f"{section} ...")
        start = time.perf_counter()
        with CpuMonitor() as mon:
            results[section] = RUNNERS[section](cfg, results)
        results[section]["section_seconds"] = time.perf_counter() - start
        loads[section] = mon.other_cores
        if mon.other_cores is not None and mon.other_cores > 0.2:
            cfg.log(f"warning: other processes used {mon.other_cores:.2f} cores during {section}; "
                    "its timings are not reliable")
    if "peak" in results and len(sections) > 1:
        # Measured again at the end, keeping the best: a peak taken during a moment of contention would flatter
        # every share of it.
        again = bench_peak(cfg)
        for precision in ("fp32", "bf16"):
            if again[precision]["flop_per_second"] > results["peak"][precision]["flop_per_second"]:
                results["peak"][precision] = again[precision]
        _apply_peak(results, results["peak"])  # the one place every share of peak is set
    results["conditions"]["other_load_cores"] = loads
    results["summary"] = summarize_targets(results)
    return results


def _apply_peak(node: Any, peak: dict[str, Any]) -> None:
    """Recompute every ``peak_share`` in the results from the final peak."""
    if isinstance(node, dict):
        if node.get("flop_per_second") and node.get("precision") in ("fp32", "bf16") and "peak_share" in node:
            node["peak_share"] = node["flop_per_second"] / peak[node["precision"]]["flop_per_second"]
        for key, value in node.items():
            if key != "peak":
                _apply_peak(value, peak)
    elif isinstance(node, list):
        for value in node:
            _apply_peak(value, peak)


def summarize_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of issue #4 with the measured value and whether it is met."""
    rows = []

    def add(target: str, measured: float | None, goal: float, higher_is_better: bool = True) -> None:
        if measured is None:
            return
        met = measured >= goal if higher_is_better else measured <= goal
        rows.append({"target": target, "measured": measured, "goal": goal, "met": bool(met)})

    if "train" in results:
        add("training step, images/s vs reference", results["train"]["ratio"], TARGETS["train_ratio"])
        add("training step, share of same-precision peak", results["train"]["vggnet"]["peak_share"],
            TARGETS["train_peak_share"])
    if "infer" in results:
        add("inference, images/s vs reference", results["infer"]["ratio"], TARGETS["infer_ratio"])
    if "e2e" in results:
        add("end-to-end epoch, wall time vs reference", results["e2e"]["ratio"], TARGETS["e2e_ratio"])
    if "memory" in results:
        for key, label in (("tensor_error", "profiler tensor peak"), ("rss_error", "peak RSS growth")):
            errors = [abs(r[key]) for r in results["memory"]["rows"] if key in r]
            if errors:
                add(f"memory estimate, largest error vs {label}", max(errors), TARGETS["memory_error"], False)
    return rows


# ---------------------------------------------------------------------------------------------------- render
def _fmt(value: float | None, spec: str = ".0f") -> str:
    return "-" if value is None else format(value, spec)


def _gflops(value: float | None) -> str:
    return "-" if value is None else f"{value / 1e9:.0f}"


def _share(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def render(results: dict[str, Any]) -> str:
    """Text tables of :func:`run`'s results."""
    from .report import human_bytes, table

    c = results["conditions"]
    lines = [f"vggnet bench on {c['cpu']}, {c['threads']} threads of {c['cores']} cores, torch {c['torch']}, "
             f"bf16 native: {c['bf16_native']}{' (quick)' if results.get('quick') else ''}"]
    loads = {k: v for k, v in c.get("other_load_cores", {}).items() if v is not None}
    if loads:
        lines.append("other processes' CPU use during each section (cores): "
                     + ", ".join(f"{k} {v:.2f}" for k, v in loads.items()))
    if "peak" in results:
        p = results["peak"]
        lines += ["", f"peak: 3x3 conv {'x'.join(map(str, p['shape']))}, channels_last: "
                  f"fp32 {_gflops(p['fp32']['flop_per_second'])} GFLOP/s, "
                  f"bf16 {_gflops(p['bf16']['flop_per_second'])} GFLOP/s"]
    rows = []
    for key, label in (("train", "training step"), ("infer", "inference")):
        if key not in results:
            continue
        r = results[key]
        for side in ("reference", "vggnet"):
            t = r[side]
            rows.append([label if side == "reference" else "", t["name"], t["precision"],
                         _fmt(t["images_per_second"]), _gflops(t["flop_per_second"]), _share(t["peak_share"]),
                         f"{r['ratio']:.2f}x" if side == "vggnet" else ""])
    if rows:
        lines += ["", table(["benchmark", "implementation", "prec", "images/s", "GFLOP/s", "of peak", "ratio"],
                            rows, "lllrrrr")]
    if "train" in results:
        r = results["train"]
        lines.append(f"training: {r['model']} ({r['head']} head, width {r['width']}), "
                     f"{r['input_size'][0]}x{r['input_size'][1]}x{r['in_channels']}, batch {r['batch']}, "
                     f"{r['flops_per_step'] / 1e9:.1f} GFLOP per step ({r['flop_convention']})")
    if "infer" in results:
        r = results["infer"]
        lines.append(f"inference: {r['model']} ({r['head']} head), {r['input_size']}x{r['input_size']}, batch "
                     f"{r['batch']}; logits vs reference: relative L2 error {r['rel_l2_error']:.2e} (tolerance "
                     f"{r['tolerance']['rel_l2_error_max']:g}), top-1 agreement {100 * r['top1_agreement']:.0f}%")
    if "e2e" in results:
        r = results["e2e"]
        rows = []
        for side in ("reference", "vggnet"):
            t = r[side]
            rows.append([side, f"{t['seconds']:.1f}", f"{t['train_seconds']:.1f}", _fmt(t["images_per_second"]),
                         _fmt(t["train_images_per_second"]), f"{100 * t['test_acc']:.2f}%",
                         f"{r['ratio']:.2f}x" if side == "vggnet" else ""])
        m = r["model"]
        lines += ["", f"end to end: one Fashion-MNIST epoch ({r['subset'] or 'all'} training images, batch "
                  f"{r['batch_size']}) + test set, {m['name']} width {m['width']} {m['head']} head",
                  table(["pipeline", "wall s", "train s", "images/s", "train img/s", "test acc", "ratio"], rows,
                        "lrrrrrr"),
                  f"vggnet train recorded train_images_per_second = "
                  f"{r['vggnet']['recorded_train_images_per_second']:.0f} "
                  f"(train phase {r['train_phase_ratio']:.2f}x the reference's)"]
    if "memory" in results:
        rows = []
        for row in results["memory"]["rows"]:
            rows.append([row["model"], row["head"], str(row["input_size"]), str(row["batch"]),
                         human_bytes(row["estimate_bytes"]),
                         human_bytes(row["tensor_peak_bytes"]) if row.get("tensor_peak_bytes") else "-",
                         _fmt(100 * row["tensor_error"], "+.1f") + "%" if "tensor_error" in row else "-",
                         human_bytes(row["rss_peak_bytes"]),
                         _fmt(100 * row["rss_error"], "+.1f") + "%" if "rss_error" in row else "-"])
        lines += ["", "training memory, fp32 eager NCHW, SGD with momentum: estimate vs measured peak",
                  table(["model", "head", "size", "batch", "estimate", "tensors (profiler)", "error", "RSS growth",
                         "error"], rows, "lllrrrrrr")]
    if "ablation" in results:
        a = results["ablation"]
        for key, title in (("train", "ablation, training step"), ("infer", "ablation, inference")):
            if key not in a:
                continue
            rows = [[r["name"], r["precision"], _fmt(r["images_per_second"]), _gflops(r["flop_per_second"]),
                     _share(r["peak_share"]), f"{r['ratio']:.2f}x"] for r in a[key]]
            if key == "infer":
                extra = f" ({a['infer_model']['model']}, {a['infer_model']['input_size']}px, batch " \
                        f"{a['infer_model']['batch']})"
            else:
                extra = ""
            lines += ["", title + extra, table(["variant", "prec", "images/s", "GFLOP/s", "of peak", "vs ref"],
                                               rows, "llrrrr")]
    if "profile" in results:
        sweep = results["profile"].get("small_map_sweep", [])
        if sweep:
            rows = [[f"{r['in_channels']}->{r['out_channels']}", f"{r['size']}x{r['size']}", f"{r['onednn_ms']:.1f}",
                     f"{r['gemm_ms']:.1f}", _gflops(r["onednn_flop_per_second"]), _gflops(r["gemm_flop_per_second"]),
                     f"{r['gemm_speedup']:.2f}x"] for r in sweep]
            lines += ["", f"3x3 conv forward + backward, bf16 channels_last, batch {sweep[0]['batch']}: oneDNN vs "
                          "im2col + GEMM", table(["channels", "map", "oneDNN ms", "GEMM ms", "oneDNN GF/s",
                                                  "GEMM GF/s", "GEMM speed-up"], rows, "llrrrrr")]
        for key, rows_ in results["profile"].items():
            if not isinstance(rows_, list) or key == "small_map_sweep":
                continue
            rows = [[r["op"][:48], f"{r['self_ms_per_call']:.1f}", _share(r["share"])] for r in rows_]
            lines += ["", f"profile: {key} (self CPU time per call)", table(["op", "ms", "share"], rows, "lrr")]
    if results.get("summary"):
        rows = [[s["target"], f"{s['measured']:.3g}", f"{s['goal']:g}", "met" if s["met"] else "NOT met"]
                for s in results["summary"]]
        lines += ["", table(["target", "measured", "goal", ""], rows, "lrrl")]
    return "\n".join(lines)


if __name__ == "__main__":  # the memory subprocess: python -m vggnet.bench --memory-child '[name, size, head, b, t]'
    if len(sys.argv) == 3 and sys.argv[1] == "--memory-child":
        print(json.dumps(memory_child(*json.loads(sys.argv[2]))))
    else:
        sys.exit("usage: vggnet bench (this module's own entry point is for its memory subprocesses)")
