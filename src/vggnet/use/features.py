"""Feature maps of a trained VGG's named layers for image files (``vggnet features``).

Image files -> named layers::

    loaded = vggnet.load("runs/RUN")
    result = extract_features(loaded, ["a.jpg", "b.png"], ["relu5_3"], pool="avg")   # Features
    result.maps["relu5_3"]          # float32 (2, 512): row i is result.files[i]
    save_features("feats.safetensors", result)                                      # atomic; metadata inside

Each file is decoded and preprocessed exactly as ``vggnet predict`` does it (:meth:`~vggnet.store.card.LoadedModel.decode_files`,
then the model's own :class:`~vggnet.data.Preprocess`), and the maps are what :meth:`VGG.forward_named` returns on
that batch, optionally reduced over space (``pool``: ``avg`` or ``max`` -> ``(n, C)``; ``none`` keeps
``(n, C, h, w)``). Layer names are the model's ``layer_names``: ``conv3_1``, ``bn3_1``, ``relu3_1``, ``pool3`` ...
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

from vggnet.base.guard import json_of, output_file
from vggnet.net.models import VGG
from vggnet.base.errors import CheckpointError, ConfigError, DataError
from vggnet.base.files import atomic_write_bytes, atomic_write_json, load_tensors, read_json, read_metadata
from vggnet.evaluation.inference import optimize_for_inference
from vggnet.evaluation.metrics import auto_batch_size
from vggnet.runtime import resolve_runtime
from vggnet.store.load import load

#: Spatial reductions of a layer's map: ``none`` keeps (n, C, h, w); ``avg``/``max`` give (n, C).
POOLS = ("none", "avg", "max")
#: Output formats by file extension: a .npy holds one array (one layer), a .safetensors one tensor per layer.
FORMATS = (".npy", ".safetensors")
#: Name and version of the metadata written beside (.npy) or inside (.safetensors) the features.
METADATA_FORMAT, METADATA_VERSION = "vggnet-features", 1
#: Who writes the files, in the guard's refusals.
WRITER = "vggnet features"


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
    """The folded copy of :func:`vggnet.evaluation.inference.optimize_for_inference` (a ``VGG`` whose ``forward_named`` takes
    input in ``precision``), with only the rewrites that keep the outputs of ``layers``: no BN folding when a
    ``conv`` output is asked for (it would come out normalised), no conv+ReLU fusion unless every layer is a
    ``relu``, ``lrn`` or ``pool`` output (a fused conv hands back its ReLU's output)."""
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

    ``loaded``: a :class:`~vggnet.store.card.LoadedModel` or what :func:`vggnet.load` takes. ``runtime``: a
    :class:`~vggnet.runtime.Runtime` (default: fp32 on the CPU). Files are decoded ``batch_size`` at a time
    (default :func:`vggnet.evaluation.metrics.auto_batch_size`); an unreadable file is listed in ``failed`` and does not
    stop the others. ``progress`` draws a bar on terminals. The model runs in eval mode and is put back in its mode.
    """
    from tqdm.auto import tqdm

    source = None
    if isinstance(loaded, (str, os.PathLike)):
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
                images, where, errors = loaded.decode_files(batch)
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
def check_output(path: str | os.PathLike, n_layers: int, inputs: Sequence[str | os.PathLike] = ()) -> str:
    """The format (``.npy`` or ``.safetensors``) of output ``path`` for ``n_layers`` layers; one-line errors for
    another extension or several layers in a .npy (:class:`ConfigError`), and where :mod:`vggnet.base.guard` refuses
    the file or the .npy's sidecar (:class:`OutputError`: a missing folder, one of ``inputs``, a file that vggnet
    features did not write). Call it before the work."""
    path = Path(path)
    kind = path.suffix.lower()
    if kind not in FORMATS:
        raise ConfigError(f"the output file must end in .npy (one layer) or .safetensors (one tensor per layer), "
                          f"got {str(path)!r}")
    if kind == ".npy" and n_layers > 1:
        raise ConfigError(f"a .npy file holds one array, but {n_layers} layers were asked for: write "
                          f"{path.with_suffix('.safetensors')} (one tensor per layer) or ask for one layer")
    inputs = [str(item) for item in inputs]
    output_file(path, inputs=inputs, owned=written_by_features, example="features.safetensors", writer=WRITER)
    if kind == ".npy":
        output_file(sidecar(path), inputs=inputs, owned=_is_metadata, writer=WRITER)
    return kind


def _is_metadata(path: Path) -> bool:
    meta = json_of(path)
    return isinstance(meta, dict) and meta.get("format") == METADATA_FORMAT


def written_by_features(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a file :func:`save_features` wrote: a .npy with its metadata beside it, a .safetensors
    with the metadata in its header."""
    path = Path(path)
    if path.suffix.lower() == ".npy":
        return _is_metadata(sidecar(path))
    return read_metadata(path).get("format") == json.dumps(METADATA_FORMAT)


def sidecar(path: str | os.PathLike) -> Path:
    """The JSON metadata beside a .npy output: ``feats.npy`` -> ``feats.npy.json``."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def save_features(path: str | os.PathLike, result: Features) -> list[Path]:
    """Write ``result`` atomically: a .npy array plus its JSON sidecar (:func:`sidecar`), or a .safetensors file with
    one tensor per layer and the metadata (each value JSON-encoded) in its header. Returns the files written."""
    from safetensors.torch import save as st_save

    path = Path(path)
    kind = check_output(path, len(result.layers), [*result.files, *(file for file, _ in result.failed)])
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
