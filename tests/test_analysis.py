"""Tests for vggnet.net.analysis (per-layer records, totals) and vggnet.net.memory (training-memory estimate,
byte-size parsing).

Every expected number here is derived by hand, not by the code under test:

- parameters and MACs of the 12 registry models from the paper's Table 1 (re-typed below) with the formulas
  ``params = Cin*k*k*Cout + Cout`` and ``MACs = H*W*Cout*Cin*k*k`` per conv, ``in*out`` per linear layer, and
  checked against REFERENCE.md (which agrees with torchvision's metadata);
- the VGG16 layer table from the cs231n notes ("VGGNet in detail"), row by row, with the totals its rows add up to;
- per-layer oracles that walk the shapes by hand (conv keeps the size with padding k//2, pool halves it);
- the training-memory simulation: what autograd keeps checked against ``saved_tensors_hooks`` on the CPU (fp32 and
  bf16 autocast), every moment of a two-layer toy step written out by hand, VGG16's peak summed from its shapes.

Full-size models are built on the meta device, so nothing is allocated or computed.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import vggnet
from vggnet.net.analysis import summarize
from vggnet.net.memory import (OPTIMIZER_STATE, PRECISIONS, max_batch_size, parse_bytes, saved_bytes, summary_dict,
                                 training_memory)
from vggnet.base.errors import ConfigError

MiB = 2**20


def meta_model(name: str, **kwargs) -> vggnet.VGG:
    with torch.device("meta"):
        return vggnet.create_model(name, **kwargs)


def rows_by_name(summary) -> dict:
    return {r.name: r for r in summary.layers}


# ------------------------------------------------------------------------------------------- 1. registry numbers
# Table 1 of the paper, re-typed here: per block, the convs as (out channels, kernel). Config C's third conv in
# blocks 3-5 is 1x1. A-LRN has A's weights (LRN has no parameters).
TABLE1 = {
    "A": [[(64, 3)], [(128, 3)], [(256, 3)] * 2, [(512, 3)] * 2, [(512, 3)] * 2],
    "B": [[(64, 3)] * 2, [(128, 3)] * 2, [(256, 3)] * 2, [(512, 3)] * 2, [(512, 3)] * 2],
    "C": [[(64, 3)] * 2, [(128, 3)] * 2, [(256, 3), (256, 3), (256, 1)], [(512, 3), (512, 3), (512, 1)],
          [(512, 3), (512, 3), (512, 1)]],
    "D": [[(64, 3)] * 2, [(128, 3)] * 2, [(256, 3)] * 3, [(512, 3)] * 3, [(512, 3)] * 3],
    "E": [[(64, 3)] * 2, [(128, 3)] * 2, [(256, 3)] * 4, [(512, 3)] * 4, [(512, 3)] * 4],
}
TABLE1["A-LRN"] = TABLE1["A"]
NAME_TO_LETTER = {"vgg11": "A", "vgg11_lrn": "A-LRN", "vgg13": "B", "vgg16_c": "C", "vgg16": "D", "vgg19": "E"}
REGISTRY = {**{n: (l, False) for n, l in NAME_TO_LETTER.items()}, **{n + "_bn": (l, True) for n, l in NAME_TO_LETTER.items()}}

# REFERENCE.md: exact params (plain, BN) and GMACs at 224x224x3, 1000 classes.
PUBLISHED = {
    "A": (132_863_336, 132_868_840, 7.609),
    "B": (133_047_848, 133_053_736, 11.308),
    "C": (133_638_952, 133_647_400, 11.771),
    "D": (138_357_544, 138_365_992, 15.470),
    "E": (143_667_240, 143_678_248, 19.632),
}
PUBLISHED["A-LRN"] = PUBLISHED["A"]
# The exact integer MACs, written out (each equals hand_counts() below).
EXACT_MACS = {
    "A": 7_609_090_048,
    "A-LRN": 7_609_090_048,
    "B": 11_308_466_176,
    "C": 11_770_888_192,
    "D": 15_470_264_320,
    "E": 19_632_062_464,
}


def hand_counts(blocks, in_ch=3, size=224, classes=1000, hidden=4096, bn=False) -> tuple[int, int]:
    """(params, MACs) of a classic-head VGG: convs with padding k//2, a 2x2 pool after each block, 7x7 pooling."""
    params = macs = 0
    cin = in_ch
    for i, block in enumerate(blocks):
        side = size // 2**i
        for cout, k in block:
            params += cin * k * k * cout + cout + (2 * cout if bn else 0)  # BN: weight and bias per channel
            macs += side * side * cout * cin * k * k
            cin = cout
    fcs = [(cin * 7 * 7, hidden), (hidden, hidden), (hidden, classes)]
    params += sum(i * o + o for i, o in fcs)
    macs += sum(i * o for i, o in fcs)
    return params, macs


def test_registry_is_the_twelve_models():
    assert sorted(vggnet.list_models()) == sorted(REGISTRY)
    assert len(REGISTRY) == 12


@pytest.mark.parametrize("letter", sorted(TABLE1))
def test_hand_formula_reproduces_reference(letter):
    plain, with_bn, gmacs = PUBLISHED[letter]
    assert hand_counts(TABLE1[letter]) == (plain, EXACT_MACS[letter])
    assert hand_counts(TABLE1[letter], bn=True) == (with_bn, EXACT_MACS[letter])
    assert round(EXACT_MACS[letter] / 1e9, 3) == gmacs


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_registry_params_and_macs_at_224(name):
    letter, bn = REGISTRY[name]
    plain, with_bn, gmacs = PUBLISHED[letter]
    model = meta_model(name)
    totals = summarize(model).totals
    assert totals["params"] == (with_bn if bn else plain)
    assert totals["params"] == sum(p.numel() for p in model.parameters())
    assert totals["trainable_params"] == totals["params"]
    assert totals["macs"] == EXACT_MACS[letter]  # BN variants: same MACs (BN counts 0); LRN: same as A
    assert round(totals["macs"] / 1e9, 3) == gmacs


def test_bn_and_lrn_variants_do_not_change_macs():
    macs = {n: summarize(meta_model(n)).totals["macs"] for n in ("vgg11", "vgg11_bn", "vgg11_lrn", "vgg11_lrn_bn")}
    assert set(macs.values()) == {7_609_090_048}


# ------------------------------------------------------------------------------------- 2. the classic VGG16 table
# cs231n "VGGNet in detail": (our row name, shape HxWxC, values, weights). Values are H*W*C, weights Cin*3*3*Cout
# (FC: in*out); biases are listed separately by us (one per output channel / unit).
CS231N_VGG16 = [
    ("input", (224, 224, 3), 150_528, 0),
    ("conv1_1", (224, 224, 64), 3_211_264, 1_728),
    ("conv1_2", (224, 224, 64), 3_211_264, 36_864),
    ("pool1", (112, 112, 64), 802_816, 0),
    ("conv2_1", (112, 112, 128), 1_605_632, 73_728),
    ("conv2_2", (112, 112, 128), 1_605_632, 147_456),
    ("pool2", (56, 56, 128), 401_408, 0),
    ("conv3_1", (56, 56, 256), 802_816, 294_912),
    ("conv3_2", (56, 56, 256), 802_816, 589_824),
    ("conv3_3", (56, 56, 256), 802_816, 589_824),
    ("pool3", (28, 28, 256), 200_704, 0),
    ("conv4_1", (28, 28, 512), 401_408, 1_179_648),
    ("conv4_2", (28, 28, 512), 401_408, 2_359_296),
    ("conv4_3", (28, 28, 512), 401_408, 2_359_296),
    ("pool4", (14, 14, 512), 100_352, 0),
    ("conv5_1", (14, 14, 512), 100_352, 2_359_296),
    ("conv5_2", (14, 14, 512), 100_352, 2_359_296),
    ("conv5_3", (14, 14, 512), 100_352, 2_359_296),
    ("pool5", (7, 7, 512), 25_088, 0),
    ("fc6", (1, 1, 4096), 4_096, 102_760_448),
    ("fc7", (1, 1, 4096), 4_096, 16_777_216),
    ("fc8", (1, 1, 1000), 1_000, 4_096_000),
]


@pytest.fixture(scope="module")
def vgg16_summary():
    return summarize(meta_model("vgg16"))


def test_vgg16_rows_match_the_cs231n_table(vgg16_summary):
    rows = rows_by_name(vgg16_summary)
    for name, (h, w, c), values, weights in CS231N_VGG16:
        row = rows[name]
        assert h * w * c == values, name  # the table's own arithmetic
        assert math.prod(row.output_shape) == values, name
        assert row.output_shape in ([c, h, w], [c]), name
        assert row.activations == values, name
        assert row.activation_bytes == 4 * values, name
        biases = 0 if weights == 0 else c
        assert row.params == weights + biases, name


def test_vgg16_honest_totals(vgg16_summary):
    t = vgg16_summary.totals
    table_values = sum(v for _, _, v, _ in CS231N_VGG16)
    table_weights = sum(wt for *_, wt in CS231N_VGG16)
    biases = 2 * 64 + 2 * 128 + 3 * 256 + 6 * 512 + 4096 + 4096 + 1000
    # The pure cs231n layer list (no torchvision AdaptiveAvgPool2d row): 15,237,608 values = 58.13 MiB in fp32,
    # not the "24M * 4 bytes ~= 93MB" the page prints as its total.
    assert table_values == 15_237_608
    assert round(table_values * 4 / MiB, 2) == 58.13
    # torchvision's layout adds avgpool (AdaptiveAvgPool2d((7, 7)) on a 7x7 map): one more 512x7x7 = 25,088 values.
    avgpool = rows_by_name(vgg16_summary)["avgpool"]
    assert (avgpool.type, avgpool.activations) == ("AdaptiveAvgPool2d", 25_088)
    assert t["activations"] == table_values + 25_088 == 15_262_696
    assert t["activation_bytes"] == 61_050_784
    assert round(t["activation_bytes"] / MiB, 2) == 58.22
    # Every other row is in-place (ReLU) or a view (eval dropout): 0 new values.
    listed = {name for name, *_ in CS231N_VGG16} | {"avgpool"}
    assert all(r.activations == 0 for r in vgg16_summary.layers if r.name not in listed)
    # Parameters: 138,344,128 weights + 13,416 biases = 138,357,544 (the page's "138M" is right).
    assert table_weights == 138_344_128 and biases == 13_416
    assert t["params"] == table_weights + biases == 138_357_544
    # The page's remark "most of the parameters are in the last FC layers": FC layers hold 89.4%.
    fc = sum(rows_by_name(vgg16_summary)[n].params for n in ("fc6", "fc7", "fc8"))
    assert fc == 123_642_856
    assert round(fc / t["params"], 3) == 0.894


def test_vgg16_largest_activation_and_train_extras(vgg16_summary):
    # conv1_1 / conv1_2: 64x224x224 fp32 = 12.25 MiB, the largest row.
    assert max(r.activation_bytes for r in vgg16_summary.layers) == 3_211_264 * 4 == int(12.25 * MiB)
    # Training-mode extras per image: int64 indices of the 5 pools + fc6/fc7 dropout output and bool mask.
    pools = 802_816 + 401_408 + 200_704 + 100_352 + 25_088
    assert vgg16_summary.train_extra_bytes == 8 * pools + 2 * 4096 * (4 + 1) == 12_283_904


# ------------------------------------------------------------------------------- 3. invariants and layer oracles
def _cases():
    lrn_1x1 = "16,LRN,M,conv1-32,32,M"
    return {
        "vgg16_classic_224": lambda: meta_model("vgg16"),
        "vgg11_lrn_bn_224": lambda: meta_model("vgg11_lrn_bn"),
        "vgg16_c_dense_224": lambda: meta_model("vgg16_c", head="dense"),
        "vgg19_bn_fitted_32": lambda: meta_model("vgg19_bn", head="fitted", input_size=32, num_classes=10),
        "vgg11_gap_w025_gray_32": lambda: meta_model("vgg11", head="gap", width=0.25, in_channels=1, input_size=32,
                                                     num_classes=10),
        "vgg13_classic_64x96": lambda: meta_model("vgg13", input_size=(64, 96), num_classes=5),
        "custom_lrn_1x1_fitted_64x96": lambda: meta_model("custom", arch=lrn_1x1, head="fitted", in_channels=1,
                                                          input_size=(64, 96), num_classes=7, hidden=64),
        "custom_lrn_1x1_dense_64x96": lambda: meta_model("custom", arch=lrn_1x1, head="dense", in_channels=1,
                                                         input_size=(64, 96), num_classes=7, hidden=64),
        "custom_bn_gap_cpu": lambda: vggnet.create_model("custom", arch=[8, "LRN", "M", (16, 1), 16, "M"],
                                                         batch_norm=True, head="gap", input_size=(12, 20),
                                                         in_channels=2, num_classes=3),
    }


CASES = _cases()


def hand_walk(model: vggnet.VGG, summary) -> None:
    """Recompute every row from the previous row's shape and the module's own hyper-parameters."""
    rows = summary.layers
    assert rows[0].name == "input" and rows[0].type == "Input"
    shape = tuple(rows[0].output_shape)
    assert shape == (model.in_channels, *model.input_size)
    assert rows[0].activations == math.prod(shape) and rows[0].params == 0 and rows[0].macs == 0
    for r in rows[1:]:
        m = model.get_submodule(r.module)
        assert r.type == type(m).__name__
        if r.module.startswith("classifier.") and model.head != "dense":
            shape = (math.prod(shape),)  # forward_head flattens before the classifier
        values, macs, params = None, 0, 0
        if isinstance(m, nn.Conv2d):
            (kh, kw), (ph, pw) = m.kernel_size, m.padding
            c, h, w = shape
            assert m.in_channels == c and m.stride == (1, 1) and m.groups == 1
            shape = (m.out_channels, h + 2 * ph - kh + 1, w + 2 * pw - kw + 1)
            values = math.prod(shape)
            macs = shape[1] * shape[2] * m.out_channels * c * kh * kw  # H*W*Cout*Cin*k*k
            params = m.out_channels * c * kh * kw + m.out_channels
        elif isinstance(m, nn.Linear):
            assert shape == (m.in_features,)
            shape = (m.out_features,)
            values, macs, params = m.out_features, m.in_features * m.out_features, (m.in_features + 1) * m.out_features
        elif isinstance(m, nn.MaxPool2d):
            c, h, w = shape
            shape = (c, h // 2, w // 2)
            values = math.prod(shape)
        elif isinstance(m, nn.ReLU):
            assert m.inplace
            values = 0  # in place: the conv/linear output is overwritten, nothing new
        elif isinstance(m, nn.Dropout):
            values = 0  # eval mode: returns its input
        elif isinstance(m, nn.Identity):
            values = 0
        elif isinstance(m, nn.BatchNorm2d):
            values, params = math.prod(shape), 2 * shape[0]
        elif isinstance(m, nn.LocalResponseNorm):
            values = math.prod(shape)
        elif isinstance(m, nn.AdaptiveAvgPool2d):
            out = m.output_size if isinstance(m.output_size, tuple) else (m.output_size, m.output_size)
            shape = (shape[0], *out)
            values = math.prod(shape)
        else:
            raise AssertionError(f"no oracle for {type(m).__name__}")
        assert tuple(r.output_shape) == shape, r.name
        assert (r.activations, r.macs, r.params) == (values, macs, params), r.name
        assert r.activation_bytes == 4 * values, r.name
    assert shape == (model.num_classes,) or shape == (model.num_classes, 1, 1)


@pytest.mark.parametrize("case", sorted(CASES))
def test_rows_sum_to_totals_and_match_hand_oracles(case):
    model = CASES[case]()
    summary = summarize(model)
    t = summary.totals
    rows = [r.to_dict() for r in summary.layers]
    for key in ("params", "trainable_params", "macs", "activations", "activation_bytes"):
        assert t[key] == sum(r[key] for r in rows), key
    assert t["params"] == sum(p.numel() for p in model.parameters())
    assert t["frozen_params"] == 0
    assert summary.unsupported == [] and summary.uncalled == []
    hand_walk(model, summary)
    data = summary.to_dict()
    assert data["totals"]["params"] == sum(r["params"] for r in data["layers"])
    assert data["totals"]["macs"] == sum(r["macs"] for r in data["layers"])


def test_custom_lrn_1x1_dense_exact_numbers():
    # 1x64x96 -> conv3-16 (+LRN) -> pool -> 16x32x48 -> conv1-32 -> conv3-32 -> pool -> 32x16x24 -> dense head:
    # FC1 as a 16x24 conv to 64, FC2 1x1 64->64, FC3 1x1 64->7.
    summary = summarize(CASES["custom_lrn_1x1_dense_64x96"]())
    rows = rows_by_name(summary)
    assert rows["conv1_1"].macs == 64 * 96 * 16 * 1 * 9 == 884_736
    assert rows["lrn1_1"].activations == 16 * 64 * 96 == 98_304
    assert rows["conv2_1"].macs == 32 * 48 * 32 * 16 * 1 == 786_432  # the 1x1 conv
    assert rows["conv2_1"].params == 16 * 32 + 32 == 544
    assert rows["fc6"].macs == 64 * 32 * 16 * 24 == 786_432
    assert rows["fc6"].output_shape == [64, 1, 1]
    assert summary.totals["params"] == 160 + 544 + 9_248 + 786_496 + 4_160 + 455 == 801_063
    assert summary.totals["macs"] == 884_736 + 786_432 + 14_155_776 + 786_432 + 4_096 + 448 == 16_617_920


def test_meta_and_cpu_models_give_identical_records():
    kwargs = dict(arch="8,LRN,M,conv1-16,16,M", head="dense", in_channels=1, input_size=(16, 24), num_classes=3,
                  hidden=32)
    cpu = summarize(vggnet.create_model("custom", **kwargs))
    meta = summarize(meta_model("custom", **kwargs))
    assert [r.to_dict() for r in cpu.layers] == [r.to_dict() for r in meta.layers]
    assert cpu.train_extra_bytes == meta.train_extra_bytes


def test_plain_module_oracles_inplace_views_unsupported_and_uncalled():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 6, 3, padding=1, groups=2)  # 6x8x8; MACs 8*8*6*(4/2)*9
            self.act = nn.ReLU()  # not in place: a new tensor
            self.pool = nn.MaxPool2d(2)  # 6x4x4
            self.odd = nn.Tanh()  # no MAC rule: must be reported, not silently 0
            self.flat = nn.Flatten()  # a view: 0 new values
            self.fc = nn.Linear(96, 5)
            self.unused = nn.Linear(3, 3)  # never called

        def forward(self, x):
            return self.fc(self.flat(self.odd(self.pool(self.act(self.conv(x))))))

    s = summarize(Net(), input_size=8, in_channels=4)
    rows = {r.module: r for r in s.layers}
    assert rows["conv"].macs == 8 * 8 * 6 * 2 * 9 == 6_912
    assert rows["conv"].params == 6 * 2 * 9 + 6 == 114
    assert rows["act"].activations == 6 * 8 * 8 == 384
    assert rows["pool"].activations == 6 * 4 * 4 == 96
    assert rows["flat"].activations == 0
    assert rows["fc"].macs == 96 * 5 and rows["fc"].activations == 5
    assert s.unsupported == ["odd (Tanh)", "12 parameters outside the recorded layers"]
    assert s.uncalled == ["unused"]
    assert s.totals["activations"] == 4 * 8 * 8 + 384 + 384 + 96 + 96 + 0 + 5
    assert s.totals["params"] == 114 + 96 * 5 + 5  # the recorded layers; the unused 12 are flagged above


def test_inplace_relu_counts_zero_everywhere_in_vgg(vgg16_summary):
    relus = [r for r in vgg16_summary.layers if r.type == "ReLU"]
    assert len(relus) == 15  # 13 convs + fc6 + fc7
    assert all(r.activations == 0 and r.activation_bytes == 0 for r in relus)


@pytest.mark.parametrize("dtype,size", [(torch.bfloat16, 2), (torch.float16, 2), (torch.float64, 8)])
def test_activation_bytes_follow_dtype(dtype, size):
    model = CASES["custom_lrn_1x1_fitted_64x96"]()
    fp32 = summarize(model)
    other = summarize(model, dtype=dtype)
    assert other.dtype == str(dtype).replace("torch.", "")
    for a, b in zip(fp32.layers, other.layers):
        assert b.activations == a.activations
        assert b.activation_bytes == a.activations * size
    assert other.totals["activation_bytes"] * 4 == fp32.totals["activation_bytes"] * size
    if dtype is torch.bfloat16:
        assert other.totals["activation_bytes"] * 2 == fp32.totals["activation_bytes"]


# ---------------------------------------------------------------------------------------- 4. training memory
# Tiny model: 1x8x8 input -> conv3-8 -> pool -> conv3-16 -> pool -> 16x2x2 -> fitted head 64 -> 32 -> 32 -> 10.
TINY = dict(arch=[8, "M", 16, "M"], in_channels=1, input_size=8, head="fitted", hidden=32, num_classes=10)
TINY_PARAMS = (1 * 9 * 8 + 8) + (8 * 9 * 16 + 16) + (64 * 32 + 32) + (32 * 32 + 32) + (32 * 10 + 10)  # 4,714
TINY_FEATURE_PARAMS = (1 * 9 * 8 + 8) + (8 * 9 * 16 + 16)  # 1,248
# input, conv1, pool1, conv2, pool2, fc6, fc7, fc8 (ReLU in place, Identity avgpool and eval dropout: 0)
TINY_VALUES = 64 + 8 * 64 + 8 * 16 + 16 * 16 + 16 * 4 + 32 + 32 + 10  # 1,098
TINY_EXTRA = 8 * (8 * 16 + 16 * 4) + 2 * 32 * (4 + 1)  # pool int64 indices + 2 dropouts (fp32 out + bool mask)
TINY_LARGEST = 4 * 8 * 64  # conv1 output, fp32


@pytest.fixture(scope="module")
def tiny():
    return summarize(vggnet.create_model("custom", **TINY))


def test_tiny_model_hand_numbers(tiny):
    assert (TINY_PARAMS, TINY_VALUES, TINY_EXTRA, TINY_LARGEST) == (4_714, 1_098, 1_856, 2_048)
    assert tiny.totals["params"] == TINY_PARAMS
    assert tiny.totals["activations"] == TINY_VALUES
    assert tiny.totals["activation_bytes"] == 4 * TINY_VALUES
    assert tiny.train_extra_bytes == TINY_EXTRA


# The oracle of what autograd keeps: every distinct storage handed to saved_tensors_hooks during one training-mode
# forward on the CPU (fp32, or bf16 under CPU autocast), the model's own parameters and buffers left out.
def saved_by_autograd(model: nn.Module, batch: int, precision: str) -> int:
    model.train()
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    x = torch.randn(batch, model.in_channels, *model.input_size)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            model(x)
    return sum(saved.values())


ORACLE_CASES = {
    "fitted_dropout": TINY,  # conv, in-place ReLU, max-pool (indices), linear, dropout (CPU: a noise tensor)
    "bn_classic": dict(arch=[8, "M", 16, "M"], input_size=8, head="classic", hidden=32, num_classes=10,
                       batch_norm=True),  # batch norm; AdaptiveAvgPool2d 2x2 -> 7x7 keeps its input
    "bn_gap": dict(arch=[8, 8, "M", 16, "M"], input_size=16, head="gap", num_classes=5, batch_norm=True),  # a mean
    "lrn_dense": dict(arch="8,LRN,M,conv1-16,16,M", head="dense", in_channels=1, input_size=(16, 24),
                      num_classes=3, hidden=32),  # LRN; conv head
}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("frozen", [False, True], ids=["trained", "frozen_features"])
@pytest.mark.parametrize("case", sorted(ORACLE_CASES))
def test_saved_bytes_equal_what_autograd_saves_on_cpu(case, frozen, precision):
    torch.manual_seed(0)
    model = vggnet.create_model("custom", **ORACLE_CASES[case])
    for p in model.features.parameters() if frozen else ():
        p.requires_grad_(False)  # then the frozen layers save nothing, and the first linear no weight copy
    summary = summarize(model)
    for batch in (1, 3):
        assert saved_bytes(summary, batch, precision, "cpu") == saved_by_autograd(model, batch, precision)


def test_saved_bytes_of_vgg16_by_hand(vgg16_summary):
    # Values autograd keeps per image, from the shapes: the input (conv1_1), every conv output (its ReLU and the
    # next layer), the pool outputs (the next conv; pool5's by avgpool, which maps 7x7 to 7x7), avgpool's output
    # (fc6), fc6/fc7 outputs (ReLU) and the two dropout outputs (fc7, fc8); fc8's logits are not kept.
    values = (3 * 224**2 + 64 * 224**2 * 2 + 128 * 112**2 * 2 + 256 * 56**2 * 3 + 512 * 28**2 * 3 + 512 * 14**2 * 3
              + 64 * 112**2 + 128 * 56**2 + 256 * 28**2 + 512 * 14**2 + 512 * 7**2 + 512 * 7**2 + 4 * 4096)
    indices = 8 * (64 * 112**2 + 128 * 56**2 + 256 * 28**2 + 512 * 14**2 + 512 * 7**2)  # int64, per pool output
    masks = 2 * 4096  # CUDA dropout: one bool per value
    assert (values, indices) == (15_269_888, 12_242_944)
    assert saved_bytes(vgg16_summary, 2, "fp32") == 2 * (4 * values + indices + masks)
    # bf16 autocast: every value in 2 bytes (the input through its cast copy), the same indices and masks, and the
    # 2-byte copies of the 13 conv and 3 linear weights (not the biases) once per batch.
    weights = 138_357_544 - 13_416
    assert saved_bytes(vgg16_summary, 2, "bf16") == 2 * (2 * values + indices + masks) + 2 * weights
    # On the CPU dropout keeps a noise tensor of its input's dtype instead of a bool mask.
    assert saved_bytes(vgg16_summary, 2, "fp32", "cpu") == 2 * (4 * values + indices + 4 * masks)


class Toy(nn.Module):
    """1x4x4 -> conv3x3 1->2 (ReLU in place) -> flatten -> linear 32->3: small enough to simulate by hand."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)  # 18 + 2 params
        self.act = nn.ReLU(inplace=True)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(32, 3)  # 96 + 3 params

    def forward(self, x):
        return self.fc(self.flat(self.act(self.conv(x))))


@pytest.fixture(scope="module")
def toy():
    return summarize(Toy(), input_size=4, in_channels=1)


# fp32, per image: the input x 64 B (kept by conv), labels 8 B, the conv output A 128 B (kept by ReLU and fc),
# logits 12 B, log-probabilities 12 B. 119 params: weights = gradients = momentum = 476 B. Moments:
#   forward conv/act/flat  1428 + (x + labels + A) b              = 1428 + 200 b
#   forward fc             1428 + (x + labels + A + logits) b     = 1428 + 212 b
#   loss                   1428 + (... + log-probs) b             = 1428 + 224 b
#   backward fc            476 + 476 + 396 (fc grads) + (x + labels + logits + A) b + (12 + 128) b = 1348 + 352 b
#   backward act           1348 + 212 b + (128 + 128) b (output and input gradient)               = 1348 + 468 b
#   backward conv          476 + 476 + 476 + (x + labels + logits) b + 128 b (no input gradient)  = 1428 + 212 b
#   optimizer step         1428 + 84 b
TOY_PEAK = {"peak_at": "backward act", "weights": 476, "gradients": 396, "optimizer_state": 476}


@pytest.mark.parametrize("batch", [1, 5])
def test_toy_peak_by_hand(toy, batch):
    mem = training_memory(toy, batch, "sgd")
    assert mem.to_dict() == {"batch_size": batch, "optimizer": "sgd", "precision": "fp32", "device": "cuda",
                             **TOY_PEAK, "activations": 212 * batch, "weight_copies": 0,
                             "backward_workspace": 256 * batch, "total": 1348 + 468 * batch}


def test_toy_peak_with_adam_is_the_optimizer_step(toy):
    # Adam: state 952 B. On CUDA, foreach Adam's sqrt(v) temporaries: one more 4 B per parameter (476 B); at batch
    # 1 the step (476 + 952 + 476 + 476 + 84 = 2464) beats backward act (476 + 952 + 396 + 468 = 2292).
    mem = training_memory(toy, 1, "adam")
    assert (mem.peak_at, mem.backward_workspace, mem.total) == ("optimizer step", 476, 2464)
    assert training_memory(toy, 2, "adam").total == 1824 + 468 * 2  # the activations win from batch 2
    # On the CPU, torch's per-tensor Adam makes two temporaries of the largest tensor (fc weight, 96 x 4 B).
    assert training_memory(toy, 1, "adam", device="cpu").total == 1904 + 2 * 384 + 84


# bf16 autocast, per image: x 64 B + labels 8 B; conv keeps a 2-byte copy of x (32 B) and of its weight (36 B per
# batch); A in bf16 (64 B); fc keeps A and a 2-byte weight copy (192 B); logits 6 B. Autocast also caches the bias
# copies (4 B, 6 B) during the forward, and backward writes 2-byte weight gradients before the fp32 ones:
#   backward fc    476 + 476 + 396 + copies 228 + bf16 fc grads 198 + (64 + 8 + 6 + 32 + 64) b + (6 + 64) b
#                  = 1774 + 244 b
#   backward act   476 + 476 + 396 + copy 36 + 174 b + (64 + 64) b = 1384 + 302 b
#   loss           1428 + 228 + (64 + 8 + 6 + 12 + 12 (logits.float()) + 32 + 64) b = 1656 + 198 b
@pytest.mark.parametrize("batch,peak_at,total,copies", [(1, "backward fc", 1774 + 244, 228),
                                                       (8, "backward act", 1384 + 302 * 8, 36)])
def test_toy_peak_by_hand_in_bf16(toy, batch, peak_at, total, copies):
    mem = training_memory(toy, batch, "sgd", "bf16")
    assert (mem.peak_at, mem.total, mem.weight_copies, mem.precision) == (peak_at, total, copies, "bf16")
    assert saved_bytes(toy, batch, "bf16") == (32 + 64) * batch + 36 + 192
    assert saved_bytes(toy, batch, "fp32") == (64 + 128) * batch


def test_toy_max_batch_size_by_hand(toy):
    # Every moment is linear in b; the peak moment (backward act, 1348 + 468 b) binds first.
    assert max_batch_size(toy, 1348 + 468 * 7) == 7
    assert max_batch_size(toy, 1348 + 468 * 7 - 1) == 6
    assert max_batch_size(toy, 5_000) == 7  # 4,624 <= 5,000 < 5,092
    assert max_batch_size(toy, 1_000) == 0  # not even the weights fit
    assert max_batch_size(toy, 2_463, "adam") == 0 and max_batch_size(toy, 2_464, "adam") == 1  # the step binds


def test_summary_dict_adds_the_estimate_for_the_device_asked(toy):
    # Adam at batch 1 peaks at the optimizer step, whose temporaries differ per device: CUDA 476 B (2,464 in all),
    # the CPU 2 x 384 B (2,756), so a 2,464 B budget fits one image for CUDA and none for the CPU.
    base = toy.to_dict()
    assert "training_memory" not in base and summary_dict(toy) == base
    cuda = summary_dict(toy, 1, "adam", budget=2_464, device="cuda")
    cpu = summary_dict(toy, 1, "adam", budget=2_464, device="cpu")
    assert {k: v for k, v in cuda.items() if k not in ("training_memory", "memory_budget", "max_batch_size")} == base
    assert cuda["training_memory"] == training_memory(toy, 1, "adam", device="cuda").to_dict()
    assert (cuda["training_memory"]["device"], cuda["training_memory"]["total"]) == ("cuda", 2_464)
    assert (cpu["training_memory"]["device"], cpu["training_memory"]["total"]) == ("cpu", 1904 + 2 * 384 + 84)
    assert (cuda["memory_budget"], cuda["max_batch_size"], cpu["max_batch_size"]) == (2_464, 1, 0)


@settings(max_examples=60, deadline=None)
@given(budget=st.integers(min_value=0, max_value=10**8), optimizer=st.sampled_from(sorted(OPTIMIZER_STATE)),
       precision=st.sampled_from(sorted(PRECISIONS)), device=st.sampled_from(["cuda", "cpu"]))
def test_max_batch_size_property(tiny, budget, optimizer, precision, device):
    b = max_batch_size(tiny, budget, optimizer, precision, device)
    if b >= 1:
        assert training_memory(tiny, b, optimizer, precision, device).total <= budget
    assert training_memory(tiny, b + 1, optimizer, precision, device).total > budget


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(min_value=1, max_value=10_000), optimizer=st.sampled_from(sorted(OPTIMIZER_STATE)),
       precision=st.sampled_from(sorted(PRECISIONS)))
def test_training_memory_is_monotone_and_adds_up(tiny, batch, optimizer, precision):
    mem = training_memory(tiny, batch, optimizer, precision)
    more = training_memory(tiny, batch + 1, optimizer, precision)
    assert more.total > mem.total
    terms = ("weights", "gradients", "optimizer_state", "activations", "weight_copies", "backward_workspace")
    assert mem.total == sum(getattr(mem, t) for t in terms) == mem.to_dict()["total"]
    assert mem.weights == 4 * TINY_PARAMS and mem.optimizer_state == 4 * TINY_PARAMS * OPTIMIZER_STATE[optimizer]
    assert 0 < mem.gradients <= 4 * TINY_PARAMS


def test_frozen_features_reduce_gradients_and_optimizer_state():
    model = vggnet.create_model("custom", **TINY)
    for p in model.features.parameters():
        p.requires_grad_(False)
    s = summarize(model)
    trainable = TINY_PARAMS - TINY_FEATURE_PARAMS  # 3,466
    assert s.frozen_params == TINY_FEATURE_PARAMS == 1_248
    assert s.totals["frozen_params"] == 1_248
    assert s.totals["trainable_params"] == trainable == 3_466
    assert s.totals["params"] == TINY_PARAMS  # frozen weights still sit in memory
    mem = training_memory(s, 2, "adam")
    assert (mem.weights, mem.optimizer_state) == (4 * TINY_PARAMS, 8 * trainable)
    assert mem.gradients <= 4 * trainable
    # Nothing before fc6 needs a gradient: autograd keeps only fc6's input (pool2's output, 64 values).
    assert saved_bytes(s, 2) < saved_bytes(summarize(vggnet.create_model("custom", **TINY)), 2)
    assert s.to_dict()["totals"]["frozen_params"] == 1_248


def test_training_memory_rejects_bad_arguments(tiny):
    with pytest.raises(ConfigError, match="unknown optimizer 'rmsprop'"):
        training_memory(tiny, 1, "rmsprop")
    with pytest.raises(ConfigError, match="batch size must be >= 1"):
        training_memory(tiny, 0)
    with pytest.raises(ConfigError, match="unknown precision 'int8'"):
        training_memory(tiny, 1, "sgd", "int8")
    with pytest.raises(ConfigError, match="unknown device 'mps'"):
        max_batch_size(tiny, 10**6, device="mps")
    assert training_memory(tiny, 1, device="cuda:1").device == "cuda"


def test_vgg16_training_memory_at_batch_32(vgg16_summary):
    # The peak is the loss: last step's gradients still allocated and everything saved for backward, plus the
    # batch (images, int64 labels), logits and log-probabilities: 73,338,696 B per image (hand sum below).
    params = 138_357_544
    per_image = 4 * 15_269_888 + 12_242_944 + 2 * 4096 + 8 + 4 * 1000 + 4 * 1000
    assert per_image == 73_338_696
    sgd = training_memory(vgg16_summary, 32, "sgd")
    assert (sgd.peak_at, sgd.backward_workspace) == ("loss", 0)
    assert sgd.total == 3 * 4 * params + 32 * per_image == 4_007_128_800
    adam = training_memory(vgg16_summary, 32, "adam")
    assert adam.total == 4 * 4 * params + 32 * per_image == 4_560_558_976
    # No backward moment grows faster per image (at most x + two conv1 maps saved + two in flight), so the loss
    # moment binds at every batch size.
    assert max_batch_size(vgg16_summary, 11 * 2**30, "sgd") == (11 * 2**30 - 12 * params) // per_image == 138
    assert max_batch_size(vgg16_summary, 11 * 10**9, "sgd") == 127
    assert max_batch_size(vgg16_summary, 11 * 2**30, "adam") == 130


# ---------------------------------------------------------------------------------------------- parse_bytes
@pytest.mark.parametrize(
    "text,expected",
    [
        ("11GiB", 11 * 2**30),
        ("11GB", 11 * 10**9),
        ("11gib", 11 * 2**30),
        (" 11 GB ", 11 * 10**9),
        ("512MiB", 512 * 2**20),
        ("512MB", 512 * 10**6),
        ("8G", 8 * 2**30),  # a bare unit letter means binary
        ("8g", 8 * 2**30),
        ("1.5GiB", 3 * 2**29),
        (".5G", 2**29),
        ("100", 100),
        ("100B", 100),
        ("2k", 2048),
        ("2kB", 2000),
        ("1TiB", 2**40),
        ("8.2MB", 8_200_000),  # exact decimal arithmetic (float gave 8,199,999)
        ("2.01KB", 2_010),  # ditto (float gave 2,009)
    ],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["lots", "", "GB", "11 XB", "-1GB", "1e9", "11GiBs", "11iB", "1,000", "11 G iB"])
def test_parse_bytes_rejects_non_sizes(text):
    with pytest.raises(ConfigError, match="is not a size"):
        parse_bytes(text)
