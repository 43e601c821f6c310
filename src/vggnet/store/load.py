"""The one loader of a SOURCE: a vggnet run directory or a weights file (``vggnet.load``, ``predict``, ``eval``...).

A directory is a run (:class:`vggnet.store.rundir.RunDir`). A file is recognised by its content: a safetensors file
that carries a vggnet card (a run's ``model.safetensors``, copied anywhere) loads with that card
(:func:`vggnet.store.card.load_weights_file`), so it predicts exactly as its run directory does; any other file is
another toolkit's (torchvision, timm, Keras: :func:`vggnet.store.weights.load_file`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from vggnet.base.errors import CheckpointError
from vggnet.store.card import LoadedModel, load_weights_file
from vggnet.store.rundir import RunDir
from vggnet.store.weights import load_file, sniff


def load(source: str | os.PathLike, weights: str = "model", device: str | torch.device = "cpu",
         model: str | None = None) -> LoadedModel:
    """The model of ``source`` with its preprocessing and class names, in eval mode on ``device``.

    A run directory: ``weights`` picks ``model`` (final) or ``best``; its card fixes the architecture, so ``model``
    must be None. A weights file: ``model`` (a registry name) overrides the architecture read from another toolkit's
    file (a vggnet file's card fixes it); ``weights`` must stay ``"model"`` (a file holds one set of weights)."""
    path = Path(source)
    if path.is_dir():
        if model is not None:
            raise CheckpointError(f"{path} is a run directory, whose model.json fixes the architecture: a model "
                                  f"override ({model!r}) applies to weights files only")
        return RunDir(path).load(weights, device)
    if path.is_file():
        if weights != "model":
            raise CheckpointError(f"{path} is a weights file, which holds one set of weights: weights={weights!r} "
                                  "(final/best) applies to run directories only")
        loaded = _load_vggnet_file(path, device, model)
        return loaded if loaded is not None else load_file(path, model, device)
    raise CheckpointError(f"{path} does not exist: give a run directory written by vggnet train or a weights file "
                          "(vggnet's model.safetensors, torchvision .pth, timm .safetensors, Keras .h5)")


def _load_vggnet_file(path: Path, device: str | torch.device, model: str | None) -> LoadedModel | None:
    """``path`` loaded with its embedded vggnet card; None when it is not a vggnet file."""
    try:
        container = sniff(path)
    except OSError as err:
        raise CheckpointError(f"{path} cannot be read ({err.strerror or err})") from None
    if container != "safetensors":
        return None
    loaded = load_weights_file(path, device)
    if loaded is not None and model is not None and model != loaded.model.name:
        raise CheckpointError(f"{path} is a vggnet weights file whose card fixes the architecture "
                              f"({loaded.model.name}): leave out the model override ({model!r})")
    return loaded
