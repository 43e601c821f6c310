"""FLOP counting checked by hand, and the timing records built from it.

Nothing here asserts a time or a speed-up: timings depend on the machine and its load.
"""

import pytest
import torch

from vggnet import create_model
from vggnet.bench import Timing, comparison, forward_macs
from vggnet.base.timing import interleaved, rows_against

# VGG-11 (config A) at 32x32, 10 classes, GAP head, by hand (out_h * out_w * out_c * in_c * 3 * 3 per conv):
VGG11_32_CONV_MACS = [
    32 * 32 * 64 * 3 * 9,  # conv1_1: 1,769,472
    16 * 16 * 128 * 64 * 9,  # conv2_1
    8 * 8 * 256 * 128 * 9,  # conv3_1
    8 * 8 * 256 * 256 * 9,  # conv3_2
    4 * 4 * 512 * 256 * 9,  # conv4_1
    4 * 4 * 512 * 512 * 9,  # conv4_2
    2 * 2 * 512 * 512 * 9,  # conv5_1
    2 * 2 * 512 * 512 * 9,  # conv5_2
]
VGG11_32_MACS = sum(VGG11_32_CONV_MACS) + 512 * 10  # + the linear layer
assert VGG11_32_MACS == 152_769_536
# With one input channel (Fashion-MNIST), conv1_1 sees 1 channel, not 3: the quick bench's training model.
assert VGG11_32_MACS - 32 * 32 * 64 * 9 * 2 == 151_589_888  # = GRAY_VGG11_32_MACS in test_cli.py


def test_forward_macs_by_hand():
    with torch.device("meta"):
        config = create_model("vgg11_bn", num_classes=10, input_size=32, head="gap").config
        gray = create_model("vgg11_bn", num_classes=10, input_size=32, head="gap", in_channels=1).config
    assert forward_macs(config, 32) == VGG11_32_MACS
    assert forward_macs(gray, 32) == VGG11_32_MACS - 32 * 32 * 64 * 9 * 2  # conv1_1 sees 1 channel, not 3


def test_training_step_flops_and_peak_share():
    # A training step counts 3 x the forward FLOPs, 2 FLOPs per MAC: VGG-11 at 32x32, batch 128.
    flops = 3 * 2 * VGG11_32_MACS * 128
    assert flops == 117_327_003_648
    t = Timing("x", "bf16", 128, [0.5, 0.25, 1.0], flops=flops, peak=1e12)
    d = t.to_dict()
    assert d["seconds_median"] == 0.5
    assert d["images_per_second"] == 256
    assert d["flop_per_second"] == flops / 0.5
    assert d["peak_share"] == pytest.approx(flops / 0.5 / 1e12)
    ref = Timing("ref", "fp32", 128, [2.0], flops=flops, peak=2e11)
    assert comparison(ref, t)["ratio"] == 4.0


def test_rows_against_the_reference_in_order():
    times = {"ref": [2.0, 2.0], "fast": [0.5, 1.5], "slow": [4.0]}
    rows = rows_against(times, "ref", {"ref": "fp32", "fast": "bf16", "slow": "fp32"}, images=8, flops=16.0)
    assert [r["name"] for r in rows] == ["ref", "fast", "slow"]
    assert [r["ratio"] for r in rows] == [1.0, 2.0, 0.5]
    assert rows[1]["precision"] == "bf16" and rows[1]["flop_per_second"] == 16.0


def test_interleaved_warms_up_then_alternates():
    calls = []
    times = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=2, warmup=1)
    assert calls == ["a", "b", "a", "b", "a", "b"]
    assert {k: len(v) for k, v in times.items()} == {"a": 2, "b": 2}
