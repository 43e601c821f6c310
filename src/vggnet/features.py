"""Feature maps of a trained VGG: of image files (``vggnet features``), and as a timm-style ``features_only`` model.

Image files -> named layers::

    loaded = vggnet.load("runs/RUN")
    result = extract_features(loaded, ["a.jpg", "b.png"], ["relu5_3"], pool="avg")   # Features
    result.maps["relu5_3"]          # float32 (2, 512): row i is result.files[i]
    save_features("feats.safetensors", result)                                      # atomic; metadata inside

Each file is decoded and preprocessed exactly as ``vggnet predict`` does it (:func:`vggnet.predict.decode_files`,
then the model's own :class:`~vggnet.data.Preprocess`), and the maps are what :meth:`VGG.forward_named` returns on
that batch, optionally reduced over space (``pool``: ``avg`` or ``max`` -> ``(n, C)``; ``none`` keeps
``(n, C, h, w)``). Layer names are the model's ``layer_names``: ``conv3_1``, ``bn3_1``, ``relu3_1``, ``pool3`` ...

Stage outputs (``FeaturesOnly``): one map per entry of the model's ``feature_info``, i.e. the output of each
block's max-pool (reductions 2, 4, 8, 16, 32 for the five-block VGGs), so its ``feature_info`` is the model's.
timm's VGG differs: its stages are the last ReLU *before* each pool (reductions 1 to 16) plus the last pool's
output (32); those pre-pool maps are ``relu1_2``, ``relu2_2`` ... through :meth:`VGG.forward_named` here.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .errors import ConfigError, DataError, InputSizeError
from .models import VGG

#: Spatial reductions of a layer's map: ``none`` keeps (n, C, h, w); ``avg``/``max`` give (n, C).
POOLS = ("none", "avg", "max")
#: Output formats by file extension: a .npy holds one array (one layer), a .safetensors one tensor per layer.
FORMATS = (".npy", ".safetensors")
#: Name and version of the metadata written beside (.npy) or inside (.safetensors) the features.
METADATA_FORMAT, METADATA_VERSION = "vggnet-features", 1


# ------------------------------------------------------------------------------------------------ layer names
def check_layers(model: VGG, layers: Sequence[str]) -> list[str]:
    """``layers`` without repeats, in order; an unknown name fails in one line listing the model's names."""
    if isinstance(layers, str):
        layers = [layers]
    wanted = list(dict.fromkeys(layers))
    if not wanted:
        raise ConfigError(f"name at least one layer, e.g. {', '.join(list(model.layer_names)[-3:])}")
    unknown = [name for name in wanted if name not in model.layer_names]
    if unknown:
        raise ConfigError(f"unknown layer {', '.join(map(repr, unknown))}: {model.name} has "
                          f"{', '.join(model.layer_names)}")
    return wanted


def pool_map(x: torch.Tensor, pool: str) -> torch.Tensor:
    """(n, C, h, w) -> (n, C) by the spatial mean (``avg``) or maximum (``max``); ``none`` returns ``x``."""
    if pool == "avg":
        return x.mean((2, 3))
    if pool == "max":
        return x.amax((2, 3))
    if pool == "none":
        return x
    raise ConfigError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")


# ------------------------------------------------------------------------------------------- image files -> maps
@dataclass
class Features:
    """Feature maps of image files: row ``i`` of every tensor belongs to ``files[i]`` (the readable files, in the
    order given); ``failed`` holds ``(file, message)`` for each file that could not be read."""

    maps: dict[str, torch.Tensor]  # layer -> float32 (n, C, h, w), or (n, C) when pooled; empty when n == 0
    files: list[str]
    layers: list[str]
    pool: str
    failed: list[tuple[str, str]] = field(default_factory=list)
    source: str | None = None  # what the model was loaded from
    image_size: int | None = None  # the preprocessed input size
    precision: str = "fp32"  # what the model ran in (the maps are float32 regardless)

    def metadata(self) -> dict[str, Any]:
        """What ``save_features`` records: file order, layers, pool, shapes and where they came from."""
        return {"format": METADATA_FORMAT, "version": METADATA_VERSION, "source": self.source,
                "files": list(self.files), "failed": [file for file, _ in self.failed], "layers": list(self.layers),
                "pool": self.pool, "shapes": {name: list(t.shape) for name, t in self.maps.items()},
                "dtype": "float32", "image_size": self.image_size, "precision": self.precision}


def inference_copy(model: VGG, layers: Sequence[str], precision: str = "bf16", channels_last: bool = True) -> VGG:
    """The folded copy of :func:`vggnet.inference.optimize_for_inference` (a ``VGG`` whose ``forward_named`` takes
    input in ``precision``), with only the rewrites that keep the outputs of ``layers``: no BN folding when a
    ``conv`` output is asked for (it would come out normalised), no conv+ReLU fusion unless every layer is a
    ``relu``, ``lrn`` or ``pool`` output (a fused conv hands back its ReLU's output)."""
    from .inference import optimize_for_inference

    fast = optimize_for_inference(model, precision, channels_last,
                                  fold_bn=not any(name.startswith("conv") for name in layers),
                                  fuse_relu=all(name.startswith(("relu", "lrn", "pool")) for name in layers))
    return fast.model


def _runner(model: VGG, layers: list[str], runtime) -> tuple[Callable[[torch.Tensor], dict], Any]:
    """``(x -> {layer: map}, context to run it in)``: the model under the runtime's autocast, or, where
    :func:`vggnet.runtime.uses_cpu_bf16_path` says so, its bf16 :func:`inference_copy`."""
    if not runtime.cpu_bf16:
        return (lambda x: model.forward_named(x, layers)), runtime.autocast()
    fast = inference_copy(model, layers, "bf16", runtime.channels_last)
    return (lambda x: fast.forward_named(x.to(torch.bfloat16), layers)), contextlib.nullcontext()


def extract_features(loaded, files: Sequence[str | os.PathLike], layers: Sequence[str], pool: str = "none",
                     runtime=None, batch_size: int | None = None, progress: bool = False) -> Features:
    """The maps of ``layers`` for each image file, decoded and preprocessed as ``vggnet predict`` does.

    ``loaded``: a :class:`~vggnet.rundir.LoadedModel` or what :func:`vggnet.load` takes. ``runtime``: a
    :class:`~vggnet.runtime.Runtime` (default: fp32 on the CPU). Files are decoded ``batch_size`` at a time
    (default :func:`vggnet.evaluation.auto_batch_size`); an unreadable file is listed in ``failed`` and does not
    stop the others. ``progress`` draws a bar on terminals. The model runs in eval mode and is put back in its mode.
    """
    from tqdm.auto import tqdm

    from .evaluation import auto_batch_size
    from .predict import decode_files
    from .runtime import resolve_runtime

    source = None
    if isinstance(loaded, (str, os.PathLike)):
        from . import load

        source, loaded = str(loaded), load(loaded)
    model = loaded.model
    layers = check_layers(model, layers)
    if pool not in POOLS:
        raise ConfigError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    runtime = runtime or resolve_runtime("cpu", "fp32", threads=torch.get_num_threads())
    prep = loaded.preprocess
    batch_size = batch_size or auto_batch_size(prep.image_size, prep.image_size)
    files = [str(f) for f in files]
    chunks: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    kept: list[str] = []
    failed: list[tuple[str, str]] = []
    was_training = model.training
    model.to(runtime.device).eval()
    bar = tqdm(total=len(files), unit="img", desc="features", disable=None if progress else True, leave=False)
    try:
        forward, context = _runner(model, layers, runtime)
        with torch.no_grad():
            for start in range(0, len(files), batch_size):
                batch = files[start:start + batch_size]
                images, where, errors = decode_files(loaded, batch)
                failed.extend((batch[position], message) for position, message in errors)
                if images is not None:
                    x = prep(images.to(runtime.device))
                    if runtime.channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)
                    with context:
                        maps = forward(x)
                    for name in layers:
                        chunks[name].append(pool_map(maps[name].float(), pool).cpu())
                    kept.extend(batch[position] for position in where)
                bar.update(len(batch))
    finally:
        bar.close()
        model.train(was_training)
    maps = {name: torch.cat(parts).contiguous() for name, parts in chunks.items()} if kept else {}
    if source is None:
        where_from = getattr(loaded, "run_dir", None)
        source = str(where_from) if where_from is not None else None
    return Features(maps, kept, layers, pool, failed, source, prep.image_size, runtime.precision)


# ------------------------------------------------------------------------------------------------ files
def check_output(path: str | os.PathLike, n_layers: int) -> str:
    """The format (``.npy`` or ``.safetensors``) of output ``path`` for ``n_layers`` layers; one-line errors for
    another extension, several layers in a .npy, or a directory that does not exist. Call it before the work."""
    path = Path(path)
    kind = path.suffix.lower()
    if kind not in FORMATS:
        raise ConfigError(f"the output file must end in .npy (one layer) or .safetensors (one tensor per layer), "
                          f"got {str(path)!r}")
    if kind == ".npy" and n_layers > 1:
        raise ConfigError(f"a .npy file holds one array, but {n_layers} layers were asked for: write "
                          f"{path.with_suffix('.safetensors')} (one tensor per layer) or ask for one layer")
    if not path.parent.is_dir():
        raise ConfigError(f"cannot write {path}: the directory {path.parent} does not exist (create it first)")
    if path.is_dir():
        raise ConfigError(f"cannot write {path}: it is a directory")
    return kind


def sidecar(path: str | os.PathLike) -> Path:
    """The JSON metadata beside a .npy output: ``feats.npy`` -> ``feats.npy.json``."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def save_features(path: str | os.PathLike, result: Features) -> list[Path]:
    """Write ``result`` atomically: a .npy array plus its JSON sidecar (:func:`sidecar`), or a .safetensors file with
    one tensor per layer and the metadata (each value JSON-encoded) in its header. Returns the files written."""
    from safetensors.torch import save as st_save

    from .files import atomic_write_bytes, atomic_write_json

    path = Path(path)
    kind = check_output(path, len(result.layers))
    if not result.maps:
        raise DataError(f"none of the {len(result.files) + len(result.failed)} image file(s) could be read: "
                        f"nothing written to {path}")
    meta = result.metadata()
    if kind == ".npy":
        import numpy as np

        buffer = io.BytesIO()
        np.save(buffer, result.maps[result.layers[0]].numpy(), allow_pickle=False)
        atomic_write_bytes(path, buffer.getvalue())
        atomic_write_json(sidecar(path), meta)
        return [path, sidecar(path)]
    tensors = {name: result.maps[name].contiguous() for name in result.layers}
    atomic_write_bytes(path, st_save(tensors, metadata={k: json.dumps(v) for k, v in meta.items()}))
    return [path]


def load_features(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """What :func:`save_features` wrote: ``({layer: tensor}, metadata)``."""
    from .errors import CheckpointError
    from .files import load_tensors, read_json

    path = Path(path)
    if path.suffix.lower() == ".npy":
        import numpy as np

        meta = read_json(sidecar(path))
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{path} is not a readable .npy file ({err})") from None
        return {meta["layers"][0]: torch.from_numpy(array)}, meta
    from safetensors import safe_open

    tensors = load_tensors(path)
    with safe_open(str(path), "pt") as f:
        raw = f.metadata() or {}
    try:
        meta = {k: json.loads(v) for k, v in raw.items()}
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} has no vggnet features metadata ({err})") from None
    return tensors, meta


# ------------------------------------------------------------------------------------------------ features_only
class FeaturesOnly(nn.Module):
    """timm's ``features_only`` for a :class:`~vggnet.models.VGG`: ``forward(x)`` returns a list of maps, one per
    stage, each the output of that block's max-pool (the module ``feature_info[i]["module"]`` names).

    ``feature_info`` is the model's own (channels ``num_chs``, ``reduction``, ``module``) for the stages kept;
    ``out_indices`` picks stages (default: all). The wrapper shares the model's modules (no copy) and holds only
    ``features`` up to the last stage kept, under the same indices, so ``features.N`` keys match the model's state
    dict. Input must have the model's channel count and at least the last stage's reduction in height and width.
    """

    def __init__(self, model: VGG, out_indices: Sequence[int] | None = None) -> None:
        super().__init__()
        info = model.feature_info
        if not info:
            raise ConfigError(f"{model.name} has no max-pool, so no stages to return")
        if out_indices is None:
            out_indices = range(len(info))
        out_indices = [int(i) for i in out_indices]
        bad = [i for i in out_indices if not -len(info) <= i < len(info)]
        if bad or not out_indices:
            raise ConfigError(f"out_indices must name stages 0..{len(info) - 1} of {model.name}, got {out_indices}")
        out_indices = sorted({i % len(info) for i in out_indices})
        self.out_indices = tuple(out_indices)
        self.feature_info = [dict(info[i]) for i in out_indices]
        self.taps = [int(entry["module"].split(".")[1]) for entry in self.feature_info]
        self.features = nn.Sequential(*list(model.features)[:max(self.taps) + 1])
        self.in_channels = model.in_channels
        self.min_size = self.feature_info[-1]["reduction"]
        self.name = model.name

    def channels(self) -> list[int]:
        return [entry["num_chs"] for entry in self.feature_info]

    def reductions(self) -> list[int]:
        return [entry["reduction"] for entry in self.feature_info]

    def check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4:
            raise InputSizeError(f"{self.name} features expect a 4-D batch (N, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise InputSizeError(f"{self.name} expects {self.in_channels} input channels, got {x.shape[1]}")
        if min(x.shape[2], x.shape[3]) < self.min_size:
            raise InputSizeError(f"{self.name} features to reduction {self.min_size} need input of at least "
                                 f"{self.min_size}x{self.min_size}, got {x.shape[2]}x{x.shape[3]}: pad or resize")

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if not (torch.jit.is_tracing() or torch.compiler.is_compiling()):
            self.check_input(x)
        out = []
        taps = set(self.taps)
        modules = list(self.features)
        for i, module in enumerate(modules):
            x = module(x)
            if i in taps:
                following = modules[i + 1] if i + 1 < len(modules) else None
                out.append(x.clone() if getattr(following, "inplace", False) else x)
        return out


def features_only(model: VGG, out_indices: Sequence[int] | None = None) -> FeaturesOnly:
    """:class:`FeaturesOnly` (``create_model(name, features_only=True)`` in timm)."""
    return FeaturesOnly(model, out_indices)
