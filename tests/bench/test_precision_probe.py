"""``vggnet bench``'s train and infer sections show precision auto's probes (issue 22): each candidate's time, the
choice, and the precision the vggnet row runs in. The times are injected: nothing here asserts a real time."""

import dataclasses
import types

import pytest
import torch

from vggnet.bench.render import render_comparisons
from vggnet.bench import infer as bench_infer
from vggnet.bench import train as bench_train
from vggnet.evaluation import probe as inference_probe
from vggnet.net.models import create_model
from vggnet.runtime import resolve_runtime
from vggnet.training import probe as training_probe
from vggnet.training import resolve_config


@pytest.fixture
def measured(monkeypatch):
    """Both probes see bf16 as a candidate and return injected times; ``measured.shapes`` records their inputs."""
    state = types.SimpleNamespace(shapes=[], bf16=[], seconds={"fp32": 0.0041, "bf16": 0.0053})

    def fake(kind):
        def measure(model, *args, **kwargs):
            state.shapes.append((kind, tuple(args[1] if kind == "train" else args[0])))
            state.bf16.append(kwargs.get("bf16", True))
            return dict(state.seconds)
        return measure

    for module in (training_probe, inference_probe):
        monkeypatch.setattr(module, "bf16_candidate", lambda device: device.type == "cpu")
    monkeypatch.setattr(training_probe, "measure_candidates", fake("train"))
    monkeypatch.setattr(inference_probe, "measure_candidates", fake("infer"))
    return state


def test_the_infer_section_shows_the_inference_probes_choice(measured):
    model = create_model("vgg11", head="gap", input_size=32).eval()
    p = bench_infer.inference_probe(model, 32, 256)
    assert p == {"batch": 128, "fp32_ms": pytest.approx(4.1), "bf16_ms": pytest.approx(5.3), "chosen": "fp32",
                 "unit": "batch"}
    assert measured.shapes == [("infer", (128, 3, 32, 32))]
    measured.seconds = {"fp32": 0.010, "bf16": 0.0095}  # exactly 5% faster
    assert bench_infer.inference_probe(model, 224, 8)["chosen"] == "bf16"
    assert measured.shapes[-1] == ("infer", (2, 3, 224, 224))
    measured.seconds = {"fp32": 0.010, "bf16": 0.009, "bf16_onednn": 0.008}
    assert bench_infer.inference_probe(model, 32, 2)["chosen"] == "bf16_onednn"


@pytest.mark.cpu_bf16
@pytest.mark.parametrize("seconds, precision, steps_gemm, runs_in", [
    ({"fp32": 0.010, "bf16": 0.009, "bf16_onednn": 0.008}, "bf16", False, "bf16_onednn"),
    ({"fp32": 0.010, "bf16": 0.008, "bf16_onednn": 0.009}, "bf16", True, "bf16"),
    ({"fp32": 0.010, "bf16": 0.0099, "bf16_onednn": 0.0099}, "fp32", False, "fp32"),
    ({"fp32": 0.010, "bf16": 0.009, "bf16_onednn": 0.008, "bf16_onednn_nchw": 0.007}, "bf16", False,
     "bf16_onednn_nchw")])
def test_the_infer_sections_vggnet_row_runs_the_probes_choice(measured, seconds, precision, steps_gemm, runs_in):
    from vggnet.bench.config import BenchConfig

    measured.seconds = seconds
    r = bench_infer.bench_infer(BenchConfig(sections=("infer",), quick=True), {})  # VGG-11 at 32x32: 2x2 maps
    assert r["vggnet"]["precision"] == precision and ("small_map_gemm" in r["steps"]) is steps_gemm
    assert ("channels_last" in r["steps"]) is not runs_in.endswith("_nchw")
    assert (r["precision_probe"]["chosen"], r["precision_probe"]["runs_in"]) == (runs_in, runs_in)


def test_the_train_section_shows_the_training_probes_choice(measured, monkeypatch, train_options, tmp_path):
    config = resolve_config(**train_options(out=str(tmp_path / "r")))
    data = types.SimpleNamespace(classes=list(range(10)), images=torch.zeros(1, 1, 28, 28, dtype=torch.uint8))
    monkeypatch.setattr(bench_train, "fashion_mnist", lambda data_dir: (data, data))
    run = types.SimpleNamespace(config=config, runtime=resolve_runtime("cpu", "fp32", threads=1),
                                loader=types.SimpleNamespace(batch_size=256))
    p = bench_train.training_probe(types.SimpleNamespace(data_dir=None), run)
    assert p == {"batch": 128, "fp32_ms": pytest.approx(4.1), "bf16_ms": pytest.approx(5.3), "chosen": "fp32",
                 "runs_in": "fp32", "unit": "step"}
    assert measured.shapes == [("train", (128, 1, 32, 32))]
    # three candidates; the row trains in the variant its run recorded
    measured.seconds = {"fp32": 0.0041, "bf16": 0.0035, "bf16_onednn": 0.0033}
    record = {"precision": "bf16", "small_map_convs": False, "device": "cpu", "fp32_ms": 4.0, "bf16_ms": 3.6,
              "bf16_onednn_ms": 3.3}
    run.config = dataclasses.replace(config, precision_record=record)
    run.runtime = dataclasses.replace(run.runtime, precision="bf16")
    p = bench_train.training_probe(types.SimpleNamespace(data_dir=None), run)
    assert p == {"batch": 128, "fp32_ms": pytest.approx(4.1), "bf16_ms": pytest.approx(3.5),
                 "bf16_onednn_ms": pytest.approx(3.3), "chosen": "bf16_onednn", "runs_in": "bf16_onednn",
                 "unit": "step"}


def test_without_a_bf16_candidate_the_sections_time_fp32_in_both_layouts(measured, monkeypatch, train_options,
                                                                         tmp_path):
    for module in (training_probe, inference_probe):
        monkeypatch.setattr(module, "bf16_candidate", lambda device: False)
    measured.seconds = {"fp32": 0.010, "fp32_nchw": 0.009}
    model = create_model("vgg11", head="gap", input_size=32).eval()
    p = bench_infer.inference_probe(model, 32, 2)
    assert (p["chosen"], p["fp32_nchw_ms"], measured.bf16) == ("fp32_nchw", pytest.approx(9.0), [False])
    config = resolve_config(**train_options(channels_last="auto", out=str(tmp_path / "r")))
    data = types.SimpleNamespace(classes=list(range(10)), images=torch.zeros(1, 1, 28, 28, dtype=torch.uint8))
    monkeypatch.setattr(bench_train, "fashion_mnist", lambda data_dir: (data, data))
    run = types.SimpleNamespace(config=config, runtime=resolve_runtime("cpu", "fp32", threads=1),
                                loader=types.SimpleNamespace(batch_size=256))
    p = bench_train.training_probe(types.SimpleNamespace(data_dir=None), run)
    assert (p["chosen"], measured.bf16) == ("fp32_nchw", [False, False])
    run.config = dataclasses.replace(config, channels_last=True)  # no bf16 and the layout given: nothing to time
    p = bench_train.training_probe(types.SimpleNamespace(data_dir=None), run)
    assert p["skipped"].startswith("nothing to compare on this cpu") and len(measured.bf16) == 2


def test_render_shows_each_probe_next_to_the_rows_precision():
    timing = {"name": "x", "precision": "fp32", "images_per_second": 10.0, "flop_per_second": 2e9, "peak_share": None}
    results = {
        "train": {"reference": timing, "vggnet": dict(timing, precision="bf16"), "ratio": 2.0, "model": "vgg11_bn",
                  "head": "gap", "width": 1.0, "input_size": [32, 32], "in_channels": 1, "batch": 128,
                  "flops_per_step": 1e9, "flop_convention": "c",
                  "precision_probe": {"batch": 128, "fp32_ms": 45.06, "bf16_ms": 20.31, "chosen": "bf16",
                                      "runs_in": "bf16", "unit": "step"}},
        "infer": {"reference": timing, "vggnet": dict(timing, precision="bf16"), "ratio": 1.5, "model": "vgg16",
                  "head": "classic", "input_size": 224, "batch": 8, "rel_l2_error": 0.01,
                  "tolerance": {"rel_l2_error_max": 0.03}, "top1_agreement": 1.0,
                  "precision_probe": {"skipped": "no bf16 candidate", "runs_in": "fp32"}}}
    lines = render_comparisons(results)
    assert lines[-2:] == ["precision auto (training probe): fp32 45.1 ms, bf16 20.3 ms per step of 128 -> bf16; the "
                          "vggnet row trains in bf16",
                          "precision auto (inference probe): not measured (no bf16 candidate)"]
    results["infer"]["precision_probe"] = {"batch": 2, "fp32_ms": 300.0, "bf16_ms": 310.0, "chosen": "fp32",
                                           "runs_in": "bf16", "unit": "batch"}
    assert render_comparisons(results)[-1] == ("precision auto (inference probe): fp32 300.0 ms, bf16 310.0 ms "
                                                      "per batch of 2 -> fp32; the vggnet row runs in bf16")
    results["train"]["precision_probe"] = {"batch": 128, "fp32_ms": 56.94, "bf16_ms": 37.9, "bf16_onednn_ms": 41.2,
                                           "chosen": "bf16", "runs_in": "bf16_onednn", "unit": "step"}
    assert render_comparisons(results)[-2] == (
        "precision auto (training probe): fp32 56.9 ms, bf16 37.9 ms, bf16 without small-map GEMM 41.2 ms per step of "
        "128 -> bf16; the vggnet row trains in bf16 without small-map GEMM")
    results["infer"]["precision_probe"] = {"batch": 2, "fp32_ms": 300.0, "fp32_nchw_ms": 280.0, "chosen": "fp32_nchw",
                                           "runs_in": "fp32_nchw", "unit": "batch"}
    assert render_comparisons(results)[-1] == ("precision auto (inference probe): fp32 300.0 ms, fp32 NCHW 280.0 ms "
                                               "per batch of 2 -> fp32 NCHW; the vggnet row runs in fp32 NCHW")
    del results["train"]["precision_probe"], results["infer"]["precision_probe"]  # results of an older bench
    assert not any(line.startswith("precision auto") for line in render_comparisons(results))
