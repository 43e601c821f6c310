"""--budget's probe (vggnet.training.budget_probe): the candidates it times, the winner that prices a shape, the cache
and --reprobe, and a budget run that trains and evaluates in the bf16 variant its probe chose. Real times are only
checked to be positive; the choice between them is tested on written entries."""

import dataclasses
import json

import pytest
import torch

from vggnet.base import probecache
from vggnet.data import load_dataset
from vggnet.runtime import resolve_runtime
from vggnet.training import budget, budget_probe, build, distributed, resolve_config
from vggnet.training.budget_probe import Speed

ENTRY = {"train_ms": {"fp32": 100.0, "bf16": 60.0, "bf16_onednn": 50.0},
         "eval_ms": {"fp32": 30.0, "bf16": 20.0, "bf16_onednn": 16.0}, "measured": "2026-12-07 00:00:00 UTC"}
NAMES = ("fp32", "bf16", "bf16_onednn")


@pytest.mark.parametrize("train, chosen, small_maps", [
    ({"fp32": 100.0, "bf16": 60.0, "bf16_onednn": 50.0}, "bf16_onednn", False),
    ({"fp32": 100.0, "bf16": 50.0, "bf16_onednn": 60.0}, "bf16", True),
    ({"fp32": 100.0, "bf16": 96.0, "bf16_onednn": 97.0}, "fp32", False)])
def test_the_winner_prices_the_shape_with_its_own_step_and_evaluation(train, chosen, small_maps):
    speed = budget_probe.speed_of(dict(ENTRY, train_ms=train), NAMES, batch=10, eval_batch=4, by="measured")
    assert (speed.precision, speed.small_map_convs) == ({"bf16_onednn": "bf16"}.get(chosen, chosen), small_maps)
    assert speed.train == pytest.approx(train[chosen] / 1000 / 10)
    assert speed.eval == pytest.approx(ENTRY["eval_ms"][chosen] / 1000 / 4)
    detail = dict(speed.detail)
    assert (detail["by"], detail["bf16_onednn_ms"], detail["eval_fp32_ms"]) == ("measured", train["bf16_onednn"], 30.0)


def test_a_single_candidate_prices_the_shape_whatever_it_is():
    entry = {"train_ms": {"fp16": 8.0}, "eval_ms": {"fp16": 2.0}}  # a GPU's rule: fp16, timed alone
    speed = budget_probe.speed_of(entry, ("fp16",), batch=4, eval_batch=2, by="cache")
    assert (speed.precision, speed.train, speed.eval, dict(speed.detail)["by"]) == ("fp16", 0.002, 0.001, "cache")


@pytest.mark.parametrize("bad", [{"train_ms": {"fp32": 1.0, "bf16": 1.0}}, {"train_ms": {**ENTRY["train_ms"],
                                                                                          "fp32": 0}},
                                 {"eval_ms": {**ENTRY["eval_ms"], "bf16": True}}, {"eval_ms": None}])
def test_a_cached_entry_without_a_positive_time_per_candidate_is_measured_again(tmp_path, bad):
    from vggnet.base import probecache

    key = {"kind": "budget", "candidates": list(NAMES)}
    probecache.write_cache(tmp_path / "probe.json", key, ENTRY)
    assert budget_probe.read_speeds(tmp_path / "probe.json", key)["train_ms"] == ENTRY["train_ms"]
    probecache.write_cache(tmp_path / "probe.json", key, {**ENTRY, **bad})
    assert budget_probe.read_speeds(tmp_path / "probe.json", key) is None


# ------------------------------------------------------------------------------------------ the real probe
@pytest.fixture
def priced(monkeypatch, tmp_path, train_options):
    """The tiny run's data and configuration, the probe cache under tmp_path, and a counter of the measurements."""
    monkeypatch.setattr(budget_probe, "cache_path", lambda: tmp_path / "probe.json")
    calls = []
    real = budget_probe.timed
    monkeypatch.setattr(budget_probe, "timed", lambda *args: calls.append(args[3]) or real(*args))
    config = resolve_config(**train_options(out=str(tmp_path / "run"))).validate()
    train_set, _ = load_dataset(config.dataset, config.data_dir, config.image_size)
    return config, train_set, calls


@pytest.mark.parametrize("precision", ["fp32", pytest.param("auto", marks=pytest.mark.cpu_bf16)])
def test_a_shape_is_measured_once_then_read_from_the_cache_and_reprobe_measures_again(priced, precision,
                                                                                     monkeypatch):
    from dataclasses import replace

    config, train_set, calls = priced
    config = replace(config, precision=precision)
    runtime = resolve_runtime("cpu", "fp32" if precision == "fp32" else "bf16", threads=1)
    monkeypatch.setattr(budget_probe, "bf16_candidate", lambda device: True)
    shape = ("vgg11_bn", 0.25)  # at 32x32 its last block works on 2x2 maps: the GEMM path's
    first = budget_probe.measure_shape(config, train_set, runtime, shape)
    second = budget_probe.measure_shape(config, train_set, runtime, shape)
    # the run gives no layout: under auto both are timed; an explicit precision is timed alone, in channels_last
    names = ("fp32",) if precision == "fp32" else probecache.ALL_CANDIDATES
    assert calls == [names] and dict(first.detail)["by"] == "measured" and dict(second.detail)["by"] == "cache"
    assert first == Speed(second.train, second.eval, second.precision, True, first.detail, second.small_map_convs,
                          second.channels_last)
    assert all(dict(first.detail)[f"{name}_ms"] > 0 for name in names)
    budget_probe.measure_shape(config, train_set, runtime, shape, reprobe=True)
    budget_probe.measure_shape(config, train_set, runtime, ("vgg13_bn", 0.25))  # another shape, another key
    assert calls == [names] * 3
    (cached_first, cached_other) = json.loads(budget_probe.cache_path().read_text())["entries"].values()
    assert cached_first["key"]["kind"] == cached_other["key"]["kind"] == "budget"


@pytest.mark.parametrize("precision, channels_last, bf16, small_maps, names", [
    ("auto", "auto", True, True, probecache.ALL_CANDIDATES),
    ("auto", "auto", True, False, ("fp32", "fp32_nchw", "bf16", "bf16_nchw")),
    ("auto", False, True, True, ("fp32_nchw", "bf16_nchw", "bf16_onednn_nchw")),
    ("auto", "auto", False, True, ("fp32", "fp32_nchw")),  # a CPU without native bf16: the layouts in fp32
    ("auto", True, False, True, ("fp32",)),
    ("fp32", "auto", True, True, ("fp32",)),  # an explicit precision: timed alone, in the layout's rule
    ("bf16", False, True, True, ("bf16_nchw",))])
def test_the_shapes_candidates_are_what_the_runs_probe_would_time(train_options, monkeypatch, precision,
                                                                   channels_last, bf16, small_maps, names):
    config = resolve_config(**train_options(precision=precision, channels_last=channels_last))
    runtime = resolve_runtime("cpu", "fp32", channels_last, threads=1)  # bf16 given: built where the CPU has none
    runtime = dataclasses.replace(runtime, precision="fp32" if precision == "auto" else precision)
    monkeypatch.setattr(budget_probe, "bf16_candidate", lambda device: bf16)
    monkeypatch.setattr(budget_probe, "small_map_layers", lambda model, shape: int(small_maps))
    assert budget_probe.candidates(config, runtime, None, (32, 1, 32, 32)) == names


# ------------------------------------------------------------------------------------------ the run it chooses
def channels_last_weights(model: torch.nn.Module) -> bool:
    """Whether the model's last convolution (of several input channels: one channel is both layouts) is in
    channels_last."""
    conv = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    assert conv.in_channels > 1
    return conv.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.cpu_bf16
@pytest.mark.parametrize("channels_last", [True, False])
def test_a_budget_run_trains_and_evaluates_in_the_bf16_variant_and_layout_its_probe_chose(
        tmp_path, train_data_dir, monkeypatch, train_cli, channels_last):
    asked, tuned, evaluated = [], [], []
    detail = (("fp32_ms", 100.0), ("bf16_ms", 60.0), ("bf16_onednn_ms", 50.0), ("eval_bf16_onednn_ms", 5.0))

    def measure(config, train_set, runtime, shape, reprobe=False):
        asked.append((reprobe, config.channels_last))  # 10 minutes: 2 epochs of the tiny run
        return Speed(1.5, 0.1, "bf16", True, detail, small_map_convs=False, channels_last=channels_last)

    real_tune, real_evaluate = build.tune_for_cpu_bf16, distributed.evaluate
    monkeypatch.setattr(budget, "measure_shape", measure)
    monkeypatch.setattr(build, "tune_for_cpu_bf16", lambda model, small: tuned.append(
        (small, channels_last_weights(model))) or real_tune(model, small))
    monkeypatch.setattr(distributed, "evaluate", lambda *a, **k: evaluated.append(
        (k["small_maps"], k["channels_last"])) or real_evaluate(*a, **k))
    run_dir = tmp_path / "run"
    code, out, err = train_cli(["train", "--budget", "10m", "--data-dir", train_data_dir, "--batch-size", "32",
                                "--no-progress", "--threads", "1", "--device", "cpu", "--out", run_dir, "--reprobe"])
    assert code == 0, err
    layout = "" if channels_last else " NCHW"
    assert asked == [(True, "auto")]  # one shape priced (the others cannot fit), in both layouts
    assert f"(cpu, bf16 without small-map GEMM{layout}, 1 threads, batch 32;" in err
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["precision"] == "bf16" and saved["channels_last"] == "auto"
    assert saved["budget_record"]["variant"] == "bf16_onednn" + ("" if channels_last else "_nchw")
    assert saved["budget_record"]["layout"] == {"channels_last": channels_last, "decided_on": ["vgg11_bn", 0.25]}
    assert saved["precision_record"] == {"precision": "bf16", "small_map_convs": False,
                                         "channels_last": channels_last, "by": "budget", "device": "cpu",
                                         "batch": 32, "threads": 1, "fp32_ms": 100.0, "bf16_ms": 60.0,
                                         "bf16_onednn_ms": 50.0}
    # the model trains in the chosen layout, and its evaluation runs in it
    assert tuned == [(False, channels_last)] and evaluated and set(evaluated) == {(False, channels_last)}


def test_the_layout_is_timed_on_the_first_shape_and_the_others_are_priced_in_it(train_data_dir, monkeypatch):
    asked = []

    def measure(config, train_set, runtime, shape, reprobe=False):
        asked.append((shape, config.channels_last))
        fast = shape == ("vgg11_bn", 0.25)  # the first, cheapest shape: so fast that the next are worth pricing
        return Speed(1e-4 if fast else 10.0, 1e-5 if fast else 1.0, "bf16", True, (), False, channels_last=False)

    monkeypatch.setattr(budget, "measure_shape", measure)
    config = resolve_config(budget=600.0, data_dir=str(train_data_dir), batch_size=32, threads=1, device="cpu",
                            progress=False)
    planned, _ = budget.plan(config)
    assert asked[0] == (("vgg11_bn", 0.25), "auto") and len(asked) > 1
    assert all(layout is False for _, layout in asked[1:])  # priced in NCHW, as the first shape chose
    assert planned.budget_record["layout"] == {"channels_last": False, "decided_on": ["vgg11_bn", 0.25]}
    assert planned.precision_record["channels_last"] is False and planned.channels_last == "auto"
    assert [p["erasing"] for p in planned.budget_record["prepare_us_per_image"]] == [0.0, 0.3]  # measured, recorded
    assert all(p["us"] > 0 for p in planned.budget_record["prepare_us_per_image"])
    before = len(asked)
    given = budget.plan(dataclasses.replace(config, channels_last=True))[0]  # a layout given: every shape in it
    assert len(asked) > before and all(layout is True for _, layout in asked[before:])
    assert given.budget_record["layout"] == {"channels_last": True, "decided_on": None}


def test_a_batchs_preparation_is_timed_per_erasing_and_recorded(priced):
    config, train_set, _ = priced
    prices = budget_probe.prepare_seconds(config, train_set, resolve_runtime("cpu", "fp32", threads=1), (0.0, 0.3))
    assert [erasing for erasing, _ in prices] == [0.0, 0.3] and all(0 < s < 0.01 for _, s in prices)
