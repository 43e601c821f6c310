"""Self-describing, pickle-free checkpoints, written atomically.

A run directory holds:

- ``model.safetensors`` + ``model.json``: the weights and everything needed to rebuild and use the model (the
  architecture config, preprocessing, class names, metrics, vggnet version, file format);
- ``best.safetensors``: the weights of the best epoch so far (same ``model.json`` describes them);
- ``state.safetensors`` + ``state.json``: optimizer tensors and RNG states, and the loop's counters, for resume.

Every file is written to a temporary name in the same directory and renamed into place, so a crash or a signal
never leaves a half-written file under a final name.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .errors import CheckpointError, VggnetError
from .models import VGG, model_from_config

FORMAT = 1  # bump when model.json or the state files change incompatibly
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def _safetensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return st_save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> None:
    atomic_write_bytes(path, _safetensors_bytes(tensors))


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        return st_load(path.read_bytes())
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file ({err}); it may be truncated") from None


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is corrupt ({err})") from None


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with DDP's ``module.`` and torch.compile's ``_orig_mod.`` prefixes stripped."""
    state = model.state_dict()
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def save_model(run_dir: str | os.PathLike, model: torch.nn.Module, meta: dict[str, Any],
               weights_names: Sequence[str] = ("model.safetensors",)) -> None:
    """Write the weights (serialised once, into each of ``weights_names`` in turn) and ``model.json`` with
    ``meta`` plus the model config and format."""
    run_dir = Path(run_dir)
    data = _safetensors_bytes(model_state(model))
    for name in weights_names:
        atomic_write_bytes(run_dir / name, data)
    from . import __version__

    bare = getattr(model, "module", model)
    bare = getattr(bare, "_orig_mod", bare)
    atomic_write_json(run_dir / "model.json", {"format": FORMAT, "vggnet_version": __version__,
                                               "model": bare.config, **meta})


@dataclass
class LoadedModel:
    """A model rebuilt from a run directory, with what is needed to use it."""

    model: VGG
    meta: dict[str, Any]
    run_dir: Path
    classes: list[str] = field(default_factory=list)

    @property
    def preprocess(self):
        from .data import Preprocess

        return Preprocess.from_dict(self.meta["preprocess"])


def read_meta(run_dir: str | os.PathLike) -> dict[str, Any]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory {run_dir} does not exist")
    if not (run_dir / "model.json").is_file():
        raise CheckpointError(f"{run_dir} is not a vggnet run directory (no model.json): train one with vggnet train")
    meta = read_json(run_dir / "model.json")
    if not isinstance(meta, dict) or "format" not in meta or "model" not in meta:
        raise CheckpointError(f"{run_dir / 'model.json'} is not a vggnet model description (no format/model)")
    if meta["format"] != FORMAT:
        raise CheckpointError(
            f"{run_dir} was written in checkpoint format {meta['format']} (vggnet {meta.get('vggnet_version', '?')});"
            f" this vggnet reads format {FORMAT}: use a matching vggnet version"
        )
    return meta


def load(run_dir: str | os.PathLike, weights: str = "model.safetensors", device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild the model of ``run_dir`` from ``model.json`` and load ``weights`` into it (eval mode)."""
    run_dir = Path(run_dir)
    meta = read_meta(run_dir)
    try:
        model = model_from_config(meta["model"])
    except (VggnetError, TypeError) as err:
        raise CheckpointError(f"{run_dir / 'model.json'} describes no buildable model: {err}") from None
    state = load_tensors(run_dir / weights)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        detail = "; ".join(f"{label} {keys[:3]}{'...' if len(keys) > 3 else ''}" for label, keys in
                           (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys)
        raise CheckpointError(f"{run_dir / weights} does not match the architecture in model.json: {detail}")
    model.load_state_dict(state)
    return LoadedModel(model.to(device).eval(), meta, run_dir, list(meta.get("classes", [])))


# ---------------------------------------------------------------------------------------------- training state
def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into tensors (for safetensors) and JSON-able rest."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/{index}/{key}"] = value
            else:
                scalars[f"{index}/{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], rest: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer/"):
            _, index, key = name.split("/", 2)
            state.setdefault(int(index), {})[key] = value
    for name, value in rest["scalars"].items():
        index, key = name.split("/", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": rest["param_groups"]})
