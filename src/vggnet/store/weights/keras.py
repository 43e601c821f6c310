"""Keras' VGG16/VGG19 HDF5 weights (``vgg16_weights_tf_dim_ordering_tf_kernels.h5`` and the ``_notop`` files).

Read through h5py, an optional extra (``pip install 'vggnet[keras]'``). The layout (``keras.applications.vgg16`` and
Keras' legacy ``save_weights``): one HDF5 group per layer, ``block1_conv1`` .. ``block5_conv3`` (``block5_conv4``
for VGG19), then ``fc1``, ``fc2`` and ``predictions`` unless the file is ``notop``; the group's ``weight_names``
attribute lists its datasets (``block1_conv1/kernel:0``, ``block1_conv1_W_1:0`` in older files), kernel first, then
bias. A whole saved model keeps the same groups under ``model_weights``. Mapping onto vggnet's layout:

- convolution kernels are ``(kh, kw, in, out)`` (HWIO; the ``tf_kernels`` files are cross-correlations, as PyTorch's
  convolutions) and become ``(out, in, kh, kw)``; ``padding="same"`` with an odd kernel is vggnet's ``k // 2``;
- dense kernels are ``(in, out)`` and are transposed;
- FC1's rows follow Keras' ``Flatten`` of the channels-last ``(7, 7, 512)`` map: row ``(h * 7 + w) * 512 + c``;
  PyTorch flattens ``(512, 7, 7)``: column ``c * 49 + h * 7 + w``. The rows are permuted to that order -- without
  it every shape still fits and the network silently computes something else;
- a pool follows each block (``blockN``); ``blockN_convM`` gives the order of the convolutions.

The input is BGR with the mean pixel subtracted (:func:`vggnet.store.weights.imagenet.caffe_preprocess`); the first layer
keeps its BGR channel order and the preprocessing reverses the RGB images instead.
"""

from __future__ import annotations

import math
import os
import re

import numpy as np
import torch

from vggnet.base.errors import CheckpointError

INSTALL_HINT = "pip install 'vggnet[keras]' (in a clone of vggnet: pip install -e '.[keras]'; or pip install h5py)"
_CONV = re.compile(r"^block(\d+)_conv(\d+)$")
TOP = ("fc1", "fc2", "predictions")


def _h5py():
    try:
        import h5py
    except ImportError:
        raise CheckpointError(f"reading Keras .h5 weights needs h5py: {INSTALL_HINT}") from None
    return h5py


def _decode(names) -> list[str]:
    return [n.decode("utf8") if isinstance(n, bytes) else str(n) for n in names]


def _layer_arrays(group) -> list[np.ndarray]:
    """The arrays of one layer group, in ``weight_names`` order (else every dataset below it, in name order)."""
    h5py = _h5py()
    names = _decode(group.attrs.get("weight_names", []))
    if names:
        return [np.asarray(group[n]) for n in names]
    found: list[tuple[str, np.ndarray]] = []
    group.visititems(lambda key, obj: found.append((key, np.asarray(obj))) if isinstance(obj, h5py.Dataset) else None)
    arrays = [a for _, a in sorted(found, key=lambda item: item[0])]
    if len(arrays) == 2 and arrays[0].ndim == 1:  # name order put the bias first
        arrays.reverse()
    return arrays


def _kernel_bias(group, where, name) -> tuple[np.ndarray, np.ndarray]:
    arrays = _layer_arrays(group)
    if len(arrays) != 2 or arrays[1].ndim != 1:
        shapes = ", ".join(str(a.shape) for a in arrays)
        raise CheckpointError(f"{where}: layer {name} holds {len(arrays)} arrays ({shapes}); vggnet reads Conv2D and "
                              "Dense layers with a kernel and a bias (keras.applications VGG16/VGG19)")
    return arrays[0], arrays[1]


def _tensor(array) -> torch.Tensor:
    return array if isinstance(array, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(array))


def read(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The Keras file's weights in vggnet's layout (``features`` only for a notop file)."""
    h5py = _h5py()
    try:
        with h5py.File(path, "r") as f:
            root = f["model_weights"] if "model_weights" in f else f
            layers, unplaced = {}, []
            for name in root:
                group = root[name]
                if not isinstance(group, h5py.Group):
                    continue
                if _CONV.match(name) or name in TOP:
                    layers[name] = _kernel_bias(group, path, name)
                elif _layer_arrays(group):  # e.g. a BatchNormalization layer: dropping it would change the network
                    unplaced.append(name)
    except (OSError, KeyError) as err:
        raise CheckpointError(f"{path} is a truncated or corrupt HDF5 file ({' '.join(str(err).split())[:200]})"
                              ) from None
    state = to_vggnet(layers, path)
    if unplaced:
        raise CheckpointError(f"{path}: layer {unplaced[0]} holds weights vggnet has no place for (it reads "
                              "blockN_convM, fc1, fc2 and predictions of keras.applications VGG16/VGG19)")
    return state


def to_vggnet(layers: dict[str, tuple], where: str | os.PathLike) -> dict[str, torch.Tensor]:
    """``{Keras layer name: (kernel, bias)}`` (numpy arrays or tensors) -> vggnet's state dict."""
    convs = sorted(((int(m.group(1)), int(m.group(2)), name) for name in layers if (m := _CONV.match(name))))
    if not convs:
        raise CheckpointError(f"{where} has no blockN_convM layers: not a Keras VGG16/VGG19 weights file (its groups: "
                              f"{', '.join(sorted(layers)[:6]) or 'none'})")
    state: dict[str, torch.Tensor] = {}
    index, block = 0, convs[0][0]
    channels = 0
    for block_no, _, name in convs:
        if block_no != block:
            index += 1  # the pool that ends the previous block
            block = block_no
        kernel, bias = (_tensor(a) for a in layers[name])
        if kernel.dim() != 4:
            raise CheckpointError(f"{where}: {name} kernel {tuple(kernel.shape)} is not a (kh, kw, in, out) Conv2D "
                                  "kernel")
        state[f"features.{index}.weight"] = kernel.permute(3, 2, 0, 1).contiguous()  # HWIO -> OIHW
        state[f"features.{index}.bias"] = bias.contiguous()
        channels = int(kernel.shape[3])
        index += 2  # the conv and its ReLU
    present = [name for name in TOP if name in layers]
    if not present:
        return state
    if present != list(TOP):
        raise CheckpointError(f"{where} has {', '.join(present)} but not all of fc1, fc2, predictions")
    (k1, b1), (k2, b2), (k3, b3) = ((_tensor(a) for a in layers[name]) for name in TOP)
    for name, kernel in zip(TOP, (k1, k2, k3)):
        if kernel.dim() != 2:
            raise CheckpointError(f"{where}: {name} kernel {tuple(kernel.shape)} is not an (in, out) Dense kernel")
    inputs, hidden = int(k1.shape[0]), int(k1.shape[1])
    side = math.isqrt(inputs // channels) if channels and inputs % channels == 0 else 0
    if not side or side * side * channels != inputs:
        raise CheckpointError(f"{where}: fc1 kernel {tuple(k1.shape)} does not take a square {channels}-channel "
                              "feature map")
    # Keras flattens (h, w, c); PyTorch (c, h, w): permute the rows, then transpose (in, out) -> (out, in).
    fc1 = k1.reshape(side, side, channels, hidden).permute(2, 0, 1, 3).reshape(inputs, hidden)
    state.update({"classifier.0.weight": fc1.t().contiguous(), "classifier.0.bias": b1.contiguous(),
                  "classifier.3.weight": k2.t().contiguous(), "classifier.3.bias": b2.contiguous(),
                  "classifier.6.weight": k3.t().contiguous(), "classifier.6.bias": b3.contiguous()})
    return state
