"""What a training run depends on: :class:`TrainConfig`, the named presets, and :func:`resolve_config`.

The choice tuples here (:data:`OPTIMIZERS`, :data:`NORMALIZE`, and :data:`vggnet.runtime.PRECISIONS`,
:data:`vggnet.schedule.SCHEDULES`, :data:`vggnet.models.HEADS`, :data:`vggnet.training.transfer.INIT_SCHEMES`) are
the ones the CLI offers.

The model's shape (:data:`MODEL_SHAPE`: model, arch, batch_norm, width, head, dropout) follows one rule: a preset's
shape (the default recipe's quarter-width VGG-11-BN with a GAP head, d2l's quarter-width VGG-11, ...) applies only
when no model is named. Naming a model (``--model vgg16_bn``) gives that model's own architecture (full width, the
classic torchvision head, dropout 0.5, as :func:`vggnet.create_model` builds it) unless ``--width``, ``--head`` or
``--dropout`` are given too.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..errors import ConfigError
from ..models import HEADS, INITS, MODELS, VGG, list_models
from ..runtime import PRECISIONS
from ..schedule import SCHEDULES
from .transfer import INIT_SCHEMES

OPTIMIZERS = ("sgd", "adam", "adamw")
NORMALIZE = ("standard", "mean", "none")
#: The options that shape the model; a preset's values for them apply only when no model is named.
MODEL_SHAPE = ("model", "arch", "batch_norm", "width", "head", "dropout")
#: The default recipe's model (when no model is named and no preset names one): d2l's quarter-width VGG-11 with BN
#: after every conv and a GAP head (global average pooling, one linear layer), no dropout.
DEFAULT_MODEL = {"model": "vgg11_bn", "width": 0.25, "head": "gap", "dropout": 0.0}
#: What a named model is built with when its shape options are not given: the model's own defaults.
MODEL_DEFAULTS = {name: inspect.signature(VGG.__init__).parameters[name].default for name in ("width", "head", "dropout")}


@dataclass
class TrainConfig:
    """Everything a run depends on. Units are in the comments; ``config.json`` stores the resolved values.

    ``None`` in a model-shape field means "not given": :meth:`complete` fills it by the rule in the module docstring.
    """

    # model
    model: str | None = None  # registry name, or "custom" with arch (None: the default recipe's vgg11_bn)
    arch: Any = None  # custom architecture tokens (see vggnet.configs)
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
    data_dir: str | None = None  # searched before $VGGNET_DATA and the system location
    image_size: int = 32  # pixels (square); Fashion-MNIST's 28 is centre-padded to 32
    normalize: str = "standard"  # standard: per-channel mean/std; mean: the paper's mean subtraction; none
    classes: list[int] | None = None  # train and test on these class indices only, relabelled 0..k-1 in this order
    val_split: int = 0  # training images held out for validation (stratified, never trained on; 0: none)
    subset: int | None = None  # train on the first N training images (after the validation hold-out)
    crop_padding: int = 2  # pixels of padding for random crops (0 = no crop)
    flip: bool = True  # random horizontal flips
    scale_jitter: tuple[float, float] | None = None  # zoom window as a fraction of the side, e.g. (0.44, 0.88)
    erasing: float = 0.0  # probability of random erasing per image
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
    precision: str = "auto"  # auto (bf16 where native, else fp32) | fp32 | bf16 | fp16
    channels_last: bool = True
    threads: int | None = None  # intra-op threads (default: every available core)
    compile: bool = False  # torch.compile the training step's network (runtime only: may change on resume)
    deterministic: bool = False  # deterministic algorithms (cuDNN, cuBLAS): bit-identical runs on CUDA too
    eval_batch_size: int | None = None  # None: by image size (vggnet.evaluation.auto_batch_size)
    sync_bn: bool = False  # SyncBatchNorm under DDP
    tensorboard: bool = False  # also write TensorBoard logs (pip install 'vggnet[tensorboard]')
    progress: bool = True
    preset: str | None = None  # the preset these values started from

    def complete(self) -> "TrainConfig":
        """Fill the model-shape fields left at ``None`` (the rule in the module docstring), in place."""
        if self.model is None:
            for key, value in DEFAULT_MODEL.items():
                if getattr(self, key) is None:
                    setattr(self, key, value)
        for key, value in MODEL_DEFAULTS.items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if isinstance(self.freeze, str):  # "features,conv5_1" as on the command line
            self.freeze = [name.strip() for name in self.freeze.split(",") if name.strip()]
        elif isinstance(self.freeze, tuple):
            self.freeze = list(self.freeze)
        return self

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid option (after :meth:`complete`)."""
        self.complete()
        def number(value: Any) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        def whole(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        checks = [
            (self.model in MODELS or self.model == "custom",
             f"unknown model {self.model!r}: choose one of {', '.join(list_models())}, or 'custom' with --arch"),
            (self.head in HEADS, f"--head must be one of {', '.join(HEADS)}, got {self.head!r}"),
            (self.init in INITS, f"--init must be one of {', '.join(INITS)}, got {self.init!r}"),
            (self.optimizer in OPTIMIZERS,
             f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}"),
            (self.schedule in SCHEDULES, f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}"),
            (self.normalize in NORMALIZE, f"--normalize must be one of {', '.join(NORMALIZE)}, got {self.normalize!r}"),
            (self.precision in PRECISIONS, f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"),
            (whole(self.epochs) and self.epochs >= 1, f"--epochs must be an integer >= 1, got {self.epochs}"),
            (self.schedule_epochs is None or (whole(self.schedule_epochs) and self.schedule_epochs >= 1),
             f"schedule_epochs must be an integer >= 1, got {self.schedule_epochs}"),
            (whole(self.batch_size) and self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (number(self.lr) and self.lr > 0, f"--lr must be a positive number, got {self.lr}"),
            (whole(self.image_size) and self.image_size >= 1, f"--image-size must be >= 1, got {self.image_size}"),
            (whole(self.val_split) and self.val_split >= 0, f"--val-split must be >= 0 images, got {self.val_split}"),
            (self.classes is None or (isinstance(self.classes, (list, tuple)) and len(self.classes) >= 2
                                      and all(whole(c) and c >= 0 for c in self.classes)
                                      and len(set(self.classes)) == len(self.classes)),
             f"--classes must name at least 2 distinct class indices, got {self.classes}"),
            (self.subset is None or (whole(self.subset) and self.subset >= 1), f"--subset must be >= 1, got {self.subset}"),
            (number(self.label_smoothing) and 0 <= self.label_smoothing < 1,
             f"--label-smoothing must be in [0, 1), got {self.label_smoothing}"),
            (self.grad_clip is None or (number(self.grad_clip) and self.grad_clip > 0),
             f"--grad-clip must be > 0, got {self.grad_clip}"),
            (number(self.momentum) and 0 <= self.momentum < 1, f"--momentum must be in [0, 1), got {self.momentum}"),
            (number(self.weight_decay) and self.weight_decay >= 0,
             f"--weight-decay must be >= 0, got {self.weight_decay}"),
            (number(self.warmup_epochs) and self.warmup_epochs >= 0,
             f"--warmup-epochs must be >= 0, got {self.warmup_epochs}"),
            (whole(self.plateau_patience) and self.plateau_patience >= 0,
             f"plateau_patience must be an integer >= 0, got {self.plateau_patience}"),
            (self.eval_batch_size is None or (whole(self.eval_batch_size) and self.eval_batch_size >= 1),
             f"eval_batch_size must be >= 1, got {self.eval_batch_size}"),
            (number(self.dropout) and 0 <= self.dropout < 1, f"--dropout must be in [0, 1), got {self.dropout}"),
            (whole(self.crop_padding) and self.crop_padding >= 0,
             f"--crop-padding must be >= 0 pixels, got {self.crop_padding}"),
            (number(self.erasing) and 0 <= self.erasing <= 1,
             f"--erasing must be a probability in [0, 1], got {self.erasing}"),
            (number(self.width) and self.width > 0, f"--width must be a positive number, got {self.width}"),
            (self.threads is None or (whole(self.threads) and self.threads >= 1),
             f"--threads must be >= 1, got {self.threads}"),
            (isinstance(self.compile, bool), f"compile must be true or false, got {self.compile!r}"),
            (isinstance(self.deterministic, bool), f"deterministic must be true or false, got {self.deterministic!r}"),
            (self.init_from is None or (isinstance(self.init_from, str) and self.init_from != ""),
             f"--init-from must name a run directory or weights file, got {self.init_from!r}"),
            (self.init_scheme in INIT_SCHEMES,
             f"--init-scheme must be one of {', '.join(INIT_SCHEMES)}, got {self.init_scheme!r}"),
            (self.init_scheme == "all" or self.init_from is not None,
             f"--init-scheme {self.init_scheme} says which layers to take from --init-from SOURCE: give --init-from"),
            (number(self.loaded_lr_scale) and self.loaded_lr_scale > 0,
             f"--loaded-lr-scale must be a positive number, got {self.loaded_lr_scale} (keep layers fixed with "
             "--freeze)"),
            (self.loaded_lr_scale == 1.0 or self.init_from is not None,
             "--loaded-lr-scale scales the learning rate of the layers loaded by --init-from: give --init-from"),
            (isinstance(self.freeze, list) and all(isinstance(n, str) and n for n in self.freeze),
             f"--freeze takes layer names (features, block1, conv1_1, classifier), got {self.freeze!r}"),
            (self.init_record is None or isinstance(self.init_record, dict),
             f"init_record must be an object (written by build_run), got {type(self.init_record).__name__}"),
            (self.schedule != "plateau" or self.val_split > 0,
             "--schedule plateau lowers the learning rate when the validation accuracy stops improving: hold out "
             "validation images with --val-split N (e.g. 5000), or choose another --schedule"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

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
        if d.get("scale_jitter") is not None:
            d["scale_jitter"] = tuple(d["scale_jitter"])
        return cls(**d)


# Presets: overrides of the TrainConfig defaults. Explicit options override a preset; a preset's model-shape values
# (MODEL_SHAPE) apply only when no model is named.
PRESETS: dict[str, dict[str, Any]] = {
    # Our fast, accurate Fashion-MNIST recipe (the default): DEFAULT_MODEL, one-cycle SGD, all 60,000 images.
    "fast": {},
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
    """Defaults, then the preset, then explicit (non-None) overrides; completed and validated."""
    name = preset or "fast"
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    values = PRESETS[name]
    if "model" in given:  # a named model: its own architecture, not the preset's
        values = {k: v for k, v in values.items() if k not in MODEL_SHAPE}
    config = TrainConfig.from_dict({**values, **given, "preset": name}).complete()
    config.validate()
    return config
