"""Reference networks for the weights tests, written here independently of vggnet (torchvision, timm, Keras are not
installed): each builds its own modules from its own configuration lists and runs its own forward, so a weights
file made from one of them and loaded into vggnet must give the same outputs.

Fixtures are prefixed ``w_``; ``w_ref`` holds the builders."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

# The paper's configurations, written out again (not imported from vggnet).
CONVS = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


def scaled(name, divisor):
    """The configuration with every channel count divided (vggnet's width = 1 / divisor)."""
    return [v if v == "M" else v // divisor for v in CONVS[name]]


def reference_features(cfg, batch_norm=False, in_channels=3):
    """``(features, channels out)``: conv [BN] ReLU ... pool in torchvision's (and timm's) indexing."""
    layers, c = [], in_channels
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1)] + ([nn.BatchNorm2d(v)] if batch_norm else []) + [nn.ReLU()]
            c = v
    return nn.Sequential(*layers), c


class TorchvisionVGG(nn.Module):
    """torchvision's VGG layout: features (conv [BN] ReLU ... pool), AdaptiveAvgPool2d(7), classifier 0/3/6."""

    def __init__(self, cfg, batch_norm=False, in_channels=3, hidden=4096, classes=1000):
        super().__init__()
        self.features, c = reference_features(cfg, batch_norm, in_channels)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(nn.Linear(c * 49, hidden), nn.ReLU(), nn.Dropout(), nn.Linear(hidden, hidden),
                                        nn.ReLU(), nn.Dropout(), nn.Linear(hidden, classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class TimmVGG(nn.Module):
    """timm's VGG layout: features as torchvision, pre_logits.fc1 (7x7 conv), pre_logits.fc2 (1x1 conv), head.fc
    after global average pooling."""

    def __init__(self, cfg, in_channels=3, hidden=4096, classes=1000):
        super().__init__()
        self.features, c = reference_features(cfg, False, in_channels)
        self.pre_logits = nn.Module()
        self.pre_logits.fc1 = nn.Conv2d(c, hidden, 7)
        self.pre_logits.fc2 = nn.Conv2d(hidden, hidden, 1)
        self.head = nn.Module()
        self.head.fc = nn.Linear(hidden, classes)

    def forward(self, x):
        x = torch.relu(self.pre_logits.fc2(torch.relu(self.pre_logits.fc1(self.features(x)))))
        return self.head.fc(x.mean((2, 3)))


def keras_layers(cfg, in_channels=3, hidden=4096, classes=1000, side=7, top=True, seed=2):
    """Keras VGG weights as numpy arrays: {layer name: (kernel, bias)} with HWIO conv kernels and (in, out) dense
    kernels; fc1 takes the channels-last flatten of a side x side map."""
    rng = np.random.default_rng(seed)
    layers, c, block, conv = {}, in_channels, 1, 0
    for v in cfg:
        if v == "M":
            block, conv = block + 1, 0
            continue
        conv += 1
        bound = math.sqrt(6.0 / (9 * c))
        layers[f"block{block}_conv{conv}"] = (rng.uniform(-bound, bound, (3, 3, c, v)).astype(np.float32),
                                              rng.uniform(-0.1, 0.1, v).astype(np.float32))
        c = v
    if top:
        for name, (n_in, n_out) in (("fc1", (side * side * c, hidden)), ("fc2", (hidden, hidden)),
                                    ("predictions", (hidden, classes))):
            bound = math.sqrt(6.0 / n_in)
            layers[name] = (rng.uniform(-bound, bound, (n_in, n_out)).astype(np.float32),
                            rng.uniform(-0.1, 0.1, n_out).astype(np.float32))
    return layers


def write_keras_h5(path, layers, old_names=False, weight_names=True):
    """An HDF5 file laid out as Keras' legacy save_weights: one group per layer, datasets under a subgroup of the
    layer's name, ``weight_names`` listing them (kernel first); ``old_names`` uses Keras 1's ``NAME_W_1:0``."""
    import h5py

    with h5py.File(path, "w") as f:
        order = list(layers) + ["flatten"]
        f.attrs["layer_names"] = [n.encode() for n in ["input_1"] + order]
        f.attrs["backend"] = b"tensorflow"
        f.attrs["keras_version"] = b"2.2.4"
        f.create_group("input_1").attrs["weight_names"] = np.array([], dtype="S1")
        f.create_group("flatten").attrs["weight_names"] = np.array([], dtype="S1")
        for name, (kernel, bias) in layers.items():
            group = f.create_group(name)
            names = ([f"{name}_W_1:0", f"{name}_b_1:0"] if old_names else [f"{name}/kernel:0", f"{name}/bias:0"])
            group.create_dataset(names[0], data=kernel)
            group.create_dataset(names[1], data=bias)
            if weight_names:
                group.attrs["weight_names"] = [n.encode() for n in names]


def keras_forward(layers, x_nhwc, top=True):
    """The Keras network on a channels-last batch, in numpy float64: 'same' 3x3 convolutions as explicit patch sums
    over (kh, kw, c), ReLU, 2x2 max-pools after each block, Flatten of (h, w, c), dense layers (no softmax)."""
    x = x_nhwc.astype(np.float64)
    block = 1
    for name, (kernel, bias) in layers.items():
        if not name.startswith("block"):
            continue
        b = int(name[5:name.index("_")])
        if b != block:
            x = _maxpool(x)
            block = b
        n, h, w, c = x.shape
        padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        out = np.zeros((n, h, w, kernel.shape[3]))
        for dy in range(3):
            for dx in range(3):
                out += padded[:, dy:dy + h, dx:dx + w, :] @ kernel[dy, dx].astype(np.float64)
        x = np.maximum(out + bias, 0)
    x = _maxpool(x)
    if not top:
        return x
    x = x.reshape(x.shape[0], -1)  # Keras' Flatten: (h, w, c) order
    for name, relu in (("fc1", True), ("fc2", True), ("predictions", False)):
        kernel, bias = layers[name]
        x = x @ kernel.astype(np.float64) + bias
        x = np.maximum(x, 0) if relu else x
    return x


def _maxpool(x):
    n, h, w, c = x.shape
    return x[:, :h // 2 * 2, :w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


@pytest.fixture(scope="session")
def w_ref(fill_reference):
    return SimpleNamespace(CONVS=CONVS, scaled=scaled, TorchvisionVGG=TorchvisionVGG, TimmVGG=TimmVGG,
                           fill=fill_reference,
                           keras_layers=keras_layers, write_keras_h5=write_keras_h5, keras_forward=keras_forward)


@pytest.fixture
def w_cli(cli):
    """The in-process CLI runner of tests/conftest.py."""
    return cli
