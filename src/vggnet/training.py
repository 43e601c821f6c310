"""Training: one configuration dataclass, named presets, and a loop of small named functions.

``fit(config)`` loads the data, builds the model, trains, evaluates on the whole test set after every epoch and
writes the run directory (see :mod:`vggnet.checkpoint`): ``config.json``, ``metrics.jsonl`` / ``metrics.csv``,
``curves.png``, ``confusion.png``, ``model.safetensors`` + ``model.json``, ``best.safetensors`` and the resume state.

The hot loop has no per-sample Python: uint8 batches are sliced from in-memory tensors, preprocessed and augmented
as whole batches, and run in channels_last with bf16 autocast where the CPU supports bf16 natively.
"""

from __future__ import annotations

import csv
import io
import json
import math
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from . import distributed
from .checkpoint import (atomic_write_json, atomic_write_text, load_tensors, optimizer_from_tensors,
                         optimizer_to_tensors, read_json, save_model, save_tensors)
from .data import Augment, BatchLoader, ImageDataset, Preprocess, channel_stats, load_dataset
from .errors import CheckpointError, ConfigError, VggnetError
from .evaluation import EvalResult
from .speedups import tune_for_cpu_bf16
from .hardware import autocast, pick_device, pick_precision, set_threads
from .models import HEADS, MODELS, create_model, list_models
from .schedule import SCHEDULES, Plateau, lr_factor

OPTIMIZERS = ("sgd", "adam", "adamw")
NORMALIZE = ("standard", "mean", "none")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class TrainConfig:
    """Everything a run depends on. Units are in the comments; ``config.json`` stores the resolved values."""

    # model
    model: str = "vgg11_bn"  # registry name, or "custom" with arch
    arch: Any = None  # custom architecture tokens (see vggnet.configs)
    batch_norm: bool | None = None  # BN after every conv (None: the registry name decides; custom: no BN)
    width: float = 0.25  # channel multiplier (0.25: d2l's quarter width, 16..128 channels)
    head: str = "gap"  # classic | fitted | dense | gap
    dropout: float = 0.0  # probability, on the head's FC layers
    init: str = "torchvision"  # torchvision | paper | xavier
    # data
    dataset: str = "fashion-mnist"  # fashion-mnist | cifar10 | cifar100 | folder:PATH
    data_dir: str | None = None  # searched before $VGGNET_DATA and the system location
    image_size: int = 32  # pixels (square); Fashion-MNIST's 28 is centre-padded to 32
    normalize: str = "standard"  # standard: per-channel mean/std; mean: the paper's mean subtraction; none
    subset: int | None = None  # train on the first N training images (the test set is always whole)
    crop_padding: int = 2  # pixels of padding for random crops (0 = no crop)
    flip: bool = True  # random horizontal flips
    scale_jitter: tuple[float, float] | None = None  # zoom window as a fraction of the side, e.g. (0.44, 0.88)
    erasing: float = 0.0  # probability of random erasing per image
    # optimisation
    epochs: int = 15
    batch_size: int = 256  # global images per step (divided across ranks under torchrun)
    optimizer: str = "sgd"  # sgd | adam | adamw
    lr: float = 0.1  # peak learning rate for the global batch of 256
    momentum: float = 0.9  # SGD momentum
    nesterov: bool = True
    weight_decay: float = 5e-4  # L2 (sgd, adam) or decoupled (adamw)
    schedule: str = "onecycle"  # onecycle | cosine | step | plateau | constant
    warmup_epochs: float = 0.0  # linear warmup length (onecycle without warmup ramps over 30% of training)
    label_smoothing: float = 0.1
    grad_clip: float | None = None  # max global gradient norm
    plateau_patience: int = 2  # epochs without test improvement before /10 (schedule plateau)
    # run
    seed: int = 0
    out: str | None = None  # run directory (default runs/MODEL-DATASET-TIMESTAMP)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 where native, else fp32) | fp32 | bf16 | fp16
    channels_last: bool = True
    threads: int | None = None  # intra-op threads (default: every available core)
    eval_batch_size: int | None = None  # None: by image size (vggnet.evaluation.auto_batch_size)
    sync_bn: bool = False  # SyncBatchNorm under DDP
    progress: bool = True
    preset: str | None = None  # the preset these values started from

    def validate(self) -> None:
        checks = [
            (self.head in HEADS, f"--head must be one of {', '.join(HEADS)}, got {self.head!r}"),
            (self.optimizer in OPTIMIZERS, f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}"),
            (self.schedule in SCHEDULES, f"--schedule must be one of {', '.join(SCHEDULES)}"),
            (self.normalize in NORMALIZE, f"--normalize must be one of {', '.join(NORMALIZE)}"),
            (self.precision in PRECISIONS, f"--precision must be one of {', '.join(PRECISIONS)}"),
            (self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.lr > 0 and math.isfinite(self.lr), f"--lr must be a positive number, got {self.lr}"),
            (self.image_size >= 1, f"--image-size must be >= 1, got {self.image_size}"),
            (self.subset is None or self.subset >= 1, f"--subset must be >= 1, got {self.subset}"),
            (0 <= self.label_smoothing < 1, f"--label-smoothing must be in [0, 1), got {self.label_smoothing}"),
            (self.grad_clip is None or self.grad_clip > 0, f"--grad-clip must be > 0, got {self.grad_clip}"),
            (self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}"),
            (self.warmup_epochs >= 0, f"--warmup-epochs must be >= 0, got {self.warmup_epochs}"),
            (self.eval_batch_size is None or self.eval_batch_size >= 1,
             f"eval_batch_size must be >= 1, got {self.eval_batch_size}"),
            (0 <= self.dropout < 1, f"--dropout must be in [0, 1), got {self.dropout}"),
            (self.crop_padding >= 0, f"--crop-padding must be >= 0 pixels, got {self.crop_padding}"),
            (0 <= self.erasing <= 1, f"--erasing must be a probability in [0, 1], got {self.erasing}"),
            (self.width > 0, f"--width must be > 0, got {self.width}"),
            (self.model in MODELS or self.model == "custom",
             f"unknown model {self.model!r}: choose one of {', '.join(list_models())}, or 'custom' with --arch"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown training option(s) {sorted(unknown)}")
        d = dict(d)
        if d.get("scale_jitter") is not None:
            d["scale_jitter"] = tuple(d["scale_jitter"])
        return cls(**d)


# Presets: overrides of the TrainConfig defaults. Explicit options override a preset.
PRESETS: dict[str, dict[str, Any]] = {
    # Our fast, accurate Fashion-MNIST recipe (the default): quarter-width VGG-11-BN, GAP head, one-cycle SGD.
    "fast": {},
    # The paper's protocol (section 3.1) on whatever model is chosen.
    "paper": dict(optimizer="sgd", lr=0.01, momentum=0.9, nesterov=False, weight_decay=5e-4, dropout=0.5,
                  head="fitted", schedule="plateau", plateau_patience=2, label_smoothing=0.0, normalize="mean",
                  batch_size=256, epochs=74, warmup_epochs=0.0),
    # d2l's chapter on VGG: quarter-width VGG-11, Fashion-MNIST resized to 224, plain SGD lr 0.05, 10 epochs.
    "d2l": dict(model="vgg11", width=0.25, head="classic", dropout=0.5, init="xavier", image_size=224,
                normalize="none", crop_padding=0, flip=False, optimizer="sgd", lr=0.05, momentum=0.0,
                nesterov=False, weight_decay=0.0, schedule="constant", label_smoothing=0.0, batch_size=128,
                epochs=10),
}


def resolve_config(preset: str | None = None, **overrides: Any) -> TrainConfig:
    """Defaults, then the preset, then explicit (non-None) overrides."""
    name = preset or "fast"
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    values = {**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}, "preset": name}
    config = TrainConfig.from_dict(values)
    config.validate()
    return config


class TrainingDiverged(VggnetError):
    """The loss became NaN or infinite."""


class Interrupted(VggnetError):
    """SIGINT or SIGTERM arrived; the state was saved for --resume."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


@dataclass
class RunState:
    """The loop's position and running sums: what resume needs beyond the tensors."""

    epoch: int = 0  # completed epochs
    batch: int = 0  # batches done in the current (incomplete) epoch
    step: int = 0  # optimizer steps overall
    best_acc: float = -1.0
    plateau: dict = field(default_factory=lambda: Plateau().to_dict())
    loss_sum: float = 0.0  # current epoch, summed over samples
    correct: int = 0
    seen: int = 0
    seconds: float = 0.0  # current epoch's training time so far


# ------------------------------------------------------------------------------------------------------- building
def build_optimizer(config: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Weight decay on conv/linear weights only (not on biases or BN parameters)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() <= 1]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if config.optimizer == "sgd":
        # foreach: the whole update in a few multi-tensor kernels, not ~5 per tensor (CPU default: per tensor); 1.7x
        # faster steps. Not fused=True: torch's fused CPU SGD ignores a momentum buffer whose memory format differs
        # from its channels_last parameter, as after resuming from a checkpoint, and silently updates wrong values.
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum,
                               nesterov=config.nesterov and config.momentum > 0, foreach=True)
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, lr=config.lr)
    return torch.optim.AdamW(groups, lr=config.lr)


def build_preprocess(config: TrainConfig, train: ImageDataset) -> Preprocess:
    channels = train.images.shape[1]
    if config.normalize == "none":
        mean, std = (0.0,) * channels, (1.0,) * channels
    else:
        mean, std = channel_stats(train)
        if config.normalize == "mean":
            std = (1.0,) * channels
    return Preprocess(config.image_size, mean, std, fit="auto", in_size=int(train.images.shape[-1]))


def build_model(config: TrainConfig, train: ImageDataset) -> torch.nn.Module:
    return create_model(config.model, arch=config.arch, batch_norm=config.batch_norm, num_classes=len(train.classes),
                        in_channels=int(train.images.shape[1]), input_size=config.image_size, width=config.width,
                        head=config.head, dropout=config.dropout, init=config.init)


def default_run_dir(config: TrainConfig) -> Path:
    dataset = config.dataset.replace("folder:", "").rstrip("/").split("/")[-1] or "folder"
    return Path("runs") / f"{config.model}-{dataset}-{time.strftime('%Y%m%d-%H%M%S')}"


# --------------------------------------------------------------------------------------------------------- signals
@contextmanager
def stop_on_signals() -> Iterator[dict]:
    """Turn SIGINT/SIGTERM into a flag the loop checks after each step (main thread only)."""
    flag: dict[str, int | None] = {"signum": None}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, _frame):
        flag["signum"] = signum

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# ------------------------------------------------------------------------------------------------------ the trainer
class Trainer:
    """Owns one run: data, model, optimizer, run directory. ``run()`` trains to the end or raises."""

    def __init__(self, config: TrainConfig, run_dir: Path, resume: bool = False) -> None:
        self.config = config
        self.dist = distributed.setup(config.device)
        self.run_dir = run_dir = Path(self.dist.broadcast_object(str(run_dir)))  # rank 0's (timestamped) name
        self.device = self.dist.device if self.dist.enabled else pick_device(config.device)
        self.precision = pick_precision(self.device, config.precision)
        if self.precision == "fp16" and self.device.type == "cpu":
            raise ConfigError("--precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
        set_threads(config.threads or self.dist.default_threads())  # torchrun: cores / local ranks
        if config.batch_size % self.dist.world_size:
            raise ConfigError(f"--batch-size {config.batch_size} (global) does not divide among "
                              f"{self.dist.world_size} processes: use a multiple of {self.dist.world_size}")
        self.train_set, self.test_set = load_dataset(config.dataset, config.data_dir, config.image_size)
        if config.subset:
            self.train_set = self.train_set.subset(config.subset)
        self.classes = list(self.train_set.classes)
        self.preprocess = build_preprocess(config, self.train_set)
        self.augment = Augment(crop_padding=config.crop_padding, flip=config.flip, scale_jitter=config.scale_jitter,
                               erasing=config.erasing)
        torch.manual_seed(config.seed)
        model = build_model(config, self.train_set)
        # Fail now, with the model's own message, if the images cannot go through it.
        model.check_input(torch.zeros(1, self.train_set.images.shape[1], config.image_size, config.image_size))
        self.model = model.to(self.device)
        if config.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if self.device.type == "cpu" and self.precision == "bf16":
            tune_for_cpu_bf16(self.model)  # GEMM small-map convs, pool before ReLU: same numbers (vggnet.speedups)
        self.optimizer = build_optimizer(config, self.model)
        self.net = self.dist.wrap(self.model, config.sync_bn)
        per_rank = config.batch_size // self.dist.world_size
        self.loader = BatchLoader(self.train_set, per_rank, shuffle=True, drop_last=True, seed=config.seed,
                                  rank=self.dist.rank, world_size=self.dist.world_size, device=self.device)
        if len(self.loader) == 0:
            raise ConfigError(f"--batch-size {config.batch_size} is larger than the training set "
                              f"({len(self.train_set)} images): lower it or raise --subset")
        self.total_steps = config.epochs * len(self.loader)
        self.warmup_steps = int(config.warmup_epochs * len(self.loader))
        self.generator = torch.Generator(self.device)
        self.state = RunState(plateau=Plateau(patience=config.plateau_patience).to_dict())
        self.history: list[dict[str, Any]] = []
        self.writer = None
        self.resume_rng = None  # the saved random states, when resuming mid-epoch (load_state)
        if resume:
            self.load_state()
        elif self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.run_dir / "config.json", config.to_dict())

    # ---------------------------------------------------------------------------------------------- state
    def meta(self, metrics: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"preprocess": self.preprocess.to_dict(), "classes": self.classes, "dataset": self.config.dataset,
                "image_size": self.config.image_size, "metrics": metrics or {},
                "train_config": self.config.to_dict()}

    def rng_state(self) -> dict[str, torch.Tensor]:
        states = {"rng/torch": torch.get_rng_state(), "rng/augment": self.generator.get_state()}
        if self.device.type == "cuda":
            states["rng/cuda"] = torch.cuda.get_rng_state(self.device)
        return states

    def save_state(self, extra: dict[str, torch.Tensor] | None = None) -> None:
        """Model, optimizer, RNG and counters: enough for --resume to continue exactly here (rank 0 writes)."""
        if not self.dist.is_main:
            return
        tensors, rest = optimizer_to_tensors(self.optimizer)
        tensors.update(self.rng_state())
        model_tensors = {f"model/{k}": v for k, v in self.model.state_dict().items()}
        save_tensors(self.run_dir / "state.safetensors", {**tensors, **model_tensors, **(extra or {})})
        atomic_write_json(self.run_dir / "state.json", {"run": asdict(self.state), "optimizer": rest,
                                                        "history": self.history})

    def load_state(self) -> None:
        state_json = read_json(self.run_dir / "state.json")
        tensors = load_tensors(self.run_dir / "state.safetensors")
        model_state = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
        try:
            self.model.load_state_dict(model_state)
            optimizer_from_tensors(self.optimizer, tensors, state_json["optimizer"])
            self.state = RunState(**state_json["run"])
        except (RuntimeError, KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{self.run_dir} holds a training state that does not fit this run: {err}") from None
        self.history = list(state_json.get("history", []))
        # Under torchrun rank r continues its own random streams (saved as rng/.../rankR when the run stopped
        # mid-epoch; rank 0's when it had fewer ranks) and rank 0 alone carries the epoch's running sums (which
        # were saved already summed over ranks).
        self.resume_rng = tuple(tensors.get(f"{k}/rank{self.dist.rank}", tensors.get(k))
                                for k in ("rng/torch", "rng/augment", "rng/cuda"))
        if not self.dist.is_main:
            self.state.loss_sum, self.state.correct = 0.0, 0

    # ---------------------------------------------------------------------------------------------- epochs
    def start_epoch(self, epoch: int) -> None:
        """Seed every random source from (seed, epoch), or restore the saved ones when resuming mid-epoch."""
        self.loader.set_epoch(epoch)
        if self.resume_rng is not None and self.state.batch > 0:
            cpu_rng, aug_rng, cuda_rng = self.resume_rng
            torch.set_rng_state(cpu_rng)
            self.generator.set_state(aug_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state(cuda_rng, self.device)
        else:
            base = self.config.seed * 1_000_003 + epoch * 7919 + self.dist.rank
            torch.manual_seed(base)
            self.generator.manual_seed(base + 1)
        self.resume_rng = None

    def learning_rate(self) -> float:
        factor = lr_factor(self.config.schedule, self.state.step, self.total_steps, self.warmup_steps)
        return self.config.lr * factor * self.state.plateau["scale"]

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.augment(self.preprocess(images), self.generator)
        if self.config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        lr = self.learning_rate()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with autocast(self.device, self.precision):
            logits = self.net(x)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.config.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.state.step += 1
        return loss.detach(), (logits.detach().argmax(1) == labels).sum()

    def train_epoch(self, epoch: int, stop: dict) -> None:
        from tqdm.auto import tqdm

        self.net.train()
        self.start_epoch(epoch)
        st = self.state
        per_rank = self.loader.batch_size
        bar = tqdm(total=len(self.loader) * per_rank * self.dist.world_size, initial=st.seen, unit="img",
                   unit_scale=True, desc=f"epoch {epoch + 1}/{self.config.epochs}", dynamic_ncols=True,
                   disable=None if self.config.progress and self.dist.is_main else True)  # None: terminals only
        start = time.perf_counter() - st.seconds
        for i, (images, labels) in enumerate(self.loader):
            if i < st.batch:
                continue  # resuming mid-epoch: these batches were already trained on
            loss, correct = self.train_step(images, labels)
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                kept = (f"the last good checkpoint (epoch {st.epoch}) is kept in {self.run_dir}" if st.epoch else
                        "no checkpoint was saved yet")
                raise TrainingDiverged(
                    f"the loss became {loss_value} at epoch {epoch + 1}, step {st.step}: lower --lr (now "
                    f"{self.config.lr}) or set --grad-clip; {kept}")
            n = labels.numel()
            st.loss_sum += loss_value * n
            st.correct += int(correct)
            st.seen += n * self.dist.world_size
            st.batch = i + 1
            st.seconds = time.perf_counter() - start
            bar.update(n * self.dist.world_size)
            if i % 10 == 0 or st.batch == len(self.loader):
                bar.set_postfix(loss=f"{st.loss_sum / (st.seen / self.dist.world_size):.3f}",
                                acc=f"{st.correct / (st.seen / self.dist.world_size):.3f}",
                                lr=f"{self.learning_rate():.3g}")
            if self.dist.stop_requested(stop["signum"]):  # a collective: every rank calls it at every step
                bar.close()
                sums = self.dist.all_reduce([st.loss_sum, float(st.correct)])  # rank 0 saves the global sums
                st.loss_sum, st.correct = sums[0], int(sums[1])
                self.save_state(self.dist.gather_rng(self.rng_state()))
                raise Interrupted(
                    f"stopped by {signal.Signals(stop['signum'] or signal.SIGTERM).name} at epoch {epoch + 1}, "
                    f"batch {st.batch}/{len(self.loader)}; state saved: resume with vggnet train --resume "
                    f"{self.run_dir}", stop["signum"] or signal.SIGTERM)
        bar.close()

    def finish_epoch(self, epoch: int) -> dict[str, Any]:
        st = self.state
        sums = self.dist.all_reduce([st.loss_sum, float(st.correct)])
        seen = st.seen
        test = self.evaluate()
        record = {
            "epoch": epoch + 1,
            "train_loss": sums[0] / seen,
            "train_acc": sums[1] / seen,
            "test_loss": test.loss,
            "test_acc": test.top1,
            "test_top5": test.top5,
            "lr": self.learning_rate(),
            "epoch_seconds": st.seconds,
            "train_images_per_second": seen / st.seconds if st.seconds else float("nan"),
            "step": st.step,
        }
        if self.config.schedule == "plateau":
            plateau = Plateau(**st.plateau)
            plateau.update(test.top1)
            st.plateau = plateau.to_dict()
        self.history.append(record)
        best = test.top1 > st.best_acc
        if best:
            st.best_acc = test.top1
        st.epoch, st.batch, st.loss_sum, st.correct, st.seen, st.seconds = epoch + 1, 0, 0.0, 0, 0, 0.0
        if self.dist.is_main:
            self.write_epoch(record, test, best)
        if self.dist.is_main and self.config.progress:
            print(f"epoch {record['epoch']}/{self.config.epochs}: train loss {record['train_loss']:.4f} acc "
                  f"{100 * record['train_acc']:.2f}% | test loss {record['test_loss']:.4f} acc "
                  f"{100 * record['test_acc']:.2f}% | {record['train_images_per_second']:.0f} img/s, "
                  f"{record['epoch_seconds']:.1f} s", flush=True)
        return record

    def evaluate(self) -> EvalResult:
        # Under torchrun every rank scores its share of the test set and gets the whole result.
        return self.dist.evaluate(self.model, self.test_set, self.preprocess, self.precision,
                                  self.config.eval_batch_size, self.config.channels_last, self.config.progress)

    # ---------------------------------------------------------------------------------------------- files
    def write_epoch(self, record: dict[str, Any], test: EvalResult, best: bool) -> None:
        from .plots import plot_confusion, plot_curves

        metrics = {"test_acc": record["test_acc"], "test_top5": record["test_top5"], "test_loss": record["test_loss"],
                   "epoch": record["epoch"], "best_test_acc": self.state.best_acc}
        # The weights are serialised once; on a best epoch they go to best.safetensors too.
        save_model(self.run_dir, self.model, self.meta(metrics),
                   ("best.safetensors", "model.safetensors") if best else ("model.safetensors",))
        if best:
            atomic_write_json(self.run_dir / "best.json", {"epoch": record["epoch"], "test_acc": record["test_acc"]})
        self.save_state()
        atomic_write_text(self.run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.history))
        atomic_write_text(self.run_dir / "metrics.csv", _to_csv(self.history))
        atomic_write_json(self.run_dir / "eval.json", test.to_dict())
        title = f"{self.config.model} on {self.config.dataset}"
        plot_curves(self.history, self.run_dir / "curves.png", title)
        plot_confusion(test.confusion, test.classes, self.run_dir / "confusion.png",
                       f"{title}: test top-1 {100 * test.top1:.2f}%")
        self.log_tensorboard(record)

    def log_tensorboard(self, record: dict[str, Any]) -> None:
        if self.writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self.writer = False
                return
            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        if self.writer:
            for key, value in record.items():
                if key != "epoch":
                    self.writer.add_scalar(key, value, record["epoch"])
            self.writer.flush()

    def run(self) -> dict[str, Any]:
        with stop_on_signals() as stop:
            for epoch in range(self.state.epoch, self.config.epochs):
                self.train_epoch(epoch, stop)
                self.finish_epoch(epoch)
                if self.dist.stop_requested(stop["signum"]):  # a collective, like the one after every step
                    signum = stop["signum"] or signal.SIGTERM
                    raise Interrupted(f"stopped by {signal.Signals(signum).name} after epoch {epoch + 1}; "
                                      f"resume with vggnet train --resume {self.run_dir}", signum)
        if self.writer:
            self.writer.close()
        final = self.history[-1] if self.history else {}
        return {"run_dir": str(self.run_dir), "test_acc": final.get("test_acc"), "best_test_acc": self.state.best_acc,
                "epochs": self.state.epoch, "history": self.history}


def _to_csv(records: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(records[0]))
    writer.writeheader()
    writer.writerows(records)
    return buf.getvalue()


def train(config: TrainConfig | None = None, **options: Any) -> dict[str, Any]:
    """Train from a :class:`TrainConfig` (or keyword options, resolved with :func:`resolve_config`)."""
    if config is None:
        config = resolve_config(options.pop("preset", None), **options)
    elif options:
        raise ConfigError("pass either a TrainConfig or keyword options, not both")
    run_dir = Path(config.out) if config.out else default_run_dir(config)
    if (run_dir / "state.json").exists():
        raise ConfigError(f"{run_dir} already holds a run: continue it with --resume {run_dir}, or choose another --out")
    config.out = str(run_dir)
    return Trainer(config, run_dir).run()


# Options that change how a run executes, not what it computes: --resume may set them anew.
RUNTIME_OPTIONS = ("progress", "threads", "device", "data_dir")


def resume(run_dir: str | Path, epochs: int | None = None, **runtime: Any) -> dict[str, Any]:
    """Continue the run in ``run_dir`` exactly where it stopped (optionally to a new total of ``epochs``).

    ``runtime`` may set the :data:`RUNTIME_OPTIONS` (threads, device, data_dir, progress) for this session.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise CheckpointError(f"{run_dir} is not a vggnet run directory to resume (no config.json)")
    config = TrainConfig.from_dict(read_json(run_dir / "config.json"))
    unknown = set(runtime) - set(RUNTIME_OPTIONS)
    if unknown:
        raise ConfigError(f"resume cannot change {sorted(unknown)}; only {', '.join(RUNTIME_OPTIONS)}")
    for key, value in runtime.items():
        if value is not None:
            setattr(config, key, value)
    if not (run_dir / "state.json").is_file():
        raise CheckpointError(f"{run_dir} has no saved training state (state.json): it stopped before its first "
                              "checkpoint; start it again")
    if epochs is not None:
        done = int(read_json(run_dir / "state.json")["run"]["epoch"])
        if epochs <= done:
            raise ConfigError(f"--epochs {epochs} is not beyond the {done} epoch(s) {run_dir} already trained")
        config.epochs = epochs
        config.validate()
        atomic_write_json(run_dir / "config.json", config.to_dict())
    return Trainer(config, run_dir, resume=True).run()
