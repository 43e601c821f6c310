"""``vggnet bench``: FLOP counting checked by hand, the reference is the same network, and the quick run's keys.

Nothing here asserts a time or a speed-up: timings depend on the machine and its load.
"""

import json

import numpy as np
import pytest
import torch

from vggnet import create_model
from vggnet.bench import (ReferenceVGG, Timing, _read_idx_file, comparison, forward_macs, render,
                          summarize_targets)
from vggnet.cli import main

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


@pytest.mark.parametrize("name,head,size", [("vgg11_bn", "gap", 32), ("vgg16", "classic", 32), ("vgg13", "fitted", 64)])
def test_reference_is_the_same_network_as_vggnet(name, head, size):
    torch.manual_seed(0)
    ref = ReferenceVGG(name, num_classes=10, head=head, input_size=size, width=0.25).eval()
    model = create_model(name, num_classes=10, head=head, input_size=size, width=0.25).eval()
    model.load_state_dict(ref.state_dict())  # strict: same modules, same shapes
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert torch.equal(ref(x), model(x))


def test_reference_idx_reader_matches_written_file(tmp_path, data_write_idx):
    images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    data_write_idx(tmp_path / "train-images-idx3-ubyte.gz", images, gz=True)
    assert np.array_equal(_read_idx_file(tmp_path, "train-images-idx3-ubyte"), images)


@pytest.fixture
def fake_fashion_mnist(tmp_path, data_write_idx):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 256), ("t10k", 64)):
        data_write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)), gz=True)
        data_write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n), gz=True)
    return tmp_path


def _positive(value):
    return isinstance(value, (int, float)) and value > 0


def test_quick_bench_json_has_the_documented_keys(fake_fashion_mnist, tmp_path, capsys):
    out = tmp_path / "bench.json"
    # One thread: two OpenMP threads collapse when another process is busy, and this is only a smoke run.
    assert main(["bench", "--quick", "--json", "--threads", "1", "--data-dir", str(fake_fashion_mnist),
                 "--out", str(out), "--only", "peak,train,infer,e2e,memory,ablation"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    r = printed
    assert r["schema"] == 1 and r["quick"] is True
    assert {"cpu", "cores", "threads", "torch", "bf16_native", "other_load_cores"} <= set(r["conditions"])
    for precision in ("fp32", "bf16"):
        assert _positive(r["peak"][precision]["flop_per_second"])
    assert r["peak"]["flops_per_call"] == 2 * 4 * 64 * 64 * 9 * 28 * 28
    for section in ("train", "infer"):
        for side in ("reference", "vggnet"):
            for key in ("images_per_second", "flop_per_second", "peak_share", "seconds_median"):
                assert _positive(r[section][side][key]), (section, side, key)
        assert _positive(r[section]["ratio"])
    t = r["train"]
    assert t["model"] == "vgg11_bn" and t["head"] == "gap" and t["in_channels"] == 1 and t["batch"] == 16
    assert t["flops_per_step"] == 3 * 2 * (VGG11_32_MACS - 32 * 32 * 64 * 9 * 2) * 16
    assert r["infer"]["rel_l2_error"] < r["infer"]["tolerance"]["rel_l2_error_max"]
    e = r["e2e"]
    for side in ("reference", "vggnet"):
        for key in ("seconds", "train_seconds", "images_per_second", "train_images_per_second"):
            assert _positive(e[side][key]), (side, key)
        assert 0 <= e[side]["test_acc"] <= 1
    assert _positive(e["ratio"]) and _positive(e["vggnet"]["recorded_train_images_per_second"])
    assert e["vggnet"]["train_images"] == 256 and e["reference"]["train_images"] == 256
    assert e["vggnet"]["test_images"] == e["reference"]["test_images"] == 64
    (row,) = r["memory"]["rows"]
    assert row["estimate_bytes"] == row["estimate"]["total"] > 0
    assert _positive(row["rss_peak_bytes"])
    for key in ("train", "infer"):
        assert all(_positive(v["images_per_second"]) and _positive(v["ratio"]) for v in r["ablation"][key])
    assert {s["target"] for s in r["summary"]} >= {"training step, images/s vs reference",
                                                   "inference, images/s vs reference",
                                                   "end-to-end epoch, wall time vs reference"}
    text = render(r)
    assert "training step" in text and "end to end" in text and "training memory" in text


def test_summarize_targets_marks_met_and_missed():
    results = {"train": {"ratio": 3.0, "vggnet": {"peak_share": 0.5}}, "infer": {"ratio": 2.0},
               "memory": {"rows": [{"tensor_error": -0.1}, {"tensor_error": 0.05}]}}
    rows = {r["target"]: r for r in summarize_targets(results)}
    assert rows["training step, images/s vs reference"]["met"]
    assert not rows["training step, share of same-precision peak"]["met"]
    assert not rows["inference, images/s vs reference"]["met"]
    assert rows["memory estimate, largest error vs profiler tensor peak"]["measured"] == pytest.approx(0.1)
    assert rows["memory estimate, largest error vs profiler tensor peak"]["met"]


def test_bench_rejects_unknown_sections(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--only", "peak,nonsense"])
    assert exc.value.code == 2
    assert "nonsense" in capsys.readouterr().err
