"""A SOURCE of a trained model: a vggnet run directory or a weights file (``vggnet.load``, ``predict``, ``eval``).

:func:`load` only dispatches: a directory goes to :func:`vggnet.rundir.load` (the owner of run directories), a file to
:func:`vggnet.weights.load_file` (torchvision, timm and Keras files, recognised by their content).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import CheckpointError
from .rundir import LoadedModel


def load(source: str | os.PathLike, weights: str = "model", device: str | torch.device = "cpu",
         model: str | None = None) -> LoadedModel:
    """The model of ``source`` with its preprocessing and class names, in eval mode on ``device``.

    A run directory: ``weights`` picks ``model`` (final) or ``best``; its model.json fixes the architecture, so
    ``model`` must be None. A weights file: ``model`` (a registry name) overrides the architecture read from the file;
    ``weights`` must stay ``"model"`` (a file holds one set of weights)."""
    path = Path(source)
    if path.is_dir():
        if model is not None:
            raise CheckpointError(f"{path} is a run directory, whose model.json fixes the architecture: a model "
                                  f"override ({model!r}) applies to weights files only")
        from .rundir import load as load_run

        return load_run(path, weights, device)
    if path.is_file():
        if weights != "model":
            raise CheckpointError(f"{path} is a weights file, which holds one set of weights: weights={weights!r} "
                                  "(final/best) applies to run directories only")
        from .weights import load_file

        return load_file(path, model, device)
    raise CheckpointError(f"{path} does not exist: give a run directory written by vggnet train or a weights file "
                          "(torchvision .pth, timm .safetensors, Keras .h5)")
