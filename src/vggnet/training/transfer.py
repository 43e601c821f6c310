"""Starting a run from another model's weights (``vggnet train --init-from SOURCE``), freezing layers, and the
optimizer's learning-rate groups for loaded layers. Model-agnostic where it can be; :mod:`vggnet.net.models` never
learns where its weights came from.

**What loads.** Layers are named by the model's own naming: VGG's :attr:`~vggnet.VGG.layer_names` inside
``features`` (``conv1_1``, ``bn1_1``), the module path elsewhere (``classifier.6``). So a VGG-11's ``conv3_1``
meets a VGG-16's ``conv3_1`` although their state-dict indices differ, and a ``_bn`` model's convs meet a plain
model's. A layer loads whole (every parameter and buffer) when SOURCE has a layer of that name with the same tensor
names and shapes; shapes decide, so layers of another width do not load. Scheme ``all`` (the default) loads every
such layer; scheme ``paper`` is section 3.1's init-from-A (:func:`paper_pairs`). Every other layer keeps the new
model's own initialisation and is listed with the reason in a :class:`TransferRecord`. A SOURCE that is another
network is refused (:func:`init_from_source`, a ConfigError naming the options that build SOURCE's architecture):
when nothing loads, or fewer than :data:`MIN_CONV_SHARE` of the convolution layers the model shares with SOURCE by
name (as the scheme pairs them) -- another width fits none, though the classic head's FC2 and FC3 would.

**The head.** The new model's last layer is re-initialised when the run's class names differ from SOURCE's (a new
head for the dataset's classes), even when their number is the same: its outputs would mean other classes. Other
input sizes need nothing: the classic head's adaptive pooling takes any size, so its FC layers load; a fitted head
at another size (FC1 sized to the feature map) or a head of another kind does not fit and is re-initialised.

**The first conv and the image's channels** (timm's ``adapt_input_conv``, generalised from S = 3): from S channels
to 1, the sum of SOURCE's kernels over its channels; to N > 1, the kernels repeated cyclically (channel j takes
SOURCE's channel j mod S) and scaled by S/N, so that the response to an image whose channels are all equal does not
change. Normalisation: the run keeps its own (``--normalize``, computed on its own training images); nothing is
folded into the weights. The adapted model on a grey image is exactly SOURCE on that image replicated to S channels
when both preprocessings map a pixel value to the same number in every channel: SOURCE's per-channel mean and std
all equal and equal to the run's (``--normalize none`` on both, for one). With other statistics the sum is the usual
approximation: no choice of kernel and bias makes it exact, because the zero padding is applied after normalisation.

**Freezing** (``--freeze``): the named layers' parameters get ``requires_grad=False`` (the optimizer never sees
them), and the BatchNorm layers among them stay in eval mode while the model trains (a forward pre-hook): they
normalise with their running statistics and never update them, so a frozen layer leaves training bit-identical.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Sequence

import torch
from torch import nn

from vggnet.base.errors import CheckpointError, ConfigError, VggnetError
from vggnet.store.load import load

INIT_SCHEMES = ("all", "paper")
#: Section 3.1: the deeper nets took "the first four convolutional layers and the last three fully-connected
#: layers" from the trained net A; the rest was initialised randomly.
PAPER_CONVS, PAPER_FCS = 4, 3
#: The least fraction of the convolution layers a model shares with SOURCE (by name, as the scheme pairs them) that
#: must load for ``--init-from`` to go on: below it SOURCE is another network (another width: none loads).
MIN_CONV_SHARE = 0.5
PAPER_REST = "random in the paper scheme: not among SOURCE's first four convs and last three FC layers"
_CONV = re.compile(r"conv(\d+)_(\d+)")


@dataclass
class TransferRecord:
    """What ``--init-from`` did to a new model; kept in config.json (``init_record``), so resume never reads SOURCE."""

    source: str  # as given to --init-from
    scheme: str = "all"  # one of INIT_SCHEMES
    loaded: list[str] = field(default_factory=list)  # layers whose tensors came from SOURCE, in model order
    tensors: int = 0  # tensors loaded (parameters and buffers)
    adapted: dict[str, str] = field(default_factory=dict)  # loaded layers changed on the way, and how
    reinitialised: dict[str, str] = field(default_factory=dict)  # layer -> why it keeps the new model's init

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> "TransferRecord":
        if not isinstance(d, dict) or not isinstance(d.get("loaded"), list) or "source" not in d:
            raise CheckpointError(f"init_record must be an object with source and loaded, got {d!r}")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def summary(self) -> str:
        """One line: ``loaded 26 tensors from SOURCE; re-initialised: classifier.6 (new head for 10 classes)``."""
        head = f"loaded {self.tensors} tensors from {self.source}"
        if self.scheme != "all":
            head += f" ({self.scheme} scheme: {', '.join(self.loaded)})"
        parts = [head, *(f"{layer} adapted: {how}" for layer, how in self.adapted.items())]
        by_reason: dict[str, list[str]] = {}
        for layer, why in self.reinitialised.items():
            by_reason.setdefault(why, []).append(layer)
        parts.append("re-initialised: " + ("; ".join(f"{', '.join(layers)} ({why})" for why, layers in
                                                      by_reason.items()) or "none"))
        return "; ".join(parts)


# ------------------------------------------------------------------------------------------------------- naming
def model_layers(model: nn.Module) -> dict[str, dict[str, str]]:
    """``{layer: {tensor name: state-dict key}}`` in state-dict order, by the model's own layer names."""
    named = {f"features.{i}": name for name, i in getattr(model, "layer_names", {}).items()}
    layers: dict[str, dict[str, str]] = {}
    for key in model.state_dict():
        module, _, leaf = key.rpartition(".")
        layers.setdefault(named.get(module, module), {})[leaf] = key
    return layers


def layer_module(model: nn.Module, layer: str) -> nn.Module:
    """The module of ``layer`` (a name from :func:`model_layers`)."""
    return model.get_submodule(layer_path(model, layer))


def layer_path(model: nn.Module, layer: str) -> str:
    """The module path of ``layer``: ``features.4`` for a VGG's ``conv2_1``; other layers are named by their path."""
    index = getattr(model, "layer_names", {}).get(layer)
    return layer if index is None else f"features.{index}"


# ------------------------------------------------------------------------------------------------- input conv
def adapt_input_conv(weight: torch.Tensor, channels: int) -> torch.Tensor:
    """A first conv's ``weight`` (out, S, kh, kw) for ``channels`` input channels: for 1, the sum over the S channels;
    for N > 1, the kernels repeated cyclically and scaled by S/N (timm's ``adapt_input_conv`` for S = 3)."""
    source = weight.shape[1]
    w = weight.float()
    if channels == 1:
        adapted = w.sum(1, keepdim=True)
    else:
        adapted = w.repeat(1, -(-channels // source), 1, 1)[:, :channels] * (source / channels)
    return adapted.to(weight.dtype)


def _how_adapted(source: int, channels: int) -> str:
    rule = ("the sum of the kernels" if channels == 1 else
            f"the kernels repeated cyclically, times {source}/{channels}")
    return f"{source} -> {channels} input channels, {rule}"


def _adaptable(mine: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> bool:
    """Conv weights that differ in their input channels only (and equal biases)."""
    a, b = mine["weight"], theirs["weight"]
    return (a.dim() == 4 and b.dim() == 4 and a.shape[0] == b.shape[0] and a.shape[2:] == b.shape[2:]
            and all(mine[k].shape == theirs[k].shape for k in mine if k != "weight"))


# ---------------------------------------------------------------------------------------------------- matching
def paper_pairs(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, str]:
    """Section 3.1's init-from-A as ``{our layer: SOURCE's layer}``.

    SOURCE's first four convs, in order (A's conv1_1, conv2_1, conv3_1, conv3_2), with their BN layers, load into our
    layers of the same names: the same block and position in it. (Mapped by order instead, a VGG-13's second conv,
    conv1_2 with 64 -> 64 channels, would receive A's conv2_1 with 64 -> 128.) SOURCE's last three FC layers (the
    head's weight layers) load into our last three, counted from the end: FC3 into FC3."""
    pairs: dict[str, str] = {}
    for conv in [layer for layer in theirs if _CONV.fullmatch(layer)][:PAPER_CONVS]:
        for layer in (conv, "bn" + conv[4:]):
            if layer in ours:
                pairs[layer] = layer
    head_ours = [layer for layer in ours if layer.startswith("classifier.")][-PAPER_FCS:]
    head_theirs = [layer for layer in theirs if layer.startswith("classifier.")][-PAPER_FCS:]
    pairs.update(zip(reversed(head_ours), reversed(head_theirs)))
    return pairs


@torch.no_grad()
def transfer_weights(target: nn.Module, source: nn.Module, *, scheme: str = "all", name: str = "SOURCE",
                     classes: Sequence[str] | None = None, source_classes: Sequence[str] | None = None,
                     features_only: bool = False) -> TransferRecord:
    """Copy into ``target``, in place, every layer of ``source`` that fits (module docstring); the record says what.

    ``classes`` and ``source_classes``: the class names of each; when both are given and differ, ``target``'s last
    layer is re-initialised (it keeps the initial weights ``target`` was built with). ``features_only``: only
    ``source``'s convolutional part is real (a Keras notop file); its head counts as absent."""
    if scheme not in INIT_SCHEMES:
        raise ConfigError(f"--init-scheme must be one of {', '.join(INIT_SCHEMES)}, got {scheme!r}")
    ours, theirs = model_layers(target), model_layers(source)
    if features_only:
        theirs = {layer: leaves for layer, leaves in theirs.items()
                  if all(key.startswith("features.") for key in leaves.values())}
    mine, their_state = target.state_dict(), source.state_dict()  # ours alias target's tensors
    pairs = paper_pairs(ours, theirs) if scheme == "paper" else {layer: layer for layer in ours}
    first = next((layer for layer, leaves in ours.items() if "weight" in leaves), None)  # the image's conv
    input_conv = first if first is not None and mine[ours[first]["weight"]].dim() == 4 else None
    head = list(ours)[-1] if ours else None
    new_head = classes is not None and source_classes is not None and list(classes) != list(source_classes)
    record = TransferRecord(name, scheme)
    for layer, leaves in ours.items():
        origin = pairs.get(layer)
        here = {leaf: mine[key] for leaf, key in leaves.items()}
        there = {leaf: their_state[key] for leaf, key in theirs.get(origin, {}).items()}
        if layer == head and new_head:
            differ = ", named differently from SOURCE's" if len(classes) == len(source_classes) else ""
            why = f"new head for {len(classes)} classes{differ}"
        elif origin is None:
            why = PAPER_REST
        elif not there:
            why = "not in SOURCE" if origin == layer else f"SOURCE has no {origin}"
        elif set(there) != set(here):
            why = f"SOURCE's {origin} holds other tensors ({', '.join(sorted(there))})"
        else:
            why = None
            wrong = [leaf for leaf in here if here[leaf].shape != there[leaf].shape]
            if wrong and layer == input_conv and _adaptable(here, there):
                record.adapted[layer] = _how_adapted(there["weight"].shape[1], here["weight"].shape[1])
                there["weight"] = adapt_input_conv(there["weight"], here["weight"].shape[1])
            elif wrong:
                leaf = wrong[0]
                if layer == head and here[leaf].shape[0] != there[leaf].shape[0]:
                    why = f"new head for {here[leaf].shape[0]} classes"
                else:
                    why = (f"{leaf} shape {list(here[leaf].shape)}, SOURCE's {origin} has "
                           f"{list(there[leaf].shape)}")
        if why is not None:
            record.reinitialised[layer] = why
            continue
        for leaf, tensor in here.items():
            tensor.copy_(there[leaf])
        record.loaded.append(layer)
        record.tensors += len(here)
    return record


def _describe(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    if not isinstance(config, dict):
        return type(model).__name__
    return (f"{config.get('name')} (arch {config.get('arch')}, width {config.get('width')}, {config.get('head')} head, "
            f"{config.get('in_channels')} input channel(s))")


def shared_convs(target: nn.Module, source: nn.Module, scheme: str = "all") -> list[str]:
    """``target``'s convolution layers that ``scheme`` pairs with a convolution layer ``source`` has, in model order
    (whether their shapes fit or not)."""
    ours, theirs = model_layers(target), model_layers(source)
    pairs = paper_pairs(ours, theirs) if scheme == "paper" else {layer: layer for layer in ours}
    return [layer for layer in ours if _CONV.fullmatch(layer) and pairs.get(layer) in theirs]


def _suggestion(model: nn.Module, source: nn.Module) -> str:
    """The options that would build SOURCE's architecture, where the two configs differ in them."""
    mine, theirs = getattr(model, "config", {}), getattr(source, "config", {})
    options = []
    if mine.get("name") != theirs.get("name"):
        options.append(f"--model {theirs.get('name')}")
    if theirs.get("name") == "custom" and mine.get("arch") != theirs.get("arch"):
        options.append(f"--arch {','.join(map(str, theirs.get('arch') or []))}")
    if mine.get("width") != theirs.get("width") and isinstance(theirs.get("width"), (int, float)):
        options.append(f"--width {theirs['width']:g}")
    return " ".join(options) if options else "--model, --arch, --width as SOURCE's"


def _check_convs(model: nn.Module, source: nn.Module, record: TransferRecord, name: str) -> None:
    """ConfigError when fewer than :data:`MIN_CONV_SHARE` of the convolution layers ``model`` shares with SOURCE
    loaded: SOURCE is another network (another width, other channels), and training on would fine-tune nothing."""
    shared = shared_convs(model, source, record.scheme)
    failed = [layer for layer in shared if layer not in record.loaded]
    if not shared or len(shared) - len(failed) >= MIN_CONV_SHARE * len(shared):
        return
    raise ConfigError(f"--init-from {name}: only {len(shared) - len(failed)} of the {len(shared)} convolution layers "
                      f"SOURCE shares with the model to train fit it ({failed[0]}: "
                      f"{record.reinitialised.get(failed[0], 'does not fit')}); SOURCE is {_describe(source)}, the "
                      f"model to train {_describe(model)}: train SOURCE's architecture ({_suggestion(model, source)})")


def init_from_source(model: nn.Module, source: str, scheme: str = "all",
                     classes: Sequence[str] | None = None) -> TransferRecord:
    """Load ``source`` with :func:`vggnet.load` (run directory or weights file; it draws no random numbers, so the
    run's random state does not depend on SOURCE) and copy what fits into ``model``. ConfigError when nothing fits,
    and when fewer than half of the convolution layers the two share fit (:func:`_check_convs`)."""
    try:
        loaded = load(source)  # built on the meta device and filled: no random draws
    except VggnetError as err:
        raise CheckpointError(f"--init-from {source}: {err}") from None
    record = transfer_weights(model, loaded.model, scheme=scheme, name=str(source), classes=classes,
                              source_classes=loaded.classes, features_only=loaded.features_only)
    if record.tensors == 0:
        raise ConfigError(f"--init-from {source}: none of its layers fits the model to train, {_describe(model)}; "
                          f"SOURCE is {_describe(loaded.model)}: train SOURCE's architecture (--model, --arch, "
                          "--width, --head as SOURCE's)")
    _check_convs(model, loaded.model, record, str(source))
    return record


# ---------------------------------------------------------------------------------------------------- freezing
def freeze_choices(model: nn.Module) -> list[str]:
    """What ``--freeze`` accepts for ``model``: features, block1.., conv1_1.., classifier."""
    layers = list(model_layers(model))
    convs = [layer for layer in layers if _CONV.fullmatch(layer)]
    blocks = sorted({int(_CONV.fullmatch(conv).group(1)) for conv in convs})
    parts = [part for part in ("features", "classifier") if any(layer_path(model, layer).startswith(part + ".")
                                                                   for layer in layers)]
    return parts[:1] + [f"block{b}" for b in blocks] + convs + parts[1:]


def _covers(model: nn.Module, name: str, layer: str) -> bool:
    if name in ("features", "classifier"):
        return layer_path(model, layer).startswith(name + ".")
    block = re.fullmatch(r"block(\d+)", name)
    if block:
        return re.fullmatch(rf"(conv|bn){block.group(1)}_\d+", layer) is not None
    return layer in (name, "bn" + name[4:]) if _CONV.fullmatch(name) else False


def frozen_layers(model: nn.Module, names: Sequence[str]) -> list[str]:
    """The layers ``names`` cover (a conv with its BN), in model order; ConfigError naming the valid names."""
    choices = freeze_choices(model)
    unknown = [name for name in names if name not in choices]
    if unknown:
        raise ConfigError(f"--freeze {','.join(unknown)}: no such layer in {getattr(model, 'name', 'the model')}; "
                          f"choose from {', '.join(choices)}")
    return [layer for layer in model_layers(model) if any(_covers(model, name, layer) for name in names)]


def freeze(model: nn.Module, names: Sequence[str]) -> list[str]:
    """``requires_grad=False`` on the parameters of the layers ``names`` cover; returns those layers. Call
    :func:`hold_in_eval` on them once the model is in its final form (after any DDP / SyncBatchNorm wrapping)."""
    layers = frozen_layers(model, names)
    for layer in layers:
        for parameter in layer_module(model, layer).parameters():
            parameter.requires_grad_(False)
    return layers


def _stay_in_eval(module: nn.Module, _args: Any) -> None:
    module.train(False)


def hold_in_eval(model: nn.Module, layers: Sequence[str]) -> list[str]:
    """Keep the BatchNorm layers among ``layers`` in eval mode whatever ``model.train()`` says (a forward pre-hook):
    they normalise with their running statistics and do not update them. Returns those layers."""
    held = []
    for layer in layers:
        module = layer_module(model, layer)
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)):
            module.register_forward_pre_hook(_stay_in_eval)
            held.append(layer)
    return held


# ------------------------------------------------------------------------------------------- optimizer groups
def parameter_groups(model: nn.Module, weight_decay: float, loaded: Sequence[str] = (),
                     lr_scale: float = 1.0) -> list[dict[str, Any]]:
    """Optimizer groups: weight decay on conv/linear weights (dim > 1) only, not on biases or BN parameters; with
    ``loaded`` layers, their parameters in two more groups whose ``lr_scale`` multiplies the schedule's rate
    (:func:`vggnet.training.loop.train_step`). Frozen parameters (``requires_grad`` False) are left out."""
    from_source = {id(p) for layer in loaded for p in layer_module(model, layer).parameters()}
    groups = []
    for scale, wanted in ((1.0, False), (lr_scale, True))[:2 if loaded else 1]:
        params = [p for p in model.parameters() if p.requires_grad and (id(p) in from_source) == wanted]
        groups.append({"params": [p for p in params if p.dim() > 1], "weight_decay": weight_decay, "lr_scale": scale})
        groups.append({"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0, "lr_scale": scale})
    return groups
