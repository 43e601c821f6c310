"""VGG networks: one module class, one builder path, one registry.

The module knows nothing about data, devices, optimizers or printing. Submodule names follow torchvision
(``features``, ``avgpool``, ``classifier.0/.3/.6``), so a torchvision VGG state dict loads with ``strict=True``.

Heads (``head=``):

- ``classic``: torchvision's layout, ``AdaptiveAvgPool2d((7, 7))`` then FC-4096, FC-4096, FC-classes;
- ``fitted``: FC1 sized to the real feature map at ``input_size`` (no adaptive pooling), as Gluon's deferred Dense;
- ``dense``: fully convolutional, FC1 as a k x k conv and FC2/FC3 as 1x1 convs, then the spatial mean of the
  class-score map (the paper's dense evaluation); takes any input at least ``input_size``;
- ``gap``: global average pooling and one linear layer (the CIFAR-style VGG).
"""

from __future__ import annotations

import fnmatch
from typing import Any, Sequence

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from vggnet.net.configs import CFGS, LRN, Conv, Layer, Pool, arch_to_json, num_pools, parse_arch, scale_width
from vggnet.base.errors import ConfigError, InputSizeError

HEADS = ("classic", "fitted", "dense", "gap")
INITS = ("torchvision", "paper", "xavier")

# Registry: name -> (paper config letter, batch norm after every conv).
_BASE_NAMES = {"vgg11": "A", "vgg11_lrn": "A-LRN", "vgg13": "B", "vgg16_c": "C", "vgg16": "D", "vgg19": "E"}
MODELS: dict[str, tuple[str, bool]] = {}
for _name, _letter in _BASE_NAMES.items():
    MODELS[_name] = (_letter, False)
    MODELS[_name + "_bn"] = (_letter, True)


def size_pair(size: int | Sequence[int]) -> tuple[int, int]:
    """``32`` -> ``(32, 32)``; ``(h, w)`` -> ``(h, w)``."""
    if isinstance(size, int):
        return (size, size)
    if len(size) != 2:
        raise ConfigError(f"input_size must be an int or (height, width), got {size!r}")
    return (int(size[0]), int(size[1]))


def make_layers(
    layers: Sequence[Layer], in_channels: int, norm_layer: type[nn.Module] | None
) -> tuple[nn.Sequential, dict[str, int]]:
    """Build ``features`` in torchvision's order and name each module (conv3_1, bn3_1, relu3_1, lrn1_1, pool3).

    An LRN is named after the conv it follows (``lrn1_1`` follows ``conv1_1``)."""
    modules: list[nn.Module] = []
    names: dict[str, int] = {}
    block, index, channels = 1, 0, in_channels

    def add(name: str, module: nn.Module) -> None:
        names[name] = len(modules)
        modules.append(module)

    for layer in layers:
        if isinstance(layer, Pool):
            add(f"pool{block}", nn.MaxPool2d(kernel_size=2, stride=2))
            block, index = block + 1, 0
        elif isinstance(layer, LRN):
            add(f"lrn{block}_{index}", nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0))
        else:
            index += 1
            add(f"conv{block}_{index}", nn.Conv2d(channels, layer.channels, layer.kernel, padding=layer.kernel // 2))
            if norm_layer is not None:
                add(f"bn{block}_{index}", norm_layer(layer.channels))
            add(f"relu{block}_{index}", nn.ReLU(inplace=True))
            channels = layer.channels
    return nn.Sequential(*modules), names


class VGG(nn.Module):
    """A VGG network built from an architecture spec (see :mod:`vggnet.net.configs`).

    Args:
        arch: a paper letter (``"D"``), a token list (``[64, "M", ...]``) or d2l blocks (``((1, 64), ...)``).
        batch_norm: put ``norm_layer`` after every conv.
        num_classes: outputs of the last layer.
        in_channels: channels of the input image (1 for Fashion-MNIST).
        dropout: dropout probability after FC1 and FC2 (before the linear layer for ``gap``).
        width: multiplier for every conv's channel count.
        head: one of ``classic``, ``fitted``, ``dense``, ``gap``.
        input_size: training input size (int or (H, W)); sizes ``fitted`` and ``dense`` heads.
        hidden: width of FC1 and FC2 (4096 in the paper).
        init: ``torchvision`` (kaiming-normal fan_out convs, N(0, 0.01) linear), ``paper`` (N(0, 0.01)
            everywhere, zero biases), or ``xavier`` (Glorot uniform, zero biases).
        norm_layer: the normalisation class used when ``batch_norm`` (default ``nn.BatchNorm2d``).
        name: registry name, for messages and checkpoints.
    """

    def __init__(
        self,
        arch: str | Sequence[Any] = "D",
        *,
        batch_norm: bool = False,
        num_classes: int = 1000,
        in_channels: int = 3,
        dropout: float = 0.5,
        width: float = 1.0,
        head: str = "classic",
        input_size: int | Sequence[int] = 224,
        hidden: int = 4096,
        init: str = "torchvision",
        norm_layer: type[nn.Module] | None = None,
        name: str = "custom",
    ) -> None:
        super().__init__()
        if head not in HEADS:
            raise ConfigError(f"unknown head {head!r}: choose one of {', '.join(HEADS)}")
        if init not in INITS:
            raise ConfigError(f"unknown init {init!r}: choose one of {', '.join(INITS)}")
        for label, value in (("num_classes", num_classes), ("in_channels", in_channels), ("hidden", hidden)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{label} must be a positive integer, got {value!r}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {dropout}")
        base = parse_arch(arch)
        layers = scale_width(base, width)
        self.name = name
        self.head = head
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.input_size = size_pair(input_size)
        self.num_pools = num_pools(layers)
        self.min_size = 2**self.num_pools
        self._check_size(self.input_size, "input_size", self.min_size)
        self.config: dict[str, Any] = {
            "name": name,
            "arch": arch_to_json(base),
            "batch_norm": batch_norm,
            "num_classes": num_classes,
            "in_channels": in_channels,
            "dropout": dropout,
            "width": width,
            "head": head,
            "input_size": list(self.input_size),
            "hidden": hidden,
            "init": init,
        }
        if batch_norm and norm_layer is None:
            norm_layer = nn.BatchNorm2d
        self.features, self.layer_names = make_layers(layers, in_channels, norm_layer if batch_norm else None)
        channels = [layer.channels for layer in layers if isinstance(layer, Conv)][-1]
        self.feature_info = self._feature_info(layers, in_channels)
        fh, fw = (s // self.min_size for s in self.input_size)
        self.feature_map_size = (fh, fw)
        if head == "gap":
            self.avgpool: nn.Module = nn.AdaptiveAvgPool2d(1)
            self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(channels, num_classes))
            self.num_features = channels
        else:
            self.avgpool = nn.AdaptiveAvgPool2d((7, 7)) if head == "classic" else nn.Identity()
            in_fc = channels * (49 if head == "classic" else fh * fw)
            self.classifier = nn.Sequential(*self._fc_layers(head, channels, in_fc, hidden, num_classes, dropout, (fh, fw)))
            self.num_features = hidden
        init_weights(self, init)

    @staticmethod
    def _fc_layers(head, channels, in_fc, hidden, num_classes, dropout, fmap) -> list[nn.Module]:
        if head == "dense":
            first: nn.Module = nn.Conv2d(channels, hidden, fmap)
            second: nn.Module = nn.Conv2d(hidden, hidden, 1)
            last: nn.Module = nn.Conv2d(hidden, num_classes, 1)
        else:
            first, second, last = nn.Linear(in_fc, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, num_classes)
        return [first, nn.ReLU(True), nn.Dropout(dropout), second, nn.ReLU(True), nn.Dropout(dropout), last]

    def _feature_info(self, layers: Sequence[Layer], in_channels: int) -> list[dict[str, Any]]:
        """Channels and stride after each pool (timm's ``feature_info``)."""
        info, channels, stride = [], in_channels, 1
        pools = [i for i, m in enumerate(self.features) if isinstance(m, nn.MaxPool2d)]
        for layer in layers:
            if isinstance(layer, Conv):
                channels = layer.channels
            elif isinstance(layer, Pool):
                stride *= 2
                info.append({"num_chs": channels, "reduction": stride, "module": f"features.{pools[len(info)]}"})
        return info

    # ----------------------------------------------------------------------------------------------- input checks
    def _check_size(self, size: tuple[int, int], what: str, minimum: int | tuple[int, int]) -> None:
        mh, mw = size_pair(minimum)
        if size[0] < mh or size[1] < mw:
            reason = (
                f"its {self.num_pools} max-pools halve the size {self.num_pools} times"
                if (mh, mw) == (self.min_size, self.min_size)
                else "the dense head was sized for that training input"
            )
            raise InputSizeError(
                f"{self.name} needs {what} of at least {mh}x{mw} ({reason}), got {size[0]}x{size[1]}: "
                f"pad or resize the images to at least {mh}x{mw}"
            )

    def check_input(self, x: torch.Tensor) -> None:
        """Fail before any layer runs when ``x`` cannot go through this model; one line, with the fix."""
        if x.dim() != 4:
            hint = ": add a batch dimension with x.unsqueeze(0)" if x.dim() == 3 else ""
            raise InputSizeError(f"{self.name} expects a 4-D batch (N, C, H, W), got shape {tuple(x.shape)}{hint}")
        if x.shape[1] != self.in_channels:
            raise InputSizeError(
                f"{self.name} expects {self.in_channels} input channels, got {x.shape[1]}: convert the images "
                f"or build the model with in_channels={x.shape[1]}"
            )
        size = (int(x.shape[2]), int(x.shape[3]))
        if self.head == "fitted" and size != self.input_size:
            h, w = self.input_size
            raise InputSizeError(
                f"{self.name} with the fitted head takes exactly {h}x{w} input (FC1 was sized for it), got "
                f"{size[0]}x{size[1]}: resize the input, or convert with vggnet.to_dense() for larger input"
            )
        self._check_size(size, "input", self.input_size if self.head == "dense" else self.min_size)

    # -------------------------------------------------------------------------------------------------- forward
    def _check_eager_input(self, x: torch.Tensor) -> None:
        """:meth:`check_input`, skipped while tracing or compiling (the checks read shapes as Python ints)."""
        if not (torch.jit.is_tracing() or torch.compiler.is_compiling()):
            self.check_input(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self._check_eager_input(x)
        return self.features(x)

    def forward_score_map(self, x: torch.Tensor) -> torch.Tensor:
        """Dense head only: the class-score map (N, classes, h, w) before spatial averaging."""
        if self.head != "dense":
            raise ConfigError(f"forward_score_map needs the dense head, this model has {self.head!r}: use vggnet.to_dense()")
        return self.classifier(self.forward_features(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        last = self.classifier[-1]
        if self.head == "dense":
            for module in self.classifier[:-1]:
                x = module(x)
            return x.mean((2, 3)) if pre_logits else last(x).mean((2, 3))
        x = torch.flatten(self.avgpool(x), 1)
        for module in self.classifier[:-1]:
            x = module(x)
        return x if pre_logits else last(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_named(self, x: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """Feature maps of the named layers (``relu1_2``, ``conv3_1``, ``pool4`` ...), running only as far as needed."""
        if not names:
            raise ConfigError(f"forward_named needs at least one layer name, e.g. {', '.join(list(self.layer_names)[:3])}")
        unknown = [n for n in names if n not in self.layer_names]
        if unknown:
            raise ConfigError(f"unknown layer name(s) {unknown}: this model has {', '.join(self.layer_names)}")
        wanted = {self.layer_names[n]: n for n in names}
        self._check_eager_input(x)
        return tap(list(self.features), x, wanted)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the last layer with a freshly initialised one of ``num_classes`` outputs."""
        last = self.classifier[-1]
        if isinstance(last, nn.Conv2d):
            new: nn.Module = nn.Conv2d(last.in_channels, num_classes, 1)
        else:
            new = nn.Linear(last.in_features, num_classes)
        nn.init.normal_(new.weight, 0, 0.01)
        nn.init.zeros_(new.bias)
        self.classifier[-1] = new.to(last.weight.device, last.weight.dtype)
        self.num_classes = num_classes
        self.config["num_classes"] = num_classes


def init_weights(model: VGG, scheme: str) -> None:
    """Initialise in place. Conv layers of ``features`` and the FC layers of the head are treated separately."""
    for module in model.features.modules():
        if isinstance(module, nn.Conv2d):
            if scheme == "torchvision":
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif scheme == "paper":
                nn.init.normal_(module.weight, 0, 0.01)
            else:
                nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm, nn.SyncBatchNorm)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    for module in model.classifier.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            if scheme == "xavier":
                nn.init.xavier_uniform_(module.weight)
            else:
                nn.init.normal_(module.weight, 0, 0.01)
            nn.init.zeros_(module.bias)


def tap(modules: Sequence[nn.Module], x: torch.Tensor, wanted: dict[int, Any]) -> dict[Any, torch.Tensor]:
    """Run ``modules`` on ``x`` as far as the last index in ``wanted`` and keep the output of each wanted index under
    its key. A map that the next module would overwrite (an in-place ReLU) is kept as a copy. The one tap loop of
    :meth:`VGG.forward_named`, :class:`~vggnet.net.features_only.FeaturesOnly` and the perceptual loss."""
    out: dict[Any, torch.Tensor] = {}
    for i in range(max(wanted) + 1):
        x = modules[i](x)
        if i in wanted:
            following = modules[i + 1] if i + 1 < len(modules) else None
            out[wanted[i]] = x.clone() if getattr(following, "inplace", False) else x
    return out


class SkipInit(TorchFunctionMode):
    """Make the ``torch.nn.init`` initialisers (and the in-place random fills under them) do nothing: for a skeleton on
    the meta device whose every tensor a file will replace (initialising a VGG-16 costs seconds)."""

    SKIPPED = {getattr(nn.init, name) for name in ("normal_", "uniform_", "kaiming_normal_", "kaiming_uniform_",
                                                   "xavier_uniform_", "xavier_normal_", "zeros_", "ones_",
                                                   "constant_", "trunc_normal_")}
    SKIPPED |= {torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.zero_, torch.Tensor.fill_}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.SKIPPED:
            return args[0] if args else kwargs.get("tensor")
        return func(*args, **(kwargs or {}))


# ------------------------------------------------------------------------------------------------------ registry
def list_models(pattern: str | None = None) -> list[str]:
    """Registry names, optionally filtered by a shell-style pattern (``"vgg16*"``)."""
    names = sorted(MODELS, key=lambda n: (int(n[3:5]), n))
    return [n for n in names if pattern is None or fnmatch.fnmatch(n, pattern)]


def create_model(name: str, **kwargs: Any) -> VGG:
    """Build a registered VGG (``vgg16_bn``) or ``"custom"`` with ``arch=``, randomly initialised. ``None`` kwargs are
    dropped, so a caller's unset option never overrides the model's default. Weights files and the features-only
    wrapper are assembled one layer up (:func:`vggnet.store.build.create_model`, which ``vggnet.create_model`` is)."""
    return _build(name, {k: v for k, v in kwargs.items() if v is not None})


def _build(name: str, kwargs: dict[str, Any]) -> VGG:
    if name == "custom":
        if "arch" not in kwargs:
            raise ConfigError("model 'custom' needs arch=, e.g. [64, 'M', 128, 'M', ...] or ((1, 64), (1, 128), ...)")
        return VGG(name="custom", **kwargs)
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}: choose one of {', '.join(list_models())}, or 'custom' with arch=")
    if "arch" in kwargs:
        raise ConfigError(f"model {name!r} has a fixed architecture: use 'custom' to pass arch=")
    letter, batch_norm = MODELS[name]
    kwargs.setdefault("batch_norm", batch_norm)
    return VGG(CFGS[letter], name=name, **kwargs)


def model_from_config(config: dict[str, Any]) -> VGG:
    """Rebuild a model from ``model.config`` (as stored in checkpoints)."""
    config = dict(config)
    name = config.pop("name", "custom")
    return VGG(name=name, **config)
