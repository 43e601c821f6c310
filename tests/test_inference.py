"""The fast inference path and the small-map GEMM convolution: numerical equality with the plain model.

Oracles: batch norm folded into the preceding conv is the same affine map (fp32 within 1e-5); the GEMM
convolution is ``F.conv2d`` (float64 gradcheck, so forward and every gradient are checked); bf16 stays within the
documented tolerance of fp32. No timings here.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vggnet import create_model
from vggnet.base.errors import ConfigError
from vggnet.runtime import cpu_has_bf16
from vggnet.net.cpu_bf16 import (SmallMapConv2d, _GemmConv3x3, im2col3x3, pool_before_relu, small_map,
                             tune_for_cpu_bf16, use_small_map_convs)
from vggnet.evaluation.inference import (BF16_RTOL, ConvReLU, InferenceModel, fold_batch_norms, fold_conv_bn,
                              fuse_conv_relu, optimize_for_inference, resolve_precision)


def _randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so folding has something to get wrong."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, nn.BatchNorm2d):
                n = bn.num_features
                bn.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
                bn.running_var.copy_(torch.rand(n, generator=gen) * 1.8 + 0.2)
                bn.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                bn.bias.copy_(torch.randn(n, generator=gen) * 0.2)
    return model


@pytest.fixture
def small_bn_model():
    torch.manual_seed(0)
    return _randomise_bn(create_model("vgg11_bn", num_classes=10, input_size=32, head="gap", width=0.25)).eval()


# ------------------------------------------------------------------------------------------------ BN folding
@pytest.mark.parametrize("bias", [True, False])
def test_fold_conv_bn_is_the_same_affine_map(bias):
    torch.manual_seed(1)
    conv = nn.Conv2d(5, 7, 3, padding=1, bias=bias)
    bn = _randomise_bn(nn.Sequential(nn.BatchNorm2d(7)))[0].eval()
    x = torch.randn(3, 5, 9, 9)
    with torch.no_grad():
        expected = bn(conv(x))
        got = fold_conv_bn(conv, bn)(x)
    assert torch.allclose(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name,size,head", [("vgg11_bn", 32, "gap"), ("vgg13_bn", 64, "fitted"),
                                            ("vgg16_bn", 32, "classic")])
@pytest.mark.parametrize("channels_last", [False, True])
def test_folded_model_equals_original_in_fp32(name, size, head, channels_last):
    torch.manual_seed(0)
    model = _randomise_bn(create_model(name, num_classes=10, input_size=size, head=head, width=0.25,
                                       hidden=64)).eval()
    x = torch.randn(4, 3, size, size)
    fast = optimize_for_inference(model, precision="fp32", channels_last=channels_last)
    with torch.no_grad():
        expected, got = model(x), fast(x)
    assert "fold_bn" in fast.steps
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-5


def test_folding_replaces_every_bn_and_keeps_layer_names(small_bn_model):
    model = small_bn_model
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    folded = fold_batch_norms(model)
    assert folded == n_bn == 8
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert isinstance(model.features[model.layer_names["bn1_1"]], nn.Identity)
    assert isinstance(model.features[model.layer_names["conv1_1"]], nn.Conv2d)


def test_folding_needs_eval_mode_and_running_stats(small_bn_model):
    with pytest.raises(ConfigError, match="eval-mode"):
        fold_batch_norms(small_bn_model.train())
    with pytest.raises(ConfigError, match="running statistics"):
        fold_conv_bn(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.cpu_bf16)])
def test_conv_relu_fusion_equals_conv_then_relu(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Identity(), nn.ReLU(inplace=True),
                          nn.Conv2d(8, 8, 3, padding=1), nn.MaxPool2d(2), nn.Conv2d(8, 4, 1), nn.ReLU()).eval()
    model = model.to(dtype).to(memory_format=torch.channels_last)
    keys = list(model.state_dict())
    x = torch.randn(2, 3, 12, 12, dtype=dtype).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        expected = model(x)
        assert fuse_conv_relu(model, max_pixels=0) == 2
        got = model(x)
    assert [type(m).__name__ for m in model] == ["ConvReLU", "Identity", "Identity", "Conv2d", "MaxPool2d",
                                                "ConvReLU", "Identity"]
    assert isinstance(model[0], ConvReLU) and isinstance(model[0], nn.Conv2d)
    assert list(model.state_dict()) == keys
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert ((got.float() - expected.float()).norm() / expected.float().norm()).item() < tol
    assert (got >= 0).all()


@pytest.mark.cpu_bf16
def test_optimize_for_inference_leaves_the_input_model_alone(small_bn_model):
    before = {k: v.clone() for k, v in small_bn_model.state_dict().items()}
    optimize_for_inference(small_bn_model, precision="bf16")
    after = small_bn_model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(isinstance(m, nn.BatchNorm2d) for m in small_bn_model.modules())


def test_inference_model_refuses_training(small_bn_model):
    fast = optimize_for_inference(small_bn_model, precision="fp32")
    assert isinstance(fast, InferenceModel) and not fast.training
    with pytest.raises(ConfigError, match="inference only"):
        fast.train()


def test_resolve_precision():
    assert resolve_precision("fp32") == "fp32"
    assert resolve_precision("auto", "cpu") == ("bf16" if cpu_has_bf16() else "fp32")
    with pytest.raises(ConfigError, match="precision"):
        resolve_precision("fp16")
    with pytest.raises(ConfigError, match="precision"):
        resolve_precision("int4")


@pytest.mark.cpu_bf16
def test_resolve_precision_bf16():
    assert resolve_precision("bf16") == "bf16"


def test_bf16_is_refused_in_one_line_where_the_cpu_cannot_run_it(monkeypatch):
    from vggnet import runtime

    monkeypatch.setattr(runtime, "cpu_runs_bf16", lambda: False)
    with pytest.raises(ConfigError, match="cannot run bf16 convolutions.*--precision fp32"):
        resolve_precision("bf16")


# ----------------------------------------------------------------------------------------------------- bf16
@pytest.mark.cpu_bf16
def test_bf16_path_within_stated_tolerance_of_fp32(small_bn_model):
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    fast = optimize_for_inference(small_bn_model, precision="bf16")
    assert fast.steps == ["fold_bn", "fuse_conv_relu", "channels_last", "bf16", "small_map_gemm"]
    with torch.inference_mode():
        expected, got = small_bn_model(x), fast(x)
    assert got.dtype == torch.float32
    rel = ((got - expected).norm() / expected.norm()).item()
    assert rel < BF16_RTOL
    assert (got.argmax(1) == expected.argmax(1)).float().mean() >= 0.9


# ------------------------------------------------------------------------------------------ small-map GEMM conv
def test_im2col_matches_unfold():
    x = torch.randn(2, 5, 4, 3)  # NCHW
    cols = im2col3x3(x.permute(0, 2, 3, 1).contiguous())  # (B*H*W, 9*C), taps (kh, kw) major, channels minor
    unfold = F.unfold(x, 3, padding=1)  # (B, C*9, H*W), channels major
    expected = unfold.view(2, 5, 9, 12).permute(0, 3, 2, 1).reshape(24, 45)
    assert torch.equal(cols, expected)


@pytest.mark.parametrize("bias", [True, False])
def test_gemm_conv_forward_and_gradients_equal_conv2d(bias):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 6, 4, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(5, 6, 3, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, generator=gen, requires_grad=True) if bias else None
    assert torch.allclose(_GemmConv3x3.apply(x, w, b), F.conv2d(x, w, b, padding=1), atol=1e-12)
    assert torch.autograd.gradcheck(_GemmConv3x3.apply, (x, w, b))


def test_small_map_conv_bf16_matches_conv2d_and_fp32_is_untouched():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 8, 3, padding=1)
    fast = SmallMapConv2d.from_conv(conv)
    assert fast.weight is conv.weight and fast.bias is conv.bias
    x = torch.randn(4, 16, 4, 4).contiguous(memory_format=torch.channels_last)
    assert torch.equal(fast(x), conv(x))  # fp32: the ordinary path, bit for bit
    xb = x.bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fast(xb)
    got.float().sum().backward()
    expected = F.conv2d(xb.detach().float(), conv.weight.bfloat16().float(), conv.bias.bfloat16().float(), padding=1)
    assert got.dtype == torch.bfloat16
    assert ((got.float() - expected).norm() / expected.norm()).item() < 1e-2
    assert conv.weight.grad is not None and conv.weight.grad.dtype == torch.float32
    assert xb.grad is not None and xb.grad.shape == xb.shape


def test_small_map_conv_takes_gemm_path_only_where_it_pays(monkeypatch):
    calls = []
    original = _GemmConv3x3.apply
    monkeypatch.setattr(_GemmConv3x3, "apply", lambda *a: calls.append(tuple(a[0].shape)) or original(*a))
    narrow = SmallMapConv2d.from_conv(nn.Conv2d(4, 4, 3, padding=1)).bfloat16()
    wide = SmallMapConv2d.from_conv(nn.Conv2d(128, 256, 3, padding=1)).bfloat16()
    narrow(torch.randn(1, 4, 2, 2, dtype=torch.bfloat16))  # 2x2: always the GEMM
    narrow(torch.randn(1, 4, 4, 4, dtype=torch.bfloat16))  # 4x4, narrow: oneDNN
    wide(torch.randn(1, 128, 4, 4, dtype=torch.bfloat16))  # 4x4, 128 x 256 channels: the GEMM
    wide(torch.randn(1, 128, 8, 8, dtype=torch.bfloat16))  # 8x8: oneDNN
    SmallMapConv2d.from_conv(nn.Conv2d(4, 4, 3, padding=1))(torch.randn(1, 4, 2, 2))  # fp32: oneDNN
    assert calls == [(1, 4, 2, 2), (1, 128, 4, 4)]


@pytest.mark.parametrize("conv, height, width, max_pixels, gemm", [
    (nn.Conv2d(4, 4, 3, padding=1), 2, 2, 16, True), (nn.Conv2d(4, 4, 3, padding=1), 4, 4, 16, False),
    (nn.Conv2d(128, 128, 3, padding=1), 4, 4, 16, True), (nn.Conv2d(128, 127, 3, padding=1), 4, 4, 16, False),
    (nn.Conv2d(128, 256, 3, padding=1), 8, 8, 16, False), (nn.Conv2d(128, 256, 3, padding=1), 1, 16, 16, True),
    (nn.Conv2d(4, 4, 3, padding=1), 2, 2, 0, False), (nn.Conv2d(4, 4, 3, padding=1, stride=2), 2, 2, 16, False),
    (nn.Conv2d(4, 4, 1), 1, 1, 16, False)])
def test_small_map_is_the_rule_of_the_gemm_path(conv, height, width, max_pixels, gemm):
    assert small_map(conv, height, width, max_pixels) is gemm


def test_use_small_map_convs_swaps_eligible_convs_only_and_keeps_state_dict():
    model = create_model("vgg16_c", num_classes=10, input_size=32, head="gap", width=0.25)  # has 1x1 convs
    keys = list(model.state_dict())
    params = list(model.parameters())
    swapped = use_small_map_convs(model)
    assert swapped == 10  # config C: 13 convs, of which the third of blocks 3, 4 and 5 are 1x1
    assert list(model.state_dict()) == keys
    assert all(a is b for a, b in zip(model.parameters(), params))
    kinds = [type(m).__name__ for m in model.features if isinstance(m, nn.Conv2d)]
    assert kinds.count("Conv2d") == 3 and kinds.count("SmallMapConv2d") == 10


# ------------------------------------------------------------------------------------ training-time rewrites
def test_pool_before_relu_equal_values_and_gradients():
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    x[0, 0, :2, :2] = 0.0  # ties at zero
    x[0, 1, :2, :2] = -1.0  # a window with no positive value
    x[1, 2, 2:4, 2:4] = 0.5  # a window of positive ties
    plain = nn.Sequential(nn.ReLU(), nn.MaxPool2d(2))
    fast = nn.Sequential(nn.ReLU(), nn.MaxPool2d(2))
    assert pool_before_relu(fast) == 1
    assert [type(m).__name__ for m in fast] == ["Identity", "MaxPoolReLU"]
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn(2, 3, 3, 3, dtype=torch.float64)
    ya, yb = plain(a), fast(b)
    ya.backward(g)
    yb.backward(g)
    assert torch.equal(ya, yb) and torch.equal(a.grad, b.grad)


def test_tune_for_cpu_bf16_keeps_fp32_outputs_gradients_and_state_dict():
    torch.manual_seed(0)
    plain = create_model("vgg11_bn", num_classes=10, input_size=32, head="gap", width=0.25, dropout=0.0)
    tuned = create_model("vgg11_bn", num_classes=10, input_size=32, head="gap", width=0.25, dropout=0.0)
    tuned.load_state_dict(plain.state_dict())
    counts = tune_for_cpu_bf16(tuned)
    assert counts == {"small_map_convs": 8, "pool_before_relu": 5, "out_of_place_relus": 3}
    oned = create_model("vgg11_bn", num_classes=10, input_size=32, head="gap", width=0.25, dropout=0.0)
    assert tune_for_cpu_bf16(oned, small_map_convs=False) == dict(counts, small_map_convs=0)  # oneDNN for every conv
    assert [type(m).__name__ for m in oned.modules() if isinstance(m, nn.Conv2d)] == ["Conv2d"] * 8
    assert [type(m) for m in oned.modules() if not isinstance(m, nn.Conv2d)] == [
        type(m) for m in tuned.modules() if not isinstance(m, nn.Conv2d)]  # the other two speed-ups made
    assert list(tuned.state_dict()) == list(plain.state_dict())
    x = torch.randn(4, 3, 32, 32)
    for model in (plain, tuned):
        model(x).square().sum().backward()
    assert torch.equal(plain(x), tuned(x))  # fp32: the GEMM path is not taken, everything else is exact
    for p, q in zip(plain.parameters(), tuned.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-6, atol=1e-7)
