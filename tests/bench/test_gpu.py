"""``vggnet bench --device cuda``: the GPU sections' logic run on the CPU at tiny sizes, their records, targets and
tables, the command line's refusals; one cuda-marked test runs the real thing.

Nothing here asserts a time or a speed-up: only how ratios are computed from the measured times.
"""

import json

import pytest
import torch

from vggnet.bench import BenchConfig, render, summarize_targets
from vggnet.bench.config import GPU_SECTIONS, SECTIONS, TARGETS, device_targets
from vggnet.bench.gpu import epoch_comparison, infer_comparison, logit_errors, module_comparison, step_comparison
from vggnet.bench.reference import epoch_model
from vggnet.base.timing import interleaved
from vggnet.net.models import create_model

# VGG-16 at width 0.125 (8..64 channels): the tiny network of these tests.
TINY_VGG16 = [8, 8, "M", 16, 16, "M", 32, 32, 32, "M", 64, 64, 64, "M", 64, 64, 64, "M"]
# Its MACs at 32x32 with 3 input channels and the GAP head, by hand (out_h * out_w * out_c * in_c * 9 per conv):
TINY_VGG16_32_MACS = (32 * 32 * 8 * 3 * 9 + 32 * 32 * 8 * 8 * 9 + 16 * 16 * 16 * 8 * 9 + 16 * 16 * 16 * 16 * 9
                      + 8 * 8 * 32 * 16 * 9 + 2 * 8 * 8 * 32 * 32 * 9 + 4 * 4 * 64 * 32 * 9 + 2 * 4 * 4 * 64 * 64 * 9
                      + 3 * 2 * 2 * 64 * 64 * 9 + 64 * 10)
assert TINY_VGG16_32_MACS == 5_087_872
# vggnet train's default recipe: VGG-11-BN at width 0.25 (16..128 channels), GAP head, 1 input channel, 10 classes.
DEFAULT_VGG11 = [16, "M", 32, "M", 64, 64, "M", 128, 128, "M", 128, 128, "M"]
TINY = dict(size=32, batch=2, classes=10, width=0.125, head="gap", rounds=2, warmup=1)


def gap_vgg_parameters(cfg, in_channels, batch_norm, classes):
    """Parameters of a VGG with the GAP head, from its channel list: conv weights and biases, BN scale and shift,
    the one linear layer."""
    total, channels = 0, in_channels
    for v in cfg:
        if v == "M":
            continue
        total += channels * v * 9 + v + (2 * v if batch_norm else 0)
        channels = v
    return total + channels * classes + classes


@pytest.fixture(scope="module")
def epoch_record(train_data_dir):
    """The epoch comparison on the CPU: the tiny data set's first 64 images, batch 32, no DataLoader workers."""
    cfg = BenchConfig(data_dir=str(train_data_dir), threads=1)
    return epoch_comparison(cfg, "cpu", subset=64, batch_size=32, workers=0)


@pytest.fixture(scope="module")
def step_record():
    return step_comparison(BenchConfig(threads=1), "cpu", name="vgg16_bn", **TINY)


@pytest.fixture(scope="module")
def module_record():
    return module_comparison("cpu", name="vgg16_bn", precision="fp32", **TINY)


@pytest.fixture(scope="module")
def infer_record():
    return infer_comparison("cpu", name="vgg16", precision="fp32", **TINY)


def test_epoch_reference_is_vggnets_architecture_on_the_same_images(epoch_record):
    r = epoch_record
    config = create_model("vgg11_bn", num_classes=10, in_channels=1, input_size=32, width=0.25, head="gap",
                          dropout=0.0).config
    assert {k: r["model"][k] for k in ("name", "width", "head", "in_channels")} == {
        "name": "vgg11_bn", "width": 0.25, "head": "gap", "in_channels": 1}
    ours = create_model("vgg11_bn", num_classes=10, in_channels=1, input_size=32, width=0.25, head="gap")
    theirs = epoch_model(config)
    assert {k: v.shape for k, v in theirs.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}
    count = gap_vgg_parameters(DEFAULT_VGG11, 1, True, 10)
    assert count == 579_498
    assert r["parameters"] == {"reference": count, "vggnet": count}
    for side in ("reference", "vggnet"):
        t = r[side]
        assert t["train_images"] == 64 and t["test_images"] == 64  # 2 batches of 32; the whole tiny test set
        assert 0.0 <= t["test_acc"] <= 1.0
        assert t["images_per_second"] == pytest.approx(128 / t["seconds"])
    assert r["ratio"] == pytest.approx(r["reference"]["seconds"] / r["vggnet"]["seconds"])
    assert {k: r["reference"][k] for k in ("device", "precision", "channels_last", "workers", "pin_memory")} == {
        "device": "cpu", "precision": "fp32", "channels_last": True, "workers": 0, "pin_memory": False}  # CPU test
    assert r["batch_size"] == 32 and r["workers"] == 0 and r["target_ratio"] == TARGETS["gpu_epoch_ratio"] == 5.0


def test_step_sides_see_the_same_batches_and_ratios_are_time_ratios(step_record):
    r = step_record
    assert r["flops_per_step"] == 3 * 2 * TINY_VGG16_32_MACS * 2
    keys = ("reference_fp32", "reference_amp", "vggnet")
    assert all(r[k]["images_per_call"] == 2 and r[k]["rounds"] == 2 for k in keys)
    assert r["reference_fp32"]["precision"] == "fp32" and r["reference_amp"]["precision"] == "fp32"  # CPU: no autocast
    fp32, amp, ours = (r[k]["seconds_median"] for k in keys)
    assert r["ratio_vs_fp32"] == pytest.approx(fp32 / ours)
    assert r["ratio_vs_amp"] == pytest.approx(amp / ours)


def test_module_check_runs_the_same_architecture_through_the_same_step(module_record):
    r = module_record
    count = gap_vgg_parameters(TINY_VGG16, 3, True, 10)
    assert count == 232_274
    assert r["parameters"] == {"reference": count, "vggnet": count}
    assert r["reference"]["images_per_call"] == r["vggnet"]["images_per_call"] == 2
    assert r["ratio"] == pytest.approx(r["reference"]["seconds_median"] / r["vggnet"]["seconds_median"])
    assert r["flops_per_step"] == 3 * 2 * TINY_VGG16_32_MACS * 2 and r["layout"] == "channels_last"


def test_infer_vggnet_path_gives_the_fp32_logits_of_the_same_weights(infer_record):
    r = infer_record
    for key in ("reference_amp", "vggnet"):  # fp32 on the CPU: equal up to the convolution algorithm's rounding
        assert r[key]["max_abs_error"] < 1e-4 and r[key]["top1_agreement"] == 1.0
    assert "max_abs_error" not in r["reference_fp32"]  # the baseline the errors are taken against
    assert r["ratio_vs_fp32"] == pytest.approx(r["reference_fp32"]["seconds_median"] / r["vggnet"]["seconds_median"])
    assert r["ratio_vs_amp"] == pytest.approx(r["reference_amp"]["seconds_median"] / r["vggnet"]["seconds_median"])
    assert r["flops_per_batch"] == 2 * TINY_VGG16_32_MACS * 2  # BN adds no MACs: VGG-16's are VGG-16-BN's


def test_logit_errors_by_hand():
    expected = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    got = torch.tensor([[1.5, 2.0], [3.0, -0.25]])
    e = logit_errors(expected, got)
    assert e["max_abs_error"] == 0.5
    assert e["rel_l2_error"] == pytest.approx((0.5 ** 2 + 0.25 ** 2) ** 0.5 / 14 ** 0.5)
    assert e["top1_agreement"] == 1.0


def test_gpu_targets_are_summarized_and_rendered(epoch_record, step_record, module_record, infer_record):
    results = {"conditions": {"cpu": "cpu", "threads": 1, "cores": 2, "torch": "t", "bf16_native": False,
                              "device": "cuda:0", "gpu": "Some GPU", "gpu_capability": "9.0",
                              "gpu_memory_bytes": 80 * 2 ** 30, "cuda": "12.8", "cudnn": 91000,
                              "bf16_supported": True, "tf32_matmul": False, "tf32_cudnn": True},
               "gpu_epoch": epoch_record, "gpu_step": {"train_224": step_record, "module_32": module_record},
               "gpu_infer": infer_record}
    rows = {s["target"]: s for s in summarize_targets(results)}
    expected = {"GPU epoch, wall time vs the typical GPU pipeline": (epoch_record["ratio"], 5.0),
                "GPU 224x224 training step, images/s vs eager autocast + channels_last":
                    (step_record["ratio_vs_amp"], 1.0),
                "GPU 224x224 training step, images/s vs eager fp32": (step_record["ratio_vs_fp32"], 2.0),
                "GPU 32x32 step, vggnet's module vs the reference's, images/s": (module_record["ratio"], 1.0)}
    assert set(rows) == set(expected)
    for target, (measured, goal) in expected.items():
        assert rows[target]["measured"] == measured and rows[target]["goal"] == goal
        assert rows[target]["met"] is (measured >= goal)
    results["summary"] = list(rows.values())
    text = render(results)
    assert "GPU cuda:0: Some GPU (compute capability 9.0, 80 GiB), CUDA 12.8, cuDNN 91000" in text
    assert "GPU epoch: one Fashion-MNIST epoch (64 training images, batch 32)" in text
    for row in (step_record["reference_fp32"], step_record["reference_amp"], step_record["vggnet"],
                module_record["reference"], module_record["vggnet"], infer_record["vggnet"]):
        assert row["name"] in text
    assert f"{step_record['ratio_vs_fp32']:.2f}x / {step_record['ratio_vs_amp']:.2f}x" in text
    assert f"{infer_record['vggnet']['max_abs_error']:.2e}" in text
    for target in expected:
        assert target in text


def test_synthetic_gpu_targets_met_and_missed():
    results = {"gpu_epoch": {"ratio": 5.0},
               "gpu_step": {"train_224": {"ratio_vs_amp": 0.99, "ratio_vs_fp32": 2.5}, "module_32": {"ratio": 1.2}}}
    met = {s["target"]: s["met"] for s in summarize_targets(results)}
    assert met == {"GPU epoch, wall time vs the typical GPU pipeline": True,
                   "GPU 224x224 training step, images/s vs eager autocast + channels_last": False,
                   "GPU 224x224 training step, images/s vs eager fp32": True,
                   "GPU 32x32 step, vggnet's module vs the reference's, images/s": True}


def test_each_device_has_its_sections_and_targets():
    assert BenchConfig().sections == SECTIONS
    assert BenchConfig(device="cuda:1").sections == GPU_SECTIONS == ("gpu_epoch", "gpu_step", "gpu_infer", "memory")
    assert device_targets("cpu") == {"train_ratio": 2.5, "train_peak_share": 0.70, "infer_ratio": 3.0,
                                     "e2e_ratio": 3.0, "memory_error": 0.15,  # as before the GPU sections
                                     "contention_share": 0.5,  # issue 13
                                     "data_per_core_ratio": 1.5}  # issue 21
    assert device_targets("cuda") == {"memory_error": 0.15, "gpu_epoch_ratio": 5.0, "gpu_step_vs_amp": 1.0,
                                      "gpu_step_vs_fp32": 2.0, "gpu_module_ratio": 1.0}


def test_interleaved_synchronizes_cuda_around_every_timed_call(monkeypatch):
    events = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append(("sync", str(device))))
    fns = {"a": lambda: events.append("a"), "b": lambda: events.append("b")}
    interleaved(fns, rounds=1, warmup=1, device="cuda:0")
    sync = ("sync", "cuda:0")
    assert events == ["a", "b", sync, "a", sync, sync, "b", sync]  # warm-up unsynchronised, then bracketed calls
    events.clear()
    interleaved(fns, rounds=1, warmup=0, device="cpu")
    assert events == ["a", "b"]


@pytest.fixture
def no_bench_work(monkeypatch):
    """Fail the test if the bench starts measuring (it must refuse before any work)."""
    import vggnet.bench.runner as runner

    def work(*args, **kwargs):
        raise AssertionError("the bench started working before refusing")

    monkeypatch.setattr(runner, "other_load", work)
    monkeypatch.setattr(runner, "wait_for_quiet", work)


def test_cli_refuses_cuda_without_a_gpu(cli, one_line_error, no_bench_work, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = cli(["bench", "--device", "cuda", "--quick"])
    one_line_error(code, err, "--device cuda", "no CUDA device")


@pytest.mark.parametrize("argv,fragments", [
    (["--only", "train,gpu_step"], ("--only gpu_step", "--device cuda", "not of --device cpu")),
    (["--device", "cuda", "--only", "memory,peak"], ("--only peak", "--device cpu", "not of --device cuda")),
    (["--device", "auto"], ("--device must be cpu, cuda or cuda:N", "'auto'")),
])
def test_cli_refuses_sections_of_the_other_device(cli, one_line_error, no_bench_work, argv, fragments):
    code, _, err = cli(["bench", "--quick", *argv])
    one_line_error(code, err, *fragments)


def test_runner_runs_the_gpu_sections_with_the_gpu_conditions(monkeypatch):
    """The runner's CUDA path on the CPU: CUDA faked, each section replaced by a canned record."""
    import vggnet.bench.runner as runner

    calls = []

    def section(name, record):
        def run(cfg, results):
            calls.append((name, cfg.device))
            return dict(record)
        return run

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(runner, "other_load", lambda seconds: 0.0)
    monkeypatch.setattr(runner, "start_gpu", lambda device: {"device": device, "gpu": "Fake GPU", "cuda": "12.8"})
    canned = {"gpu_epoch": {"ratio": 6.0},
              "gpu_step": {"train_224": {"ratio_vs_amp": 1.5, "ratio_vs_fp32": 1.9}, "module_32": {"ratio": 0.9}},
              "gpu_infer": {"ratio_vs_fp32": 3.0}, "memory": {"rows": []}}
    for name, record in canned.items():
        monkeypatch.setitem(runner.RUNNERS, name, section(name, record))
    r = runner.run(BenchConfig(device="cuda", quick=True))
    assert calls == [(name, "cuda") for name in GPU_SECTIONS]
    assert [k for k in r if k in canned] == list(GPU_SECTIONS) and "peak" not in r
    assert r["conditions"]["gpu"] == "Fake GPU" and r["conditions"]["cuda"] == "12.8"
    assert r["targets"] == device_targets("cuda")
    assert [s["met"] for s in r["summary"]] == [True, True, False, False]


@pytest.mark.cuda
def test_quick_gpu_bench_has_every_gpu_section(cli, train_data_dir, tmp_path):
    out = tmp_path / "bench.json"
    code, stdout, err = cli(["bench", "--device", "cuda", "--quick", "--json", "--data-dir", train_data_dir,
                             "--subset", 128, "--out", out])
    assert code == 0, err
    r = json.loads(stdout)
    assert r == json.loads(out.read_text())
    assert set(GPU_SECTIONS) <= set(r) and not (set(SECTIONS) - {"memory"}) & set(r)
    assert r["targets"] == device_targets("cuda")
    assert {"gpu", "cuda", "torch", "cudnn"} <= set(r["conditions"])
    assert r["gpu_epoch"]["vggnet"]["train_images"] == r["gpu_epoch"]["reference"]["train_images"] == 128
    assert r["gpu_epoch"]["reference"]["precision"] in ("bf16", "fp16")
    assert set(r["gpu_step"]) >= {"train_224", "module_32"} and r["gpu_step"]["train_224"]["input_size"] == 224
    for key in ("reference_amp", "vggnet"):  # the same weights: bf16 rounding only (other weights: error ~1.4)
        assert r["gpu_infer"][key]["rel_l2_error"] < 0.25
    assert r["gpu_epoch"]["ratio"] > 0 and r["gpu_step"]["module_32"]["ratio"] > 0
    gpu_targets = {s["target"] for s in r["summary"] if s["target"].startswith("GPU")}
    assert len(gpu_targets) == 4  # epoch, 224 step vs autocast and vs fp32, 32x32 module
