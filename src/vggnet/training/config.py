"""What a training run depends on: :class:`TrainConfig`, the named presets, and :func:`resolve_config`.

The choice tuples here (:data:`OPTIMIZERS`, :data:`NORMALIZE`, and :data:`vggnet.runtime.PRECISIONS`,
:data:`vggnet.base.schedule.SCHEDULES`, :data:`vggnet.net.models.HEADS`, :data:`vggnet.training.transfer.INIT_SCHEMES`) are
the ones the CLI offers.

The model's shape (:data:`MODEL_SHAPE`: model, arch, batch_norm, width, head, dropout) follows one rule: a preset's
shape (the default recipe's quarter-width VGG-11-BN with a GAP head, d2l's quarter-width VGG-11, ...) applies only
when no model is named. Naming a model (``--model vgg16_bn``) gives that model's own architecture (full width, the
classic torchvision head, dropout 0.5, as :func:`vggnet.create_model` builds it) unless ``--width``, ``--head`` or
``--dropout`` are given too.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Iterator

from vggnet.base.limits import (BATCH, DEVICE_NAME, IMAGE_SIZE, IMAGES, MAX_BATCH, MAX_CLASSES, MAX_EPOCHS,
                                MAX_IMAGE_SIZE, MAX_IMAGES, MAX_LR, MAX_SEED, THREADS, WIDTH, Range)
from vggnet.net.configs import parse_arch
from vggnet.base.errors import ConfigError
from vggnet.net.models import HEADS, INITS, MODELS, VGG, list_models
from vggnet.runtime import PRECISIONS
from vggnet.base.schedule import SCHEDULES
from vggnet.training.transfer import INIT_SCHEMES

OPTIMIZERS = ("sgd", "adam", "adamw")
#: Test-time augmentation of the final test evaluation (--tta): flip averages with the mirrored images.
TTAS = ("flip",)
NORMALIZE = ("standard", "mean", "none")
#: The options that shape the model; a preset's values for them apply only when no model is named.
MODEL_SHAPE = ("model", "arch", "batch_norm", "width", "head", "dropout")
#: The default recipe's model (when no model is named and no preset names one): d2l's quarter-width VGG-11 with BN
#: after every conv and a GAP head (global average pooling, one linear layer), no dropout.
DEFAULT_MODEL = {"model": "vgg11_bn", "width": 0.25, "head": "gap", "dropout": 0.0}
#: What a named model is built with when its shape options are not given: the model's own defaults.
MODEL_DEFAULTS = {name: inspect.signature(VGG.__init__).parameters[name].default for name in ("width", "head", "dropout")}
#: The options a time budget (--budget, --preset hour) chooses itself, from measured recipes
#: (:mod:`vggnet.training.budget`): giving one beside it is a one-line error, not a silent override.
BUDGET_CHOOSES = ("model", "arch", "batch_norm", "width", "head", "dropout", "epochs", "erasing", "tta")
#: The presets a budget may start from: the default recipe ("fast") and "hour" (a budget itself); the measured
#: recipes the budget chooses among are the default recipe's variants, so another preset's training is not theirs.
BUDGET_PRESETS = ("fast", "hour")
#: A budget's bounds in seconds: 1 s to 30 days.
BUDGET = Range(1, 30 * 86400)
_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?")


#: The numeric fields of TrainConfig and their ranges; those in OPTIONAL may also be None (not set).
RANGES: dict[str, Range] = {
    "width": WIDTH,
    "dropout": Range(0, 1, open_high=True),
    "loaded_lr_scale": Range(0, 100, open_low=True),
    "image_size": IMAGE_SIZE,
    "val_split": Range(0, MAX_IMAGES, integer=True),
    "subset": IMAGES,
    "crop_padding": Range(0, MAX_IMAGE_SIZE, integer=True),
    "erasing": Range(0, 1),
    "epochs": Range(1, MAX_EPOCHS, integer=True),
    "schedule_epochs": Range(1, MAX_EPOCHS, integer=True),
    "batch_size": BATCH,
    "lr": Range(0, MAX_LR, open_low=True),
    "momentum": Range(0, 1, open_high=True),
    "weight_decay": Range(0, 1),
    "warmup_epochs": Range(0, MAX_EPOCHS),
    "label_smoothing": Range(0, 1, open_high=True),
    "grad_clip": Range(0, 1e9, open_low=True),
    "plateau_patience": Range(0, MAX_EPOCHS, integer=True),
    "seed": Range(0, MAX_SEED, integer=True),
    "threads": THREADS,
    "eval_batch_size": Range(1, MAX_BATCH, integer=True),
    "colour_shift": Range(0, 10),
    "workers": Range(0, 256, integer=True),
    "budget": BUDGET,
}
OPTIONAL = ("subset", "grad_clip", "schedule_epochs", "threads", "eval_batch_size", "workers", "budget")
#: Fields config.json holds that are not command-line options: messages name them as they are spelled there.
_NOT_FLAGS = ("schedule_epochs", "plateau_patience", "eval_batch_size", "nesterov", "init_record", "preset",
              "precision_record", "budget_record")
#: The JSON types of the remaining fields (the choices among the strings are checked by value).
_TEXT = ("model", "dataset", "device", "precision", "optimizer", "schedule", "normalize", "init", "init_scheme", "head")
_OPTIONAL_TEXT = ("data_dir", "out", "init_from", "preset", "tta")
_SWITCHES = ("flip", "nesterov", "compile", "deterministic", "sync_bn", "tensorboard", "progress")


def option_name(field_name: str) -> str:
    """How a message names a field: its command-line flag (``--batch-size``), or its config.json key."""
    return field_name if field_name in _NOT_FLAGS else "--" + field_name.replace("_", "-")


def parse_duration(text: str) -> float:
    """``90s``, ``10m``, ``1h``, ``1h30m``, ``1.5h`` -> seconds; :class:`ConfigError` for anything else (a bare
    number has no unit: it is refused rather than guessed) and outside :data:`BUDGET`."""
    match = _DURATION.fullmatch(text.strip().lower()) if isinstance(text, str) else None
    if match is None or not any(match.groups()):
        raise ConfigError(f"--budget takes a duration such as 90s, 10m, 1h or 1h30m, got {text!r}")
    hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
    total = 3600 * hours + 60 * minutes + seconds
    if BUDGET.problem(total) is not None:
        raise ConfigError(f"--budget {text.strip()} is {total:.0f} s: give from {BUDGET.low:g}s to "
                          f"{format_duration(BUDGET.high)} ({BUDGET.high / 86400:g} days)")
    return total


def format_duration(seconds: float) -> str:
    """``5400`` -> ``1h30m``, ``600`` -> ``10m``, ``90`` -> ``1m30s``, ``2.5`` -> ``2.5s``: how messages show a
    budget (whole seconds, but for a budget under a minute)."""
    if seconds < 60:
        return f"{seconds:g}s"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return "".join(f"{value}{unit}" for value, unit in ((hours, "h"), (minutes, "m"), (secs, "s")) if value)


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on. Units are in the comments; ``config.json`` stores the resolved values.

    ``None`` in a model-shape field means "not given": :meth:`complete` fills it by the rule in the module docstring.
    """

    # model
    model: str | None = None  # registry name, or "custom" with arch (None: the default recipe's vgg11_bn)
    arch: Any = None  # custom architecture tokens (see vggnet.net.configs)
    batch_norm: bool | None = None  # BN after every conv (None: the registry name decides; custom: no BN)
    width: float | None = None  # channel multiplier (default recipe 0.25: 16..128 channels; a named model: 1.0)
    head: str | None = None  # classic | fitted | dense | gap (default recipe gap; a named model: classic)
    dropout: float | None = None  # probability, on the head's FC layers (default recipe 0; a named model: 0.5)
    init: str = "torchvision"  # torchvision | paper | xavier
    # starting weights and frozen layers (vggnet.training.transfer)
    init_from: str | None = None  # SOURCE: a run directory (or a weights file vggnet.load reads) to start from
    init_scheme: str = "all"  # all: every layer whose name and shapes fit; paper: SOURCE's first 4 convs + last 3 FC
    freeze: list[str] = field(default_factory=list)  # layers kept fixed: features, blockN, convN_M, classifier
    loaded_lr_scale: float = 1.0  # multiplier of the learning rate for the layers loaded from init_from
    init_record: dict | None = None  # what init_from loaded and re-initialised: filled by build_run (resume reads it)
    # data
    dataset: str = "fashion-mnist"  # fashion-mnist | cifar10 | cifar100 | folder:PATH
    data_dir: str | None = None  # searched alone when given (None: $VGGNET_DATA, then the default places)
    image_size: int = 32  # pixels (square); Fashion-MNIST's 28 is centre-padded to 32
    normalize: str = "standard"  # standard: per-channel mean/std; mean: the paper's mean subtraction; none
    classes: list[int] | None = None  # train and test on these class indices only, relabelled 0..k-1 in this order
    val_split: int = 0  # training images held out for validation (stratified, never trained on; 0: none)
    subset: int | None = None  # train on the first N training images (after the validation hold-out)
    crop_padding: int = 2  # pixels of padding for random crops (0 = no crop)
    flip: bool = True  # random horizontal flips
    scale_jitter: tuple[float, float] | None = None  # zoom window as a fraction of the side, e.g. (0.44, 0.88)
    erasing: float = 0.0  # probability of random erasing per image
    # prepared (streamed) datasets only: the paper's protocol, decoded per sample in worker processes
    scale: list[int] | None = None  # training scale S in pixels: [S] fixed, [SMIN, SMAX] jittered; None: 8/7 x size
    colour_shift: float = 0.1  # std of AlexNet's RGB colour shift (the paper's 0.1); 0: none
    workers: int | None = None  # decoding processes (None: the available cores); not recorded in config.json's sense
    # optimisation
    epochs: int = 15
    schedule_epochs: int | None = None  # epochs the learning-rate schedule spans (None: epochs; kept on extension)
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
    plateau_patience: int = 2  # epochs without validation improvement before /10 (schedule plateau)
    # run
    seed: int = 0
    out: str | None = None  # run directory (default runs/MODEL-DATASET-TIMESTAMP)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (on the CPU measured: vggnet.training.probe) | fp32 | bf16 | fp16
    precision_record: dict | None = None  # what precision auto chose and why: filled by build_run (resume reads it)
    # auto: precision auto's probe on a CPU with native bf16 times both layouts (vggnet.training.probe), channels_last
    # elsewhere; true or false: that layout
    channels_last: bool | str = "auto"
    threads: int | None = None  # intra-op threads (default: every available core)
    compile: bool = False  # torch.compile the training step's network (runtime only: may change on resume)
    deterministic: bool = False  # deterministic algorithms (cuDNN, cuBLAS): bit-identical runs on CUDA too
    eval_batch_size: int | None = None  # None: by image size (vggnet.evaluation.metrics.auto_batch_size)
    tta: str | None = None  # flip: the last epoch's test evaluation is also made with mirrored images averaged in
    sync_bn: bool = False  # SyncBatchNorm under DDP
    tensorboard: bool = False  # also write TensorBoard logs (pip install 'vggnet[tensorboard]')
    progress: bool = True
    preset: str | None = None  # the preset these values started from
    budget: float | None = None  # seconds (--budget): the run's time limit; vggnet.training.budget chooses the recipe
    budget_record: dict | None = None  # what the budget chose and why: filled by vggnet.training.budget.plan

    def complete(self) -> "TrainConfig":
        """This configuration with the model-shape fields left at ``None`` filled (the rule in the module
        docstring) and ``freeze`` as a list; a new object: a TrainConfig never changes once made."""
        changes: dict[str, Any] = {}
        if self.model is None:
            changes.update({k: v for k, v in DEFAULT_MODEL.items() if getattr(self, k) is None})
        changes.update({k: v for k, v in MODEL_DEFAULTS.items() if getattr(self, k) is None and k not in changes})
        if isinstance(self.freeze, str):  # "features,conv5_1" as on the command line
            changes["freeze"] = [name.strip() for name in self.freeze.split(",") if name.strip()]
        elif isinstance(self.freeze, tuple):
            changes["freeze"] = list(self.freeze)
        return replace(self, **changes) if changes else self

    def validate(self) -> "TrainConfig":
        """This configuration completed (:meth:`complete`) and checked: raise :class:`ConfigError` naming the first
        invalid option: of the wrong type (config.json may have been edited by hand), outside its :data:`RANGES`, or
        not one of its choices."""
        done = self.complete()
        for problem in done._problems():
            raise ConfigError(problem)
        return done

    def _problems(self) -> Iterator[str]:
        """The messages of what is wrong, types first: a later check may rely on an earlier one having passed."""
        yield from self._type_problems()
        if isinstance(self.loaded_lr_scale, (int, float)) and not self.loaded_lr_scale > 0:
            yield (f"--loaded-lr-scale must be a positive number, got {self.loaded_lr_scale} (keep layers fixed with "
                   "--freeze)")
        for name, allowed in RANGES.items():
            value = getattr(self, name)
            problem = None if value is None and name in OPTIONAL else allowed.problem(value)
            if problem is not None:
                yield f"{option_name(name)} {problem}"
        checks = [
            (lambda: DEVICE_NAME.fullmatch(self.device) is not None,
             f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}"),
            (lambda: self.model in MODELS or self.model == "custom",
             f"unknown model {self.model!r}: choose one of {', '.join(list_models())}, or 'custom' with --arch"),
            (lambda: self.head in HEADS, f"--head must be one of {', '.join(HEADS)}, got {self.head!r}"),
            (lambda: self.init in INITS, f"--init must be one of {', '.join(INITS)}, got {self.init!r}"),
            (lambda: self.optimizer in OPTIMIZERS,
             f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}"),
            (lambda: self.schedule in SCHEDULES,
             f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}"),
            (lambda: self.normalize in NORMALIZE,
             f"--normalize must be one of {', '.join(NORMALIZE)}, got {self.normalize!r}"),
            (lambda: self.tta is None or self.tta in TTAS, f"--tta must be {' or '.join(TTAS)}, got {self.tta!r}"),
            (lambda: self.precision in PRECISIONS,
             f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"),
            (lambda: self.init_scheme in INIT_SCHEMES,
             f"--init-scheme must be one of {', '.join(INIT_SCHEMES)}, got {self.init_scheme!r}"),
            (lambda: self.classes is None or (len(self.classes) >= 2 and len(set(self.classes)) == len(self.classes)),
             f"--classes must name at least 2 distinct class indices, got {self.classes}"),
            (lambda: self.init_from != "", "--init-from must name a run directory or weights file, got ''"),
            (lambda: self.init_scheme == "all" or self.init_from is not None,
             f"--init-scheme {self.init_scheme} says which layers to take from --init-from SOURCE: give --init-from"),
            (lambda: self.loaded_lr_scale == 1.0 or self.init_from is not None,
             "--loaded-lr-scale scales the learning rate of the layers loaded by --init-from: give --init-from"),
            (lambda: self.schedule != "plateau" or self.val_split > 0,
             "--schedule plateau lowers the learning rate when the validation accuracy stops improving: hold out "
             "validation images with --val-split N (e.g. 5000), or choose another --schedule"),
        ]
        for ok, message in checks:
            if not ok():
                yield message
        if self.arch is not None:
            parse_arch(self.arch)  # a bad token or kernel fails here, before any data is read

    def _type_problems(self) -> Iterator[str]:
        """Fields of the wrong JSON type; the numbers' types are their ranges' business."""
        for name in _TEXT + _OPTIONAL_TEXT:
            value = getattr(self, name)
            if not (isinstance(value, str) or (value is None and name in _OPTIONAL_TEXT)):
                yield f"{option_name(name)} must be a string, got {value!r}"
        for name in _SWITCHES:
            if not isinstance(getattr(self, name), bool):
                yield f"{name} must be true or false, got {getattr(self, name)!r}"
        if not (isinstance(self.channels_last, bool) or self.channels_last == "auto"):
            yield f"channels_last must be true, false or \"auto\", got {self.channels_last!r}"
        if self.batch_norm is not None and not isinstance(self.batch_norm, bool):
            yield f"batch_norm must be true, false or null, got {self.batch_norm!r}"
        if self.arch is not None and not isinstance(self.arch, (str, list, tuple)):
            yield f"--arch must be a string or a list of layer tokens, got {self.arch!r}"
        jitter = self.scale_jitter
        if jitter is not None and not (isinstance(jitter, (list, tuple)) and len(jitter) == 2
                                       and all(Range(0, 1, open_low=True).problem(v) is None for v in jitter)
                                       and jitter[0] <= jitter[1]):
            yield f"--scale-jitter must be two fractions of the side, 0 < LO <= HI <= 1, got {jitter!r}"
        if self.scale is not None and not (isinstance(self.scale, (list, tuple)) and len(self.scale) in (1, 2) and all(
                IMAGE_SIZE.problem(s) is None for s in self.scale) and self.scale[0] <= self.scale[-1]):
            yield f"--scale must be S or SMIN SMAX, whole pixels with SMIN <= SMAX, got {self.scale!r}"
        if self.classes is not None and not (isinstance(self.classes, (list, tuple)) and all(
                Range(0, MAX_CLASSES - 1, integer=True).problem(c) is None for c in self.classes)):
            yield f"--classes must be a list of class indices in 0..{MAX_CLASSES - 1}, got {self.classes!r}"
        if not (isinstance(self.freeze, list) and all(isinstance(n, str) and n for n in self.freeze)):
            yield f"--freeze takes layer names (features, block1, conv1_1, classifier), got {self.freeze!r}"
        if self.init_record is not None and not isinstance(self.init_record, dict):
            yield f"init_record must be an object (written by build_run), got {type(self.init_record).__name__}"
        if self.precision_record is not None and not isinstance(self.precision_record, dict):
            yield ("precision_record must be an object (written by build_run), got "
                   f"{type(self.precision_record).__name__}")
        if self.budget_record is not None and not isinstance(self.budget_record, dict):
            yield ("budget_record must be an object (written by vggnet.training.budget), got "
                   f"{type(self.budget_record).__name__}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"a training configuration must be a JSON object, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown training option(s) {sorted(unknown)}")
        d = dict(d)
        if isinstance(d.get("scale"), tuple):
            d["scale"] = list(d["scale"])
        if isinstance(d.get("scale_jitter"), list):  # JSON's form of the pair; anything else is left to validate
            d["scale_jitter"] = tuple(d["scale_jitter"])
        return cls(**d)


# Presets: overrides of the TrainConfig defaults. Explicit options override a preset; a preset's model-shape values
# (MODEL_SHAPE) apply only when no model is named.
PRESETS: dict[str, dict[str, Any]] = {
    # Our fast, accurate Fashion-MNIST recipe (the default): DEFAULT_MODEL, one-cycle SGD, all 60,000 images.
    "fast": {},
    # An hour on this machine: --budget 60m, the most accurate measured recipe that fits the hour here
    # (vggnet.training.budget; on a 2-core AVX2 CPU a quarter-width VGG-13-BN, on an AMX CPU a wider network).
    "hour": dict(budget=3600.0),
    # The fixed recipe measured to fit an hour of one core of a 2-core AVX2 CPU (both seeds ran at once, one core
    # each; docs/RESULTS.md; the `hour` preset before it became a budget): quarter-width VGG-13-BN (GAP head), random
    # erasing, 34 epochs, and the final model also scored with flip test-time augmentation. Without --model: this
    # VGG-13-BN.
    "hour_avx2": dict(model="vgg13_bn", width=0.25, head="gap", dropout=0.0, erasing=0.3, epochs=34, tta="flip"),
    # The paper's protocol (section 3.1): SGD lr 0.01 divided by 10 when the validation accuracy stops improving,
    # dropout 0.5 on the head, mean subtraction, 74 epochs; 5,000 training images held out for validation. Without
    # --model: the default recipe's quarter-width VGG-11-BN with a fitted (classic-style) head.
    "paper": dict(model="vgg11_bn", width=0.25, head="fitted", dropout=0.5, optimizer="sgd", lr=0.01, momentum=0.9,
                  nesterov=False, weight_decay=5e-4, schedule="plateau", plateau_patience=2, label_smoothing=0.0,
                  normalize="mean", batch_size=256, epochs=74, warmup_epochs=0.0, val_split=5000),
    # d2l's chapter on VGG: quarter-width VGG-11, Fashion-MNIST resized to 224, plain SGD lr 0.05, 10 epochs.
    "d2l": dict(model="vgg11", width=0.25, head="classic", dropout=0.5, init="xavier", image_size=224,
                normalize="none", crop_padding=0, flip=False, optimizer="sgd", lr=0.05, momentum=0.0,
                nesterov=False, weight_decay=0.0, schedule="constant", label_smoothing=0.0, batch_size=128,
                epochs=10),
}


def resolve_config(preset: str | None = None, **overrides: Any) -> TrainConfig:
    """Defaults, then the preset, then explicit (non-None) overrides; completed and validated. A budget (``budget``,
    or ``--preset hour``) chooses :data:`BUDGET_CHOOSES` itself: giving one of them too is a :class:`ConfigError`."""
    name = preset or "fast"
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    values = PRESETS[name]
    if "budget" in given or "budget" in values:
        check_budget_request(name, given)
    if "model" in given:  # a named model: its own architecture, not the preset's
        values = {k: v for k, v in values.items() if k not in MODEL_SHAPE}
    return TrainConfig.from_dict({**values, **given, "preset": name}).validate()


def check_budget_request(preset: str, given: dict[str, Any]) -> None:
    """ConfigError when a budget comes with what it chooses itself (:data:`BUDGET_CHOOSES`), with another budget,
    or with a preset whose training is not the measured recipes' (:data:`BUDGET_PRESETS`)."""
    budget = given.get("budget", PRESETS[preset].get("budget"))
    shown = format_duration(budget) if isinstance(budget, (int, float)) and budget > 0 else repr(budget)
    source = f"--budget {shown}" if "budget" in given else f"--preset {preset} (--budget {shown})"
    if "budget" in given and "budget" in PRESETS[preset]:
        raise ConfigError(f"--preset {preset} is --budget {format_duration(PRESETS[preset]['budget'])} and --budget "
                          f"{shown} was given too: give one of them")
    if preset not in BUDGET_PRESETS:
        raise ConfigError(f"{source} chooses among measured variants of the default recipe, not --preset {preset}'s "
                          "training: leave out --preset, or leave out --budget and give --epochs yourself")
    chosen = [name for name in BUDGET_CHOOSES if name in given]
    if chosen:
        flags = ", ".join(option_name(name) for name in chosen)
        raise ConfigError(f"{source} chooses the model and the epochs itself (docs/RESULTS.md's measured recipes), "
                          f"so {flags} cannot be given beside it: leave out {flags}, or leave out the budget to train "
                          "the recipe you give")
