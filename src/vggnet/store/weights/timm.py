"""timm's VGG layout (``timm/models/vgg.py``), usually a ``model.safetensors`` from the Hugging Face hub.

timm keeps ``features.*`` exactly as torchvision does but holds the classifier as a convolutional MLP and a head:

- ``pre_logits.fc1``: a ``Conv2d(512, 4096, kernel_size=7)`` over the 7x7 feature map (FC1 as a convolution);
- ``pre_logits.fc2``: a ``Conv2d(4096, 4096, kernel_size=1)`` (FC2);
- ``head.fc``: a ``Linear(4096, classes)`` after global average pooling (FC3).

At 224x224 input the feature map is 7x7, fc1's output is 1x1 and the pooling does nothing, so the network equals
torchvision's: a ``(out, in, k, k)`` kernel flattened to ``(out, in * k * k)`` is the Linear FC1 over the
channel-major (NCHW) flattening, and timm converts torchvision's files the same way in the other direction
(``_filter_fn``). The result loads into vggnet's ``classic`` head.
"""

from __future__ import annotations

import os

import torch

from vggnet.base.errors import CheckpointError

TIMM_KEYS = ("pre_logits.fc1.weight", "pre_logits.fc1.bias", "pre_logits.fc2.weight", "pre_logits.fc2.bias",
             "head.fc.weight", "head.fc.bias")
_TARGET = {"pre_logits.fc1": "classifier.0", "pre_logits.fc2": "classifier.3", "head.fc": "classifier.6"}


def is_timm(state: dict[str, torch.Tensor]) -> bool:
    return any(key.startswith(("pre_logits.", "head.")) for key in state)


def to_vggnet(state: dict[str, torch.Tensor], where: str | os.PathLike) -> dict[str, torch.Tensor]:
    """timm's keys and shapes mapped onto vggnet's ``features`` + ``classifier.0/.3/.6``."""
    missing = [k for k in TIMM_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{where} has timm's head keys but lacks {missing[0]}: vggnet reads timm VGGs with "
                              "their pre_logits and head.fc (a num_classes=0 model has no classifier to map)")
    fc1 = state["pre_logits.fc1.weight"]
    if fc1.dim() != 4 or tuple(fc1.shape[2:]) != (7, 7):
        raise CheckpointError(f"{where}: pre_logits.fc1.weight {tuple(fc1.shape)} is not a 7x7 convolution; timm's "
                              "VGG uses kernel_size=7")
    out = {}
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        if module in _TARGET:
            if param == "weight" and value.dim() == 4:
                value = value.reshape(value.shape[0], -1)  # (out, in, k, k) -> (out, in*k*k): NCHW flattening
            out[f"{_TARGET[module]}.{param}"] = value
        elif key.startswith("features."):
            out[key] = value
        else:
            raise CheckpointError(f"{where}: timm key {key} {tuple(value.shape)} has no place in a VGG")
    return out
