"""Tests for vggnet.net.models: registry, parameter counts, torchvision layout, heads, to_dense, input checks, init.

Expected numbers are hand-derived (formulas written out below) or taken from REFERENCE.md / the paper; the
torchvision comparison uses an independent torchvision-style model written here (torchvision is not installed).
Full-size models are built on the ``meta`` device where only shapes matter, so the file stays fast.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

import vggnet
from vggnet.net.models import HEADS

SMALL = dict(width=0.125, hidden=64, num_classes=7)

ALL_NAMES = [
    "vgg11", "vgg11_bn", "vgg11_lrn", "vgg11_lrn_bn", "vgg13", "vgg13_bn",
    "vgg16", "vgg16_bn", "vgg16_c", "vgg16_c_bn", "vgg19", "vgg19_bn",
]  # fmt: skip

# Table 1 written out by hand: (channels, kernel) of every conv, and the pools, per paper letter.
PAPER_CONVS = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "B": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "C": [64, 64, "M", 128, 128, "M", 256, 256, (256, 1), "M", 512, 512, (512, 1), "M", 512, 512, (512, 1), "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "E": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}

# REFERENCE.md: exact parameter counts at 1000 classes, 3 input channels (plain, BN after every conv).
PUBLISHED_PARAMS = {
    "vgg11": 132_863_336, "vgg11_bn": 132_868_840,
    "vgg11_lrn": 132_863_336, "vgg11_lrn_bn": 132_868_840,
    "vgg13": 133_047_848, "vgg13_bn": 133_053_736,
    "vgg16_c": 133_638_952, "vgg16_c_bn": 133_647_400,
    "vgg16": 138_357_544, "vgg16_bn": 138_365_992,
    "vgg19": 143_667_240, "vgg19_bn": 143_678_248,
}  # fmt: skip
LETTER = {"vgg11": "A", "vgg11_lrn": "A", "vgg13": "B", "vgg16_c": "C", "vgg16": "D", "vgg19": "E"}


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    # These tensors are tiny: intra-op threads only add OpenMP spin-waiting, which on 2 shared cores made the
    # file ~10x slower. Restored afterwards so other test files keep their setting.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def hand_count(tokens, in_channels, batch_norm, fc_in_spatial, hidden, num_classes) -> int:
    """Parameters by the textbook formula: conv k*k*cin*cout + cout (+ 2*cout for BN), FC in*out + out."""
    total, cin = 0, in_channels
    for tok in tokens:
        if tok == "M":
            continue
        cout, k = tok if isinstance(tok, tuple) else (tok, 3)
        total += k * k * cin * cout + cout + (2 * cout if batch_norm else 0)
        cin = cout
    fc_in = cin * fc_in_spatial
    return total + (fc_in * hidden + hidden) + (hidden * hidden + hidden) + (hidden * num_classes + num_classes)


def meta_model(name: str, **kwargs) -> vggnet.VGG:
    with torch.device("meta"):
        return vggnet.create_model(name, **kwargs)


def small(name: str, **kwargs) -> vggnet.VGG:
    return vggnet.create_model(name, **{**SMALL, **kwargs})


def conv_modules(model):
    return [m for m in model.features if isinstance(m, nn.Conv2d)]


# ================================================================================================== registry
def test_list_models_is_exactly_the_twelve():
    assert vggnet.list_models() == ALL_NAMES


@pytest.mark.parametrize(
    "pattern, expected",
    [
        ("vgg16*", ["vgg16", "vgg16_bn", "vgg16_c", "vgg16_c_bn"]),
        ("*_bn", ["vgg11_bn", "vgg11_lrn_bn", "vgg13_bn", "vgg16_bn", "vgg16_c_bn", "vgg19_bn"]),
        ("vgg11_lrn*", ["vgg11_lrn", "vgg11_lrn_bn"]),
        ("vgg19", ["vgg19"]),
        ("resnet*", []),
    ],
)
def test_list_models_pattern(pattern, expected):
    assert vggnet.list_models(pattern) == expected


def test_unknown_name_lists_valid_names():
    with pytest.raises(vggnet.ConfigError) as info:
        vggnet.create_model("vgg17")
    message = str(info.value)
    assert "'vgg17'" in message
    for name in ALL_NAMES:
        assert name in message
    assert "custom" in message
    assert "\n" not in message


def test_create_model_drops_none_kwargs():
    model = vggnet.create_model(
        "vgg11", num_classes=None, in_channels=None, hidden=None, dropout=None, head="gap", width=0.125, init=None
    )
    assert model.config["num_classes"] == 1000
    assert model.config["in_channels"] == 3
    assert model.config["hidden"] == 4096
    assert model.config["dropout"] == 0.5
    assert model.config["init"] == "torchvision"
    assert model.classifier[-1].out_features == 1000
    assert conv_modules(model)[0].in_channels == 3


def test_create_model_none_batch_norm_keeps_registry_default():
    plain = vggnet.create_model("vgg11", batch_norm=None, **SMALL)
    bn = vggnet.create_model("vgg11_bn", batch_norm=None, **SMALL)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.features)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in bn.features) == 8


def test_custom_needs_arch():
    with pytest.raises(vggnet.ConfigError, match="needs arch="):
        vggnet.create_model("custom", width=0.5)
    with pytest.raises(vggnet.ConfigError, match="needs arch="):
        vggnet.create_model("custom", arch=None)  # None is dropped, so still missing
    model = vggnet.create_model("custom", arch="8,M,16,M", hidden=8, num_classes=3)
    assert model.name == "custom" and model.config["arch"] == [8, "M", 16, "M"]


def test_registered_name_rejects_arch():
    with pytest.raises(vggnet.ConfigError, match="fixed architecture"):
        vggnet.create_model("vgg16", arch="A")


@pytest.mark.parametrize("name", ALL_NAMES)
def test_registry_entry_structure(name):
    model = meta_model(name)
    letter = LETTER[name.replace("_bn", "")]
    expected_convs = [(t, 3) if isinstance(t, int) else t for t in PAPER_CONVS[letter] if t != "M"]
    assert [(m.out_channels, m.kernel_size[0]) for m in conv_modules(model)] == expected_convs
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.features)
    assert n_bn == (len(expected_convs) if name.endswith("_bn") else 0)
    assert sum(isinstance(m, nn.LocalResponseNorm) for m in model.features) == (1 if "lrn" in name else 0)
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.features) == 5
    assert model.name == name and model.config["name"] == name


# ================================================================================================== parameter counts
@pytest.mark.parametrize("name", ALL_NAMES)
def test_exact_parameter_counts(name):
    model = meta_model(name)
    letter = LETTER[name.replace("_bn", "")]
    by_formula = hand_count(PAPER_CONVS[letter], 3, name.endswith("_bn"), 49, 4096, 1000)
    assert by_formula == PUBLISHED_PARAMS[name]
    assert n_params(model) == PUBLISHED_PARAMS[name]


def test_fitted_vgg16_cifar_count():
    # D's convs: 14,714,688; FC 512*4096+4096 + 4096*4096+4096 + 4096*10+10 = 18,923,530.
    model = meta_model("vgg16", input_size=32, num_classes=10, head="fitted")
    assert n_params(model) == 33_638_218
    assert n_params(model) == 14_714_688 + 18_923_530
    assert model.classifier[0].in_features == 512


def test_published_counts_differ_by_the_fc_layer():
    # The classic head's first FC has 25088 inputs; the fitted head at 32x32 has 512.
    classic = meta_model("vgg16", num_classes=10)
    fitted = meta_model("vgg16", num_classes=10, head="fitted", input_size=32)
    assert n_params(classic) - n_params(fitted) == (25088 - 512) * 4096


# A small custom architecture counted term by term: convs 1x1 2->16 and 3x3 16->32, LRN, two pools.
CUSTOM = [(16, 1), "M", 32, "LRN", "M"]
CONV_TERMS = (1 * 1 * 2 * 16 + 16) + (3 * 3 * 16 * 32 + 32)  # 48 + 4640 = 4688


@pytest.mark.parametrize(
    "head, batch_norm, expected",
    [
        # classic: FC1 32*49 -> 10, FC2 10 -> 10, FC3 10 -> 3
        ("classic", False, 4688 + (32 * 49 * 10 + 10) + (10 * 10 + 10) + (10 * 3 + 3)),  # 20,521
        ("classic", True, 20_521 + 2 * (16 + 32)),  # BN adds weight and bias per channel
        # fitted at 8x8: 2 pools -> 2x2 map, FC1 32*4 -> 10
        ("fitted", False, 4688 + (32 * 4 * 10 + 10) + 110 + 33),  # 6,121
        # dense at 8x8: FC1 as a 2x2 conv 32 -> 10, 1x1 convs 10 -> 10 -> 3: same count as fitted
        ("dense", False, 6_121),
        # gap: one linear 32 -> 3
        ("gap", False, 4688 + 32 * 3 + 3),  # 4,787
    ],
)
def test_custom_arch_count_by_hand(head, batch_norm, expected):
    model = vggnet.create_model(
        "custom", arch=CUSTOM, in_channels=2, hidden=10, num_classes=3, head=head, input_size=8, batch_norm=batch_norm
    )
    assert n_params(model) == expected
    if head == "classic":
        assert expected == hand_count([(16, 1), "M", 32, "M"], 2, batch_norm, 49, 10, 3)


# ================================================================================================== whole registry
@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("name", vggnet.list_models())
def test_registry_forward_backward_overrides(name, in_channels):
    model = small(name, in_channels=in_channels)
    # Overrides reach the right shapes: width 0.125 -> 8, 16, 32, 64, 64 channels; hidden 64; 7 classes.
    first = conv_modules(model)[0]
    assert tuple(first.weight.shape) == (8, in_channels, 3, 3)
    assert conv_modules(model)[-1].out_channels == 64
    assert model.classifier[0].in_features == 64 * 49
    assert model.classifier[0].out_features == 64
    assert model.classifier[-1].out_features == 7
    assert model.num_features == 64

    x = torch.randn(2, in_channels, 32, 32)
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    assert out.std() > 0  # not a constant output

    # feature_info against the real maps: hook the named pool modules.
    expected_chs, expected_red = [8, 16, 32, 64, 64], [2, 4, 8, 16, 32]
    assert [f["num_chs"] for f in model.feature_info] == expected_chs
    assert [f["reduction"] for f in model.feature_info] == expected_red
    seen = {}
    handles = [
        model.get_submodule(f["module"]).register_forward_hook(
            lambda mod, inp, output, key=f["module"]: seen.__setitem__(key, tuple(output.shape))
        )
        for f in model.feature_info
    ]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    for f in model.feature_info:
        assert isinstance(model.get_submodule(f["module"]), nn.MaxPool2d)
        assert seen[f["module"]] == (2, f["num_chs"], 32 // f["reduction"], 32 // f["reduction"])
    # forward_named at the pools gives the same shapes
    maps = model.forward_named(x, [f"pool{i}" for i in range(1, 6)])
    assert [maps[f"pool{i}"].shape[1] for i in range(1, 6)] == expected_chs
    assert [maps[f"pool{i}"].shape[2] for i in range(1, 6)] == [16, 8, 4, 2, 1]

    # Every parameter gets a gradient from a sum loss in train mode.
    model.train()
    model(x).sum().backward()
    before_bn = set()
    modules = list(model.features)
    for i, m in enumerate(modules[:-1]):
        if isinstance(m, nn.Conv2d) and isinstance(modules[i + 1], nn.BatchNorm2d):
            before_bn.add(f"features.{i}.bias")
    assert bool(before_bn) == name.endswith("_bn")
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        norm = float(p.grad.norm())
        if pname in before_bn:
            # Train-mode BN subtracts the batch mean, so the preceding conv bias has zero gradient
            # (mathematically; float rounding leaves ~1e-8).
            assert norm < 1e-5, (pname, norm)
        else:
            assert norm > 1e-6, (pname, norm)
    # d(sum of logits)/d(last bias) = batch size for every class: norm 2 * sqrt(7)
    assert float(model.classifier[-1].bias.grad.norm()) == pytest.approx(2 * math.sqrt(7), rel=1e-6)

    # reset_classifier changes the output dim and the stored config.
    model.reset_classifier(4)
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, 4)
    assert model.num_classes == 4 and model.config["num_classes"] == 4
    assert torch.count_nonzero(model.classifier[-1].bias.detach()) == 0


# ================================================================================================== torchvision layout
def tv_make_layers(cfg, batch_norm):
    """torchvision's make_layers, written out here independently of vggnet."""
    layers, in_channels = [], 3
    for v in cfg:
        if v == "M":
            layers += [nn.MaxPool2d(kernel_size=2, stride=2)]
        else:
            conv2d = nn.Conv2d(in_channels, v, kernel_size=3, padding=1)
            if batch_norm:
                layers += [conv2d, nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            else:
                layers += [conv2d, nn.ReLU(inplace=True)]
            in_channels = v
    return nn.Sequential(*layers)


class TorchvisionStyleVGG(nn.Module):
    def __init__(self, cfg, batch_norm, num_classes=1000):
        super().__init__()
        self.features = tv_make_layers(cfg, batch_norm)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096), nn.ReLU(True), nn.Dropout(p=0.5),
            nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(p=0.5),
            nn.Linear(4096, num_classes),
        )  # fmt: skip

    def forward(self, x):
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def _vgg11_expected_keys(batch_norm):
    """vgg11 (config A) keys by torchvision's rule, indices worked out by hand."""
    chans = [(3, 64), (64, 128), (128, 256), (256, 256), (256, 512), (512, 512), (512, 512), (512, 512)]
    if batch_norm:  # conv, bn, relu per number; pool per 'M'
        conv_idx = [0, 4, 8, 11, 15, 18, 22, 25]
    else:  # conv, relu per number; pool per 'M'
        conv_idx = [0, 3, 6, 8, 11, 13, 16, 18]
    keys = []
    for i, (cin, cout) in zip(conv_idx, chans):
        keys += [(f"features.{i}.weight", (cout, cin, 3, 3)), (f"features.{i}.bias", (cout,))]
        if batch_norm:
            keys += [(f"features.{i + 1}.{s}", (cout,)) for s in ("weight", "bias", "running_mean", "running_var")]
            keys += [(f"features.{i + 1}.num_batches_tracked", ())]
    keys += [
        ("classifier.0.weight", (4096, 25088)), ("classifier.0.bias", (4096,)),
        ("classifier.3.weight", (4096, 4096)), ("classifier.3.bias", (4096,)),
        ("classifier.6.weight", (1000, 4096)), ("classifier.6.bias", (1000,)),
    ]  # fmt: skip
    return keys


@pytest.mark.parametrize("name, batch_norm, n_features", [("vgg11", False, 21), ("vgg11_bn", True, 29)])
def test_vgg11_state_dict_matches_torchvision_layout(name, batch_norm, n_features):
    model = meta_model(name)
    state = model.state_dict()
    assert [(k, tuple(v.shape)) for k, v in state.items()] == _vgg11_expected_keys(batch_norm)
    assert len(model.features) == n_features
    assert isinstance(model.avgpool, nn.AdaptiveAvgPool2d) and model.avgpool.output_size == (7, 7)
    # the reference builder written here agrees with the hand-written key list
    with torch.device("meta"):
        ref = TorchvisionStyleVGG(PAPER_CONVS["A"], batch_norm)
    assert [(k, tuple(v.shape)) for k, v in ref.state_dict().items()] == _vgg11_expected_keys(batch_norm)


@pytest.mark.parametrize("name, batch_norm", [("vgg16", False), ("vgg16_bn", True)])
@torch.no_grad()
def test_vgg16_loads_torchvision_style_state_dict(name, batch_norm, fill_reference):
    with torch.device("meta"):
        ref = TorchvisionStyleVGG(PAPER_CONVS["D"], batch_norm)
    ref = fill_reference(ref.to_empty(device="cpu"))
    ours = vggnet.create_model(name)
    result = ours.load_state_dict(ref.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    ref.eval()
    ours.eval()
    x = torch.randn(2, 3, 32, 32)
    expected, got = ref(x), ours(x)
    assert expected.shape == (2, 1000)
    assert expected.std() > 1e-3
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # and the state dict we produce loads into the reference, key for key
    assert list(ours.state_dict()) == list(ref.state_dict())


# ================================================================================================== C and A-LRN
def test_config_c_one_by_one_convs_in_model():
    model = small("vgg16_c")
    convs = conv_modules(model)
    assert [m.kernel_size for m in convs] == [(3, 3)] * 6 + [(1, 1)] + [(3, 3)] * 2 + [(1, 1)] + [(3, 3)] * 2 + [(1, 1)]
    assert [m.padding for m in convs] == [(1, 1)] * 6 + [(0, 0)] + [(1, 1)] * 2 + [(0, 0)] + [(1, 1)] * 2 + [(0, 0)]
    names = model.layer_names
    for block in (3, 4, 5):
        assert model.features[names[f"conv{block}_3"]].kernel_size == (1, 1)
    maps = model.forward_named(torch.randn(1, 3, 32, 32), ["conv3_2", "conv3_3", "conv5_3"])
    assert maps["conv3_2"].shape == maps["conv3_3"].shape == (1, 32, 8, 8)  # 1x1 keeps the size
    assert maps["conv5_3"].shape == (1, 64, 2, 2)


@pytest.mark.parametrize("name, lrn_index", [("vgg11_lrn", 2), ("vgg11_lrn_bn", 3)])
def test_a_lrn_has_lrn_right_after_first_relu(name, lrn_index):
    model = small(name)
    lrn = model.features[lrn_index]
    assert isinstance(model.features[lrn_index - 1], nn.ReLU)
    assert isinstance(model.features[0], nn.Conv2d)
    assert isinstance(lrn, nn.LocalResponseNorm)
    assert (lrn.size, lrn.alpha, lrn.beta, lrn.k) == (5, 1e-4, 0.75, 2.0)
    assert isinstance(model.features[lrn_index + 1], nn.MaxPool2d)
    assert sum(isinstance(m, nn.LocalResponseNorm) for m in model.features) == 1


# ================================================================================================== custom archs
def test_custom_paper_style_list_builds_those_layers():
    model = vggnet.create_model(
        "custom", arch=[(256, 1), "conv1-256", "conv3-64", "M", "LRN"], width=0.0625, hidden=8, num_classes=3
    )
    kinds = [type(m).__name__ for m in model.features]
    assert kinds == ["Conv2d", "ReLU", "Conv2d", "ReLU", "Conv2d", "ReLU", "MaxPool2d", "LocalResponseNorm"]
    convs = conv_modules(model)
    assert [(m.in_channels, m.out_channels, m.kernel_size[0]) for m in convs] == [(3, 16, 1), (16, 16, 1), (16, 4, 3)]
    assert model.config["arch"] == ["conv1-256", "conv1-256", 64, "M", "LRN"]  # unscaled, canonical
    assert model.min_size == 2
    assert model(torch.randn(1, 3, 2, 2)).shape == (1, 3)


def test_custom_comma_string():
    model = vggnet.create_model("custom", arch="64,M,128,M", width=0.125, hidden=8, num_classes=3)
    assert [(m.in_channels, m.out_channels) for m in conv_modules(model)] == [(3, 8), (8, 16)]
    assert model.num_pools == 2 and model.min_size == 4
    assert model.feature_info == [
        {"num_chs": 8, "reduction": 2, "module": "features.2"},
        {"num_chs": 16, "reduction": 4, "module": "features.5"},
    ]


def test_d2l_blocks_build_the_same_model_as_vgg11():
    d2l = vggnet.create_model("custom", arch=((1, 64), (1, 128), (2, 256), (2, 512), (2, 512)), **SMALL)
    a = small("vgg11")
    assert d2l.config["arch"] == a.config["arch"]
    assert [(k, v.shape) for k, v in d2l.state_dict().items()] == [(k, v.shape) for k, v in a.state_dict().items()]


def test_d2l_quarter_width_channels():
    model = vggnet.create_model("custom", arch=((1, 64), (1, 128), (2, 256), (2, 512), (2, 512)), width=0.25,
                                in_channels=1, head="gap", num_classes=10)  # fmt: skip
    assert [m.out_channels for m in conv_modules(model)] == [16, 32, 64, 64, 128, 128, 128, 128]
    assert [f["num_chs"] for f in model.feature_info] == [16, 32, 64, 128, 128]


@pytest.mark.parametrize("arch", [[64, "Z"], "64,M,foo", [(64, 2), "M"], "conv4-8,M"])
def test_custom_bad_arch_raises(arch):
    with pytest.raises(vggnet.ConfigError):
        vggnet.create_model("custom", arch=arch, hidden=8)


ROUND_TRIP_CASES = [
    ("vgg16_c_bn", dict(**SMALL, in_channels=1, head="fitted", input_size=(32, 64))),
    ("vgg11_lrn", dict(**SMALL, head="dense", input_size=64, dropout=0.1)),
    ("custom", dict(arch=[(256, 1), "conv1-256", "conv3-64", "M", "LRN", 32, "M"], width=0.0625, hidden=16,
                    num_classes=5, in_channels=2, input_size=12)),  # fmt: skip
    ("custom", dict(arch=((1, 64), (1, 128), (2, 256), (2, 512), (2, 512)), width=0.25, head="gap", init="xavier")),
]


@pytest.mark.parametrize("name, kwargs", ROUND_TRIP_CASES)
def test_config_round_trip(name, kwargs):
    model = vggnet.create_model(name, **kwargs)
    if model.config["batch_norm"]:  # make running stats non-trivial
        model.train()
        h, w = model.input_size
        with torch.no_grad():
            model(torch.randn(4, model.in_channels, h, w))
    config = json.loads(json.dumps(model.config))  # JSON-able, as stored in checkpoints
    rebuilt = vggnet.model_from_config(config)
    assert rebuilt.config == model.config
    assert rebuilt.name == model.name
    assert [(k, v.shape) for k, v in rebuilt.state_dict().items()] == [
        (k, v.shape) for k, v in model.state_dict().items()
    ]
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    model.eval()
    rebuilt.eval()
    h, w = model.input_size
    x = torch.randn(2, model.in_channels, h, w)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))


def test_config_round_trip_after_reset_classifier():
    model = small("vgg11")
    model.reset_classifier(3)
    rebuilt = vggnet.model_from_config(model.config)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    assert rebuilt.classifier[-1].out_features == 3


def test_config_round_trip_conv_only_non_3x3_arch():
    model = vggnet.create_model("custom", arch="conv1-8,conv5-4", head="gap", num_classes=3, input_size=4)
    assert [(m.out_channels, m.kernel_size[0]) for m in conv_modules(model)] == [(8, 1), (4, 5)]
    rebuilt = vggnet.model_from_config(model.config)
    assert [(m.out_channels, m.kernel_size[0]) for m in conv_modules(rebuilt)] == [(8, 1), (4, 5)]


# ================================================================================================== heads
@pytest.mark.parametrize(
    "head, fc0_shape",
    [
        ("classic", (64, 64 * 49)),
        ("fitted", (64, 64 * 1)),  # 32x32 input, 5 pools -> 1x1 map
        ("dense", (64, 64, 1, 1)),
        ("gap", (7, 64)),  # the only linear layer
    ],
)
def test_head_shapes_at_32(head, fc0_shape):
    model = small("vgg16", head=head, input_size=32).eval()
    weights = [m.weight for m in model.classifier if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert tuple(weights[0].shape) == fc0_shape
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_classic_and_gap_accept_any_size_at_least_32():
    for head in ("classic", "gap"):
        model = small("vgg11", head=head).eval()
        with torch.no_grad():
            for h, w in ((32, 32), (48, 80), (64, 33)):
                assert model(torch.randn(1, 3, h, w)).shape == (1, 7)


def test_fitted_rejects_other_sizes():
    model = small("vgg16", head="fitted", input_size=64).eval()
    assert model.classifier[0].in_features == 64 * 2 * 2
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7)
    for h, w in ((32, 32), (96, 96), (64, 96)):
        with pytest.raises(vggnet.InputSizeError) as info:
            model(torch.randn(1, 3, h, w))
        message = str(info.value)
        assert "exactly 64x64" in message and f"got {h}x{w}" in message and "to_dense" in message
        assert "\n" not in message


def test_dense_head_accepts_larger_input_and_rejects_smaller():
    model = small("vgg16", head="dense", input_size=64).eval()
    assert tuple(model.classifier[0].weight.shape) == (64, 64, 2, 2)
    assert tuple(model.classifier[3].weight.shape) == (64, 64, 1, 1)
    assert tuple(model.classifier[6].weight.shape) == (7, 64, 1, 1)
    with torch.no_grad():
        # score map side = feature side - kernel side + 1 = H/32 - 2 + 1
        for size, side in ((64, 1), (96, 2), (128, 3)):
            x = torch.randn(2, 3, size, size)
            score = model.forward_score_map(x)
            assert score.shape == (2, 7, side, side)
            torch.testing.assert_close(model(x), score.mean((2, 3)), rtol=1e-6, atol=1e-6)
        assert model.forward_score_map(torch.randn(1, 3, 96, 160)).shape == (1, 7, 2, 4)
    with pytest.raises(vggnet.InputSizeError, match="at least 64x64.*got 32x32"):
        model(torch.randn(1, 3, 32, 32))


def test_forward_score_map_needs_dense_head():
    with pytest.raises(vggnet.ConfigError, match="to_dense"):
        small("vgg11").forward_score_map(torch.randn(1, 3, 32, 32))


def _assert_dense_matches(model, size, atol=1e-4):
    model.eval()
    dense = vggnet.to_dense(model)
    assert dense.head == "dense" and dense.training is False
    x = torch.randn(2, model.in_channels, *size)
    with torch.no_grad():
        expected, got = model(x), dense(x)
    assert expected.std() > 0
    torch.testing.assert_close(got, expected, rtol=0, atol=atol)
    return dense


@pytest.mark.parametrize(
    "name, input_size",
    [
        ("vgg16", (32, 32)),  # 1x1 map, replicated 49 times by the adaptive pool
        ("vgg16_bn", (32, 32)),
        ("vgg11", (64, 64)),  # 2x2 -> 7x7 adaptive pool: overlapping bins folded into a 2x2 kernel
        ("vgg13", (64, 96)),  # non-square 2x3 map
    ],
)
def test_to_dense_classic_equals_source(name, input_size):
    model = small(name, input_size=input_size)
    dense = _assert_dense_matches(model, input_size)
    fh, fw = input_size[0] // 32, input_size[1] // 32
    state = dense.state_dict()
    assert tuple(state["classifier.0.weight"].shape) == (64, 64, fh, fw)
    assert tuple(state["classifier.3.weight"].shape) == (64, 64, 1, 1)
    assert tuple(state["classifier.6.weight"].shape) == (7, 64, 1, 1)
    assert all(state[k].dim() == 4 for k in ("classifier.0.weight", "classifier.3.weight", "classifier.6.weight"))


def test_to_dense_classic_at_224_is_a_reshape():
    # At 224 the map is 7x7 and the adaptive pool is the identity: the conv kernel is FC1's weight reshaped.
    model = vggnet.create_model("vgg16", width=0.0625, hidden=32, num_classes=5)
    dense = _assert_dense_matches(model, (224, 224))
    assert torch.equal(dense.classifier[0].weight, model.classifier[0].weight.view(32, 32, 7, 7))
    assert torch.equal(dense.classifier[6].weight, model.classifier[6].weight.view(5, 32, 1, 1))


def test_to_dense_fitted_equals_source_and_slides_the_fitted_head():
    model = small("vgg16", head="fitted", input_size=64)
    dense = _assert_dense_matches(model, (64, 64))
    assert torch.equal(dense.classifier[0].weight, model.classifier[0].weight.view(64, 64, 2, 2))
    # The paper's dense evaluation: each score-map cell is the fitted head applied to that 2x2 window of features.
    x = torch.randn(1, 3, 128, 96)
    with torch.no_grad():
        feats = model.features(x)  # (1, 64, 4, 3)
        score = dense.forward_score_map(x)  # (1, 7, 3, 2)
        assert score.shape == (1, 7, 3, 2)
        for i in range(3):
            for j in range(2):
                window = feats[:, :, i : i + 2, j : j + 2]
                torch.testing.assert_close(score[:, :, i, j], model.forward_head(window), rtol=0, atol=1e-5)
        torch.testing.assert_close(dense(x), score.mean((2, 3)), rtol=1e-6, atol=1e-6)


def test_to_dense_of_gap_and_dense_is_a_copy():
    for head in ("gap", "dense"):
        model = small("vgg11", head=head, input_size=32).eval()
        copied = vggnet.to_dense(model)
        assert copied is not model and copied.head == head
        assert copied.classifier[-1].weight.data_ptr() != model.classifier[-1].weight.data_ptr()
        x = torch.randn(1, 3, 64, 64)
        with torch.no_grad():
            assert torch.equal(copied(x), model(x))


def test_to_dense_keeps_training_flag_and_reset_classes():
    model = small("vgg11").train()
    model.reset_classifier(3)
    dense = vggnet.to_dense(model)
    assert dense.training is True
    assert dense.classifier[-1].out_channels == 3


def test_to_dense_keeps_dtype():
    model = small("vgg11", input_size=32).double().eval()
    dense = vggnet.to_dense(model)
    assert next(dense.parameters()).dtype == torch.float64
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(dense(x), model(x))


# ================================================================================================== forward API
@pytest.mark.parametrize("head, num_features", [("classic", 64), ("fitted", 64), ("dense", 64), ("gap", 64)])
def test_forward_features_and_pre_logits(head, num_features):
    model = small("vgg16", head=head, input_size=(64, 96), hidden=48 if head != "gap" else 64).eval()
    expected_features = 48 if head != "gap" else 64  # hidden for FC heads, last conv channels for gap
    assert model.num_features == expected_features
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 64, 2, 3)
        pre = model.forward_head(feats, pre_logits=True)
        assert pre.shape == (2, model.num_features)
        logits = model.forward_head(feats)
        assert torch.equal(logits, model(x))
        # the last layer is affine, so it commutes with the spatial mean of the dense head
        last = model.classifier[-1]
        if isinstance(last, nn.Conv2d):
            manual = pre @ last.weight.view(last.out_channels, -1).T + last.bias
        else:
            manual = last(pre)
        torch.testing.assert_close(logits, manual, rtol=1e-5, atol=1e-5)


D_RELUS = ["relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3"]


def test_forward_named_relu_maps_equal_hooks_on_a_clone():
    model = small("vgg16").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        maps = model.forward_named(x, D_RELUS + ["relu1_1", "pool5"])
    expected_shapes = {
        "relu1_2": (2, 8, 32, 32), "relu2_2": (2, 16, 16, 16), "relu3_3": (2, 32, 8, 8),
        "relu4_3": (2, 64, 4, 4), "relu5_3": (2, 64, 2, 2), "relu1_1": (2, 8, 32, 32), "pool5": (2, 64, 1, 1),
    }  # fmt: skip
    assert {k: tuple(v.shape) for k, v in maps.items()} == expected_shapes

    clone = copy.deepcopy(model)
    captured = {}
    for name in expected_shapes:
        module = clone.features[clone.layer_names[name]]
        module.register_forward_hook(lambda m, i, o, key=name: captured.__setitem__(key, o.detach().clone()))
    with torch.no_grad():
        clone(x)
    for name in expected_shapes:
        assert torch.equal(maps[name], captured[name]), name
        if name.startswith("relu"):
            assert maps[name].min() >= 0


def test_forward_named_conv_outputs_not_clobbered_by_inplace_relu():
    model = small("vgg16").eval()
    x = torch.randn(2, 3, 32, 32)
    conv1, conv2 = model.features[0], model.features[2]
    with torch.no_grad():
        maps = model.forward_named(x, ["conv1_1", "relu1_1", "conv1_2"])
        manual1 = F.conv2d(x, conv1.weight, conv1.bias, padding=1)
        manual2 = F.conv2d(manual1.clamp(min=0), conv2.weight, conv2.bias, padding=1)
    assert (maps["conv1_1"] < 0).any()  # ReLU would have zeroed these if it ran in place on the returned map
    torch.testing.assert_close(maps["conv1_1"], manual1, rtol=0, atol=1e-5)
    torch.testing.assert_close(maps["relu1_1"], manual1.clamp(min=0), rtol=0, atol=1e-5)
    torch.testing.assert_close(maps["conv1_2"], manual2, rtol=0, atol=1e-5)
    assert (maps["conv1_2"] < 0).any()


def test_forward_named_bn_output_not_clobbered():
    model = small("vgg11_bn").eval()
    bn = model.features[1]
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        x = torch.randn(1, 3, 32, 32)
        maps = model.forward_named(x, ["bn1_1"])
        conv = F.conv2d(x, model.features[0].weight, model.features[0].bias, padding=1)
        manual = (conv - bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(bn.running_var.view(1, -1, 1, 1) + bn.eps)
        manual = manual * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
    assert (maps["bn1_1"] < 0).any()
    torch.testing.assert_close(maps["bn1_1"], manual, rtol=1e-5, atol=1e-5)


def test_forward_named_runs_only_as_far_as_needed():
    model = small("vgg16").eval()
    calls = []
    model.features[-1].register_forward_hook(lambda *a: calls.append("last"))
    model.features[model.layer_names["relu1_2"] + 1].register_forward_hook(lambda *a: calls.append("next"))
    with torch.no_grad():
        model.forward_named(torch.randn(1, 3, 32, 32), ["relu1_2"])
    assert calls == []


def test_forward_named_unknown_layer():
    model = small("vgg11")
    with pytest.raises(vggnet.ConfigError) as info:
        model.forward_named(torch.randn(1, 3, 32, 32), ["relu1_2"])  # vgg11 has one conv in block 1
    message = str(info.value)
    assert "relu1_2" in message and "relu1_1" in message and "pool5" in message


# ================================================================================================== input checks
@pytest.fixture
def hooked_vgg16():
    model = small("vgg16").eval()
    calls = []
    model.features[0].register_forward_hook(lambda *a: calls.append(1))
    return model, calls


@pytest.mark.parametrize("entry", ["forward", "forward_features", "forward_named"])
@pytest.mark.parametrize(
    "shape, fragments",
    [
        ((1, 3, 28, 28), ["at least 32x32", "got 28x28", "pad or resize", "5 max-pools"]),
        ((2, 3, 32, 16), ["at least 32x32", "got 32x16", "pad or resize"]),
        ((1, 1, 32, 32), ["expects 3 input channels, got 1", "in_channels=1"]),
        ((1, 4, 32, 32), ["expects 3 input channels, got 4", "in_channels=4"]),
        ((3, 32, 32), ["4-D batch", "(3, 32, 32)", "x.unsqueeze(0)"]),
        ((32, 32), ["4-D batch", "(32, 32)"]),
    ],
)
def test_input_errors_before_any_layer(hooked_vgg16, entry, shape, fragments):
    model, calls = hooked_vgg16
    x = torch.randn(*shape)
    with pytest.raises(vggnet.InputSizeError) as info:
        if entry == "forward_named":
            model.forward_named(x, ["relu1_1"])
        else:
            getattr(model, entry)(x)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert "\n" not in message
    if len(shape) == 2:
        assert "unsqueeze" not in message
    assert calls == []  # the first conv never ran
    assert isinstance(info.value, ValueError)


def test_hooked_model_does_run_on_good_input(hooked_vgg16):
    model, calls = hooked_vgg16  # the hook works, so the negative checks above mean something
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert calls == [1]


def test_fitted_size_error_before_any_layer():
    model = small("vgg16", head="fitted").eval()
    calls = []
    model.features[0].register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(vggnet.InputSizeError):
        model(torch.randn(1, 3, 64, 64))
    assert calls == []


def test_input_size_too_small_at_construction():
    with pytest.raises(vggnet.InputSizeError) as info:
        vggnet.create_model("vgg16", input_size=16, head="fitted", **SMALL)
    message = str(info.value)
    assert "input_size of at least 32x32" in message and "got 16x16" in message and "\n" not in message
    # three pools need 8x8
    model = vggnet.create_model("custom", arch="8,M,8,M,8,M", hidden=8, num_classes=2, input_size=8, head="fitted")
    assert model.min_size == 8
    with pytest.raises(vggnet.InputSizeError, match="at least 8x8"):
        vggnet.create_model("custom", arch="8,M,8,M,8,M", hidden=8, input_size=(8, 7), head="fitted")


# ================================================================================================== validation, init
@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(head="wide"), "unknown head 'wide': choose one of classic, fitted, dense, gap"),
        (dict(init="he"), "unknown init 'he': choose one of torchvision, paper, xavier"),
        (dict(num_classes=0), "num_classes must be a positive integer"),
        (dict(in_channels=0), "in_channels must be a positive integer"),
        (dict(hidden=-1), "hidden must be a positive integer"),
        (dict(num_classes=2.0), "num_classes must be a positive integer"),
        (dict(dropout=1.0), "dropout must be in [0, 1)"),
        (dict(dropout=-0.1), "dropout must be in [0, 1)"),
        (dict(width=0), "width must be > 0"),
        (dict(input_size=(32, 32, 3)), "input_size must be an int or (height, width)"),
    ],
)
def test_invalid_options_raise_config_error(kwargs, fragment):
    with pytest.raises(vggnet.ConfigError) as info:
        vggnet.create_model("vgg11", **{**SMALL, **kwargs})
    assert fragment in str(info.value)


# A big 512 -> 512 3x3 conv (2,359,296 weights) makes the statistics tight.
INIT_ARCH = [64, 512, 512]


def _init_model(init, **kwargs):
    model = vggnet.create_model("custom", arch=INIT_ARCH, head="gap", num_classes=1000, init=init, **kwargs)
    return model.requires_grad_(False)


def test_paper_init():
    model = _init_model("paper")
    big = conv_modules(model)[2].weight
    assert big.numel() == 2_359_296
    assert float(big.std()) == pytest.approx(0.01, rel=0.01)
    assert abs(float(big.mean())) < 1e-4
    fc = model.classifier[-1].weight  # 512,000 weights
    assert float(fc.std()) == pytest.approx(0.01, rel=0.01)
    for m in conv_modules(model) + [model.classifier[-1]]:
        assert torch.count_nonzero(m.bias) == 0


def test_torchvision_init():
    model = _init_model("torchvision")
    for m in conv_modules(model)[1:]:  # 64->512 and 512->512: fan_out = 512 * 9
        assert float(m.weight.std()) == pytest.approx(math.sqrt(2 / (512 * 9)), rel=0.02)  # 0.02083
    first = conv_modules(model)[0].weight  # fan_out = 64 * 9, only 1,728 weights: looser
    assert float(first.std()) == pytest.approx(math.sqrt(2 / (64 * 9)), rel=0.1)
    assert float(model.classifier[-1].weight.std()) == pytest.approx(0.01, rel=0.01)
    for m in conv_modules(model) + [model.classifier[-1]]:
        assert torch.count_nonzero(m.bias) == 0
    bn = _init_model("torchvision", batch_norm=True, width=0.125)
    norms = [m for m in bn.features if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 3
    for m in norms:
        assert torch.all(m.weight == 1) and torch.all(m.bias == 0)


def test_xavier_init():
    model = _init_model("xavier")
    big = conv_modules(model)[2].weight
    bound = math.sqrt(6 / (512 * 9 + 512 * 9))  # 0.02552
    assert float(big.abs().max()) <= bound
    assert float(big.abs().max()) > 0.999 * bound
    assert float(big.std()) == pytest.approx(bound / math.sqrt(3), rel=0.01)
    fc = model.classifier[-1].weight
    fc_bound = math.sqrt(6 / (512 + 1000))
    assert float(fc.abs().max()) <= fc_bound and float(fc.abs().max()) > 0.99 * fc_bound
    for m in conv_modules(model) + [model.classifier[-1]]:
        assert torch.count_nonzero(m.bias) == 0


def test_reset_classifier_init_and_dense():
    model = small("vgg11", head="dense", input_size=32)
    model.reset_classifier(1000)
    last = model.classifier[-1]
    assert isinstance(last, nn.Conv2d) and tuple(last.weight.shape) == (1000, 64, 1, 1)
    assert float(last.weight.detach().std()) == pytest.approx(0.01, rel=0.05)  # 64,000 weights
    gap = small("vgg11", head="gap")
    gap.reset_classifier(2)
    assert tuple(gap.classifier[-1].weight.shape) == (2, 64)


# ================================================================================================== property test
@st.composite
def small_arch(draw):
    pools = draw(st.integers(1, 3))
    arch = []
    for _ in range(pools):
        for _ in range(draw(st.integers(1, 2))):
            channels = draw(st.integers(1, 8))
            kernel = draw(st.sampled_from([1, 3]))
            arch.append(channels if kernel == 3 else (channels, 1))
            if draw(st.booleans()) and draw(st.booleans()):
                arch.append("LRN")
        arch.append("M")
    return arch, pools


@settings(max_examples=30, deadline=None)
@given(
    spec=small_arch(),
    head=st.sampled_from(HEADS),
    extra=st.tuples(st.integers(0, 5), st.integers(0, 5)),
    in_channels=st.integers(1, 3),
    num_classes=st.integers(1, 5),
    batch=st.integers(1, 2),
    batch_norm=st.booleans(),
)
def test_property_small_custom_arch(spec, head, extra, in_channels, num_classes, batch, batch_norm):
    arch, pools = spec
    size = (2**pools + extra[0], 2**pools + extra[1])
    model = vggnet.create_model(
        "custom", arch=arch, head=head, input_size=size, in_channels=in_channels, num_classes=num_classes,
        hidden=8, batch_norm=batch_norm,
    ).eval()  # fmt: skip
    assert model.min_size == 2**pools
    assert len(model.feature_info) == pools
    with torch.no_grad():
        out = model(torch.randn(batch, in_channels, *size))
    assert out.shape == (batch, num_classes)
    assert torch.isfinite(out).all()
    too_small = torch.randn(batch, in_channels, 2**pools - 1, size[1])
    with pytest.raises(vggnet.InputSizeError):
        model(too_small)
