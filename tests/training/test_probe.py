"""precision auto by measurement (vggnet.training.probe): the faster candidate, the 5% rule, the cache and
--reprobe, what never probes, resume, torchrun ranks, and a probe that leaves the run as it was. The step times
are injected: nothing here asserts a real time."""

import copy
import dataclasses
import json
import types

import pytest
import torch

from vggnet.base.errors import CheckpointError, ConfigError
from vggnet.base import probecache
from vggnet.net.cpu_bf16 import SmallMapConv2d
from vggnet.net.models import create_model
from vggnet.runtime import cpu_runs_bf16, resolve_runtime
from vggnet.training import build_run, distributed, fit, probe, resolve_config, resume, train
from vggnet.training.build import build_model, build_optimizer


#: The tiny run's architecture with maps down to 2x2 at 32x32: its last convolution takes the small-map GEMM path
#: in bf16 (the tiny run's own, [8, "M", 16, "M"], has none).
SMALL_MAPS = [8, "M", 8, "M", 8, "M", 8, "M", 8]


#: The candidates in channels_last alone: what the probe times where the run gives the layout.
CHANNELS_LAST = probecache.candidate_names(layouts=(True,))


@pytest.fixture
def train_options(train_options):
    """The tiny run's options with the memory layout given (channels_last): the tests here time the precision
    variants in one layout; the layout's own probe is tested in the section "the memory layout" below."""
    return lambda **options: train_options(**{"channels_last": True, **options})


@pytest.fixture
def probed(monkeypatch, tmp_path):
    """bf16 a candidate on any CPU, the cache under tmp_path, and injected step times (``probed.seconds``, in s, of
    the candidates measured); ``probed.calls`` counts the measurements, ``probed.names`` their candidates."""
    state = types.SimpleNamespace(calls=0, seconds={"fp32": 0.010, "bf16": 0.012, "bf16_onednn": 0.013}, names=[],
                                  cache=tmp_path / "c" / "probe.json")

    def fake_measure(steps):
        state.calls += 1
        state.names.append(tuple(steps))
        return {name: state.seconds[name] for name in steps}

    monkeypatch.setattr(probe, "bf16_candidate", lambda device: device.type == "cpu")
    monkeypatch.setattr(probe, "median_step_seconds", fake_measure)
    monkeypatch.setattr(probe, "cache_path", lambda: state.cache)
    return state


def tiny(train_options, **overrides):
    """The tiny run's config (precision auto), model and optimizer factory, as build_run makes them."""
    config = resolve_config(**train_options(precision="auto", **overrides))
    data = types.SimpleNamespace(classes=list(range(10)), images=torch.zeros(1, 1, 32, 32, dtype=torch.uint8))
    torch.manual_seed(0)
    model = build_model(config, data).to(memory_format=torch.channels_last)
    return config, model, lambda net: build_optimizer(config, net)


# ------------------------------------------------------------------------------------------------ the choice
@pytest.mark.parametrize("fp32, bf16, chosen", [(10.0, 5.0, "bf16"), (10.0, 9.5, "bf16"), (10.0, 9.51, "fp32"),
                                                (10.0, 10.0, "fp32"), (10.0, 14.0, "fp32")])
def test_the_faster_candidate_wins_and_bf16_must_be_5_percent_faster(fp32, bf16, chosen):
    assert probe.faster({"fp32": fp32, "bf16": bf16}) == chosen
    assert probe.winner({"fp32": fp32, "bf16": bf16}) == chosen  # no small maps: bf16 measured once


@pytest.mark.parametrize("bf16, onednn, chosen", [
    (5.0, 6.0, "bf16"), (6.0, 5.0, "bf16_onednn"), (8.0, 8.0, "bf16"),  # the faster variant; a tie: the GEMM's
    (9.6, 9.5, "bf16_onednn"), (9.5, 9.7, "bf16"),  # the best variant is 5% faster than fp32: it wins
    (9.51, 9.6, "fp32"), (9.6, 9.51, "fp32"), (12.0, 11.0, "fp32")])  # no variant 5% faster: fp32
def test_the_fastest_bf16_variant_wins_when_it_is_5_percent_faster_than_fp32(bf16, onednn, chosen):
    assert probe.winner({"fp32": 10.0, "bf16": bf16, "bf16_onednn": onednn}) == chosen


@pytest.mark.parametrize("seconds, chosen, gemm_convs", [
    ({"fp32": 0.010, "bf16": 0.012, "bf16_onednn": 0.013}, "fp32", 0),
    ({"fp32": 0.010, "bf16": 0.008, "bf16_onednn": 0.009}, "bf16", 5),
    ({"fp32": 0.010, "bf16": 0.009, "bf16_onednn": 0.008}, "bf16_onednn", 0),
    ({"fp32": 0.010, "bf16": 0.0097, "bf16_onednn": 0.0096}, "fp32", 0)])
def test_a_new_auto_run_trains_in_the_measured_choice(probed, train_options, tmp_path, capsys, seconds, chosen,
                                                      gemm_convs):
    probed.seconds = seconds
    run = build_run(resolve_config(**train_options(precision="auto", arch=SMALL_MAPS, out=str(tmp_path / "r"))))
    precision = probe.VARIANTS[chosen][0]
    assert probed.names == [CHANNELS_LAST] and run.runtime.precision == precision
    record = run.config.precision_record
    assert (record["precision"], record["small_map_convs"], record["by"], record["batch"]) == (
        precision, chosen == "bf16", "measured", 32)
    assert [record[f"{name}_ms"] for name in seconds] == [round(1000 * s, 3) for s in seconds.values()]
    # the bf16 speed-ups follow the choice: the GEMM convs only where bf16 with them won
    assert sum(isinstance(m, SmallMapConv2d) for m in run.model.modules()) == gemm_convs
    assert any(type(m).__name__ == "MaxPoolReLU" for m in run.model.modules()) is (precision == "bf16")
    line = capsys.readouterr().err.strip()
    label = {"bf16_onednn": "bf16 without small-map GEMM"}.get(chosen, chosen)
    assert line.startswith(f"vggnet train: precision auto -> {label} (fp32 {1000 * seconds['fp32']:.1f}, bf16 "
                           f"{1000 * seconds['bf16']:.1f}, bf16 without small-map GEMM "
                           f"{1000 * seconds['bf16_onednn']:.1f} ms/step at batch 32; measured in ")
    assert line.endswith(f" s, cached {probed.cache})")


@pytest.mark.parametrize("bf16, chosen", [(0.012, "fp32"), (0.008, "bf16")])
def test_without_small_maps_bf16_is_measured_once_and_trains_without_gemm_convs(probed, train_options, tmp_path,
                                                                              capsys, bf16, chosen):
    probed.seconds = {"fp32": 0.010, "bf16": bf16}
    run = build_run(resolve_config(**train_options(precision="auto", out=str(tmp_path / "r"))))
    assert probed.names == [("fp32", "bf16")] and run.runtime.precision == chosen
    record = run.config.precision_record
    assert record["small_map_convs"] is False and "bf16_onednn_ms" not in record
    assert not any(isinstance(m, SmallMapConv2d) for m in run.model.modules())
    line = capsys.readouterr().err.strip()
    assert line.startswith(f"vggnet train: precision auto -> {chosen} (fp32 10.0, bf16 {1000 * bf16:.1f} ms/step at "
                           "batch 32, no map small enough for the GEMM path; measured in ")


@pytest.mark.parametrize("size, arch, layers", [(32, None, 3), (64, None, 2), (128, None, 0), (32, [8, "M", 16], 0),
                                                (32, SMALL_MAPS, 1)])
def test_small_map_layers_counts_the_convs_that_take_the_gemm_path(size, arch, layers):
    # VGG-11 at width 1/4: 4x4 maps at 32x32 (64->128: too narrow; 128->128: the GEMM) and two 2x2 maps
    model = create_model("custom" if arch else "vgg11_bn", arch=arch, num_classes=10, input_size=size, width=0.25 if
                         arch is None else 1.0, head="gap", in_channels=1).train()
    state = copy.deepcopy(model.state_dict())
    assert probe.small_map_layers(model, (128, 1, size, size)) == layers
    assert model.training and all(not m._forward_pre_hooks for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # no batch-norm statistics moved


def test_the_cache_is_read_instead_of_measuring_and_reprobe_measures_again(probed, train_options, tmp_path, capsys):
    first = build_run(resolve_config(**train_options(precision="auto", out=str(tmp_path / "a"))))
    probed.seconds = {"fp32": 0.010, "bf16": 0.001}  # what a new measurement would say
    second = build_run(resolve_config(**train_options(precision="auto", out=str(tmp_path / "b"))))
    assert probed.calls == 1 and second.runtime.precision == first.runtime.precision == "fp32"
    cached = second.config.precision_record
    assert {k: v for k, v in cached.items() if k != "measured"} == {
        "precision": "fp32", "small_map_convs": False, "channels_last": True, "by": "cache", "device": "cpu",
        "batch": 32, "threads": 1, "fp32_ms": 10.0, "bf16_ms": 12.0}
    assert "--reprobe measures again" in capsys.readouterr().err.splitlines()[-1]
    third = build_run(resolve_config(**train_options(precision="auto", out=str(tmp_path / "c"))), reprobe=True)
    assert probed.calls == 2 and third.runtime.precision == "bf16" and third.config.precision_record["by"] == "measured"
    fourth = build_run(resolve_config(**train_options(precision="auto", out=str(tmp_path / "d"))))
    assert probed.calls == 2 and fourth.runtime.precision == "bf16"  # the new measurement replaced the old one
    cache = json.loads(probed.cache.read_text())
    assert cache["version"] == probe.CACHE_VERSION and len(cache["entries"]) == 1


def test_the_cached_variant_is_the_one_a_new_run_trains_in(probed, train_options, tmp_path, capsys):
    probed.seconds = {"fp32": 0.010, "bf16": 0.009, "bf16_onednn": 0.008}
    build_run(resolve_config(**train_options(precision="auto", arch=SMALL_MAPS, out=str(tmp_path / "a"))))
    probed.seconds = {"fp32": 0.010, "bf16": 0.007, "bf16_onednn": 0.008}  # what a new measurement would say
    second = build_run(resolve_config(**train_options(precision="auto", arch=SMALL_MAPS, out=str(tmp_path / "b"))))
    assert probed.calls == 1 and second.runtime.precision == "bf16"
    record = second.config.precision_record
    assert (record["by"], record["small_map_convs"], record["bf16_onednn_ms"]) == ("cache", False, 8.0)
    assert not any(isinstance(m, SmallMapConv2d) for m in second.model.modules())
    assert capsys.readouterr().err.splitlines()[-1].startswith(
        "vggnet train: precision auto -> bf16 without small-map GEMM (fp32 10.0, bf16 9.0, bf16 without small-map "
        "GEMM 8.0 ms/step at batch 32; from ")


def test_an_entry_of_the_two_candidate_probe_is_measured_again(probed, train_options, tmp_path):
    build_run(resolve_config(**train_options(precision="auto", arch=SMALL_MAPS, out=str(tmp_path / "a"))))
    (entry,) = json.loads(probed.cache.read_text())["entries"].values()
    old_key = {k: v for k, v in entry["key"].items() if k not in ("candidates", "small_map_rule")}
    old = {"precision": "bf16", "fp32_ms": 10.0, "bf16_ms": 1.0, "measured": "then"}  # what the old probe wrote
    probed.cache.unlink()
    probecache.write_cache(probed.cache, old_key, old)
    run = build_run(resolve_config(**train_options(precision="auto", arch=SMALL_MAPS, out=str(tmp_path / "b"))))
    assert probed.calls == 2 and run.config.precision_record["by"] == "measured"
    assert run.runtime.precision == "fp32" and len(json.loads(probed.cache.read_text())["entries"]) == 2


@pytest.mark.parametrize("change", [{"small_map_convs": None}, {"small_map_convs": "yes"}, {"bf16_onednn_ms": 0},
                                    {"bf16_onednn_ms": "8"}, {"bf16_onednn_ms": True}])
def test_an_entry_without_a_valid_variant_is_measured_again(probed, train_options, tmp_path, change):
    build_run(resolve_config(**train_options(precision="auto", arch=SMALL_MAPS, out=str(tmp_path / "a"))))
    cache = json.loads(probed.cache.read_text())
    (entry,) = cache["entries"].values()
    entry.update(change)
    if change.get("small_map_convs", False) is None:
        del entry["small_map_convs"]
    probed.cache.write_text(json.dumps(cache))
    build_run(resolve_config(**train_options(precision="auto", arch=SMALL_MAPS, out=str(tmp_path / "b"))))
    assert probed.calls == 2


def test_another_batch_or_thread_count_is_measured_anew(probed, train_options, tmp_path):
    build_run(resolve_config(**train_options(precision="auto", out=str(tmp_path / "a"))))
    build_run(resolve_config(**train_options(precision="auto", out=str(tmp_path / "b"), batch_size=16)))
    build_run(resolve_config(**train_options(precision="auto", out=str(tmp_path / "c"), threads=2)))
    assert probed.calls == 3 and len(json.loads(probed.cache.read_text())["entries"]) == 3


def test_an_unreadable_cache_is_measured_again_and_rewritten(probed, train_options, tmp_path):
    probed.cache.parent.mkdir(parents=True)
    probed.cache.write_text("{not json")
    build_run(resolve_config(**train_options(precision="auto", out=str(tmp_path / "a"))))
    assert probed.calls == 1 and len(json.loads(probed.cache.read_text())["entries"]) == 1


def test_a_cache_that_cannot_be_written_is_a_warning_and_the_run_goes_on(probed, train_options, tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    probed.cache = tmp_path / "a-file" / "probe.json"
    with pytest.warns(UserWarning, match="could not write the precision probe's cache"):
        run = build_run(resolve_config(**train_options(precision="auto", out=str(tmp_path / "a"))))
    assert run.runtime.precision == "fp32" and probed.calls == 1
    assert "cached" not in capsys.readouterr().err
    assert set(run.config.precision_record) == {"precision", "small_map_convs", "channels_last", "by", "device",
                                                "batch", "threads", "fp32_ms", "bf16_ms", "measured",
                                                "probe_seconds"}  # no local path


# ------------------------------------------------------------------------------------------------ what never probes
def test_an_explicit_precision_never_probes(probed, train_options, tmp_path, capsys):
    run = build_run(resolve_config(**train_options(precision="fp32", out=str(tmp_path / "a"))), reprobe=True)
    assert probed.calls == 0 and run.runtime.precision == "fp32" and run.config.precision_record is None
    assert capsys.readouterr().err == "" and not probed.cache.exists()
    with pytest.raises(ConfigError, match="--reprobe measures which precision 'auto' trains in, but --precision fp32"):
        train(resolve_config(**train_options(precision="fp32", out=str(tmp_path / "b"))), reprobe=True)


@pytest.mark.cpu_bf16
def test_an_explicit_bf16_never_probes(probed, train_options, tmp_path):
    run = build_run(resolve_config(**train_options(precision="bf16", out=str(tmp_path / "a"))))
    assert probed.calls == 0 and run.runtime.precision == "bf16" and run.config.precision_record is None


def test_a_cpu_without_native_bf16_takes_fp32_without_probing(probed, train_options, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(probe, "bf16_candidate", lambda device: False)
    run = build_run(resolve_config(**train_options(precision="auto", out=str(tmp_path / "a"))))
    assert probed.calls == 0 and run.runtime.precision == "fp32"
    assert run.config.precision_record == {"precision": "fp32", "by": "rule", "device": "cpu"}
    assert capsys.readouterr().err == "" and not probed.cache.exists()


def test_deterministic_runs_probe_too(probed, train_options, tmp_path):
    run = build_run(resolve_config(**train_options(precision="auto", deterministic=True, out=str(tmp_path / "a"))))
    assert probed.calls == 1 and run.config.precision_record["by"] == "measured"


def test_the_cli_passes_reprobe_and_refuses_it_where_nothing_is_measured(probed, train_cli, train_cli_args, tmp_path,
                                                                         one_line_error):
    assert train_cli(train_cli_args("--precision", "auto", "--channels-last", "--epochs", "1", "--out",
                                    tmp_path / "a"))[0] == 0
    assert train_cli(train_cli_args("--precision", "auto", "--channels-last", "--epochs", "1", "--out",
                                    tmp_path / "b", "--reprobe"))[0] == 0
    assert probed.calls == 2
    saved = json.loads((tmp_path / "b" / "config.json").read_text())
    assert saved["precision"] == "auto" and saved["precision_record"]["precision"] == "fp32"
    one_line_error(*train_cli(train_cli_args("--reprobe", "--out", tmp_path / "c"))[::2],
                   "--reprobe measures which precision 'auto' trains in, but --precision fp32 was given")
    one_line_error(*train_cli(["train", "--resume", tmp_path / "a", "--reprobe"])[::2],
                   "a resumed run keeps the precision it started with")
    assert probed.calls == 2


# ------------------------------------------------------------------------------------------------ resume
@pytest.mark.parametrize("chosen, gemm_convs", [("fp32", 0), pytest.param("bf16", 5, marks=pytest.mark.cpu_bf16),
                                                pytest.param("bf16_onednn", 0, marks=pytest.mark.cpu_bf16)])
def test_a_resumed_run_keeps_its_recorded_precision_and_never_probes(probed, train_options, tmp_path, monkeypatch,
                                                                    chosen, gemm_convs):
    probed.seconds = {name: 0.005 if name == chosen else 0.020 for name in CHANNELS_LAST}
    train(resolve_config(**train_options(precision="auto", arch=SMALL_MAPS, epochs=1, out=str(tmp_path / "r"))))
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert saved["precision"] == "auto" and probe.candidate_of(saved["precision_record"]) == chosen
    assert saved["precision_record"]["small_map_convs"] is (chosen == "bf16")
    probed.seconds = {name: 0.020 if name == chosen else 0.005 for name in CHANNELS_LAST}  # now others
    seen = []
    monkeypatch.setattr("vggnet.training.fit", lambda run, resume=False: seen.append(
        (run.runtime.precision, sum(isinstance(m, SmallMapConv2d) for m in run.model.modules()))) or
        fit(run, resume=resume))
    resume(tmp_path / "r", epochs=2)
    assert probed.calls == 1 and seen == [(probe.VARIANTS[chosen][0], gemm_convs)]
    assert json.loads((tmp_path / "r" / "config.json").read_text())["precision_record"] == saved["precision_record"]


def test_resume_takes_the_record_only_on_its_kind_of_device(train_options):
    config = resolve_config(**train_options(precision="auto"))
    cpu = resolve_runtime("cpu", "fp32", threads=1)
    gpu_record = {"precision": "fp16", "by": "rule", "device": "cuda"}
    runtime, record = probe.recorded(dataclasses.replace(config, precision_record=gpu_record), cpu)
    assert runtime is cpu and record == gpu_record  # another device: this device's rule, as before records
    runtime, record = probe.recorded(dataclasses.replace(config, precision_record=None), cpu)
    assert runtime is cpu and record is None  # a run started before records: the rule, as then
    with pytest.raises(CheckpointError, match="precision_record names precision 'fp8'"):
        probe.recorded(dataclasses.replace(config, precision_record={"precision": "fp8", "device": "cpu"}), cpu)
    with pytest.raises(CheckpointError, match="precision_record has small_map_convs 'no', not true or false"):
        probe.recorded(dataclasses.replace(config, precision_record={"precision": "fp32", "device": "cpu",
                                                                     "small_map_convs": "no"}), cpu)


@pytest.mark.parametrize("record, gemm", [(None, True), ({"precision": "bf16", "by": "measured"}, True),
                                          ({"precision": "bf16", "small_map_convs": True}, True),
                                          ({"precision": "bf16", "small_map_convs": False}, False)])
def test_the_gemm_convs_are_used_unless_the_record_says_no(record, gemm):
    # an explicit --precision bf16 (no record) and a run recorded before the variant was measured keep the GEMM
    assert probe.uses_small_map_convs(record) is gemm


# ------------------------------------------------------------------------------------------------ the memory layout
def weights_in_channels_last(model: torch.nn.Module) -> bool:
    """Whether the model's last convolution (of several input channels: with one, a tensor is in both layouts) is
    in channels_last."""
    conv = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    assert conv.in_channels > 1
    return conv.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("nchw, chosen", [(0.0090, "fp32_nchw"), (0.0096, "fp32")])
def test_a_run_that_gives_no_layout_times_both_and_trains_in_nchw_only_where_5_percent_faster(
        probed, train_options, tmp_path, capsys, nchw, chosen):
    probed.seconds = {"fp32": 0.010, "fp32_nchw": nchw, "bf16": 0.012, "bf16_nchw": 0.013}
    run = build_run(resolve_config(**train_options(precision="auto", channels_last="auto", epochs=1,
                                                   out=str(tmp_path / "r"))))
    channels_last = chosen == "fp32"
    assert probed.names == [("fp32", "fp32_nchw", "bf16", "bf16_nchw")] and run.runtime.precision == "fp32"
    assert run.runtime.channels_last is channels_last and weights_in_channels_last(run.model) is channels_last
    record = run.config.precision_record
    assert (record["channels_last"], record["fp32_nchw_ms"], record["bf16_nchw_ms"]) == (channels_last,
                                                                                         1000 * nchw, 13.0)
    assert run.config.channels_last == "auto"  # the request, as given; the record says what it became
    line = capsys.readouterr().err.strip()
    assert line.startswith(f"vggnet train: precision auto -> {'fp32' if channels_last else 'fp32 NCHW'} (fp32 10.0, "
                           f"fp32 NCHW {1000 * nchw:.1f}, bf16 12.0, bf16 NCHW 13.0 ms/step at batch 32, no map")
    maps = []  # the last convolution's input (8 channels: a 1-channel image is in both layouts) in training and eval
    conv = [m for m in run.model.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    conv.register_forward_pre_hook(lambda module, inputs: maps.append(
        (module.training, inputs[0].is_contiguous(memory_format=torch.channels_last))))
    fit(run)
    assert {training for training, _ in maps} == {True, False} and {layout for _, layout in maps} == {channels_last}


@pytest.mark.parametrize("given", [True, False])
def test_a_layout_given_is_the_only_one_timed_and_a_key_of_its_own(probed, train_options, tmp_path, given):
    names = ("fp32", "bf16") if given else ("fp32_nchw", "bf16_nchw")
    probed.seconds = {name: 0.010 for name in names}
    run = build_run(resolve_config(**train_options(precision="auto", channels_last=given, out=str(tmp_path / "a"))))
    assert probed.names == [names] and run.runtime.channels_last is given
    assert weights_in_channels_last(run.model) is given and run.config.precision_record["channels_last"] is given
    probed.seconds = {name: 0.010 for name in probecache.candidate_names(("fp32", "bf16"))}
    build_run(resolve_config(**train_options(precision="auto", channels_last="auto", out=str(tmp_path / "b"))))
    assert probed.calls == 2  # the other request is another key: measured, not read
    keys = [entry["key"]["channels_last"] for entry in json.loads(probed.cache.read_text())["entries"].values()]
    assert keys == [given, "auto"]


@pytest.mark.parametrize("nchw, chosen", [(0.009, "fp32_nchw"), (0.0096, "fp32")])
def test_a_cpu_without_native_bf16_times_fp32_in_both_layouts_where_the_run_gives_none(
        probed, train_options, tmp_path, monkeypatch, capsys, nchw, chosen):
    monkeypatch.setattr(probe, "bf16_candidate", lambda device: False)
    probed.seconds = {"fp32": 0.010, "fp32_nchw": nchw}
    run = build_run(resolve_config(**train_options(precision="auto", channels_last="auto", out=str(tmp_path / "a"))))
    assert probed.names == [("fp32", "fp32_nchw")] and run.runtime.precision == "fp32"
    assert run.runtime.channels_last is (chosen == "fp32") and weights_in_channels_last(run.model) is (chosen == "fp32")
    line = capsys.readouterr().err.strip()
    assert line.startswith(f"vggnet train: precision auto -> {probecache.label(chosen)} (fp32 10.0, fp32 NCHW "
                           f"{1000 * nchw:.1f} ms/step at batch 32; measured in ")  # no word of the GEMM path
    (entry,) = json.loads(probed.cache.read_text())["entries"].values()
    assert entry["key"]["bf16"] is False and entry["key"]["channels_last"] == "auto"


def test_an_explicit_precision_takes_the_layouts_rule_without_probing(probed, train_options, tmp_path):
    run = build_run(resolve_config(**train_options(precision="fp32", channels_last="auto", out=str(tmp_path / "a"))))
    assert probed.calls == 0 and run.runtime.channels_last is True and weights_in_channels_last(run.model)


def test_a_resumed_run_keeps_its_recorded_layout_and_never_probes(probed, train_options, tmp_path, monkeypatch):
    probed.seconds = {"fp32": 0.010, "fp32_nchw": 0.005, "bf16": 0.020, "bf16_nchw": 0.020}
    train(resolve_config(**train_options(precision="auto", channels_last="auto", epochs=1, out=str(tmp_path / "r"))))
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert saved["channels_last"] == "auto" and saved["precision_record"]["channels_last"] is False
    probed.seconds = {"fp32": 0.005, "fp32_nchw": 0.010, "bf16": 0.020, "bf16_nchw": 0.020}  # now channels_last
    seen = []
    monkeypatch.setattr("vggnet.training.fit", lambda run, resume=False: seen.append(
        (run.runtime.channels_last, weights_in_channels_last(run.model))) or fit(run, resume=resume))
    resume(tmp_path / "r", epochs=2)
    assert probed.calls == 1 and seen == [(False, False)]


def test_a_record_with_a_bad_layout_is_refused_on_resume(train_options):
    config = resolve_config(**train_options(precision="auto"))
    with pytest.raises(CheckpointError, match="precision_record has channels_last 'no', not true or false"):
        probe.recorded(dataclasses.replace(config, precision_record={"precision": "fp32", "device": "cpu",
                                                                     "channels_last": "no"}),
                       resolve_runtime("cpu", "fp32", threads=1))


def test_the_cli_gives_the_layout_or_leaves_it_to_the_probe(train_cli, train_cli_args, tmp_path):
    from vggnet.cli import build_parser

    parse = build_parser().parse_args
    assert parse(["train", "--channels-last"]).channels_last is True
    assert parse(["train", "--no-channels-last"]).channels_last is False
    assert parse(["train"]).channels_last is None and resolve_config().channels_last == "auto"  # the default
    code, _, err = train_cli(train_cli_args("--channels-last", "--no-channels-last", "--out", tmp_path / "a"))
    assert code == 2 and "not allowed with argument" in err


# ------------------------------------------------------------------------------------------------ torchrun
class RankOne(distributed.Dist):
    """Rank 1 of 2: its broadcast hands it rank 0's object."""

    def __init__(self, from_rank0):
        super().__init__(enabled=True, rank=1, world_size=2)
        self.from_rank0 = from_rank0

    def broadcast_object(self, obj):
        assert obj is None  # rank 1 brings nothing
        return self.from_rank0


def test_torchrun_ranks_take_rank_0s_decision_without_measuring(probed, train_options):
    config, model, make_optimizer = tiny(train_options)
    runtime = resolve_runtime("cpu", "fp32", threads=1)
    decided = {"precision": "bf16", "by": "measured", "device": "cpu", "fp32_ms": 1.0, "bf16_ms": 0.5}
    chosen, record = probe.decide_precision(config, runtime, RankOne(decided), model, 1, make_optimizer)
    assert probed.calls == 0 and chosen.precision == "bf16" and record == decided
    # rank 0 measures (a per-rank batch: 32 images among 2 ranks), and broadcasts what it chose
    rank0 = distributed.Dist(enabled=True, rank=0, world_size=2)
    rank0.broadcast_object = lambda obj: obj
    chosen, record = probe.decide_precision(config, runtime, rank0, model, 1, make_optimizer)
    assert probed.calls == 1 and (chosen.precision, record["batch"]) == ("fp32", 16)


def test_an_adaptive_run_measures_at_the_thread_count_the_load_leaves(probed, train_options):
    config, model, make_optimizer = tiny(train_options)
    polls = []

    class Busy:  # AdaptiveThreads on a machine where another process keeps one of two cores busy
        def poll(self, seconds=None):
            polls.append(seconds)
            torch.set_num_threads(1)
            return 1

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        runtime = resolve_runtime("cpu", "fp32", threads=2)
        _, record = probe.decide_precision(config, runtime, distributed.Dist(), model, 1, make_optimizer,
                                           threads=Busy())
    finally:
        torch.set_num_threads(before)
    assert polls == [probe.LOAD_SECONDS] and probed.calls == 1 and record["threads"] == 1
    (entry,) = json.loads(probed.cache.read_text())["entries"].values()
    assert entry["key"]["threads"] == 1


# ------------------------------------------------------------------------------------------------ the measurement
def test_rounds_alternate_and_the_median_of_each_is_returned(monkeypatch):
    clock = {"now": 0.0}
    calls = []

    def step(name, seconds):
        def run():
            calls.append(name)
            clock["now"] += seconds.pop(0) if seconds else 0.001
        return run

    # warm-up (not counted: 9 s), then 7 rounds (the rounds take < ROUND_SECONDS) with one slow outlier each
    fp32 = [9.0, 0.010, 0.011, 0.2, 0.012, 0.010, 0.013, 0.011]
    bf16 = [9.0, 0.020, 0.1, 0.021, 0.022, 0.020, 0.019, 0.021]
    result = probe.median_step_seconds({"fp32": step("fp32", fp32), "bf16": step("bf16", bf16)},
                                       clock=lambda: clock["now"])
    assert result == pytest.approx({"fp32": 0.011, "bf16": 0.021})
    assert calls[:2] == ["fp32", "bf16"] and calls[2:6] == ["fp32", "bf16", "bf16", "fp32"]
    assert len(calls) == 2 * (probe.WARMUP_STEPS + probe.MAX_ROUNDS)
    # slow steps: the rounds stop at MIN_ROUNDS
    calls.clear()
    probe.median_step_seconds({"fp32": step("fp32", [1.0] * 9), "bf16": step("bf16", [1.0] * 9)},
                              clock=lambda: clock["now"])
    assert len(calls) == 2 * (probe.WARMUP_STEPS + probe.MIN_ROUNDS)


def test_probe_batch_is_the_runs_or_a_smaller_stand_in():
    assert [probe.probe_batch(b, 32) for b in (1, 32, 128, 256, 4096)] == [1, 32, 128, 128, 128]
    assert [probe.probe_batch(b, 224) for b in (2, 128)] == [2, 4]


def test_the_probe_leaves_the_model_the_optimizer_and_the_random_state_untouched(train_options):
    config, model, make_optimizer = tiny(train_options, dropout=0.5, arch=SMALL_MAPS)
    optimizer = make_optimizer(model)
    model(torch.randn(4, 1, 32, 32)).sum().backward()
    optimizer.step()  # momentum buffers to keep
    model.train()
    before = (copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()), torch.get_rng_state(),
              [type(m) for m in model.modules()], torch.get_num_threads())

    def measure(steps):  # the real timer where bf16 runs; elsewhere the fp32 copy trains (bf16 cannot run)
        if cpu_runs_bf16():
            return probe.median_step_seconds(steps)
        for _ in range(3):
            steps["fp32"]()
        return {name: 1.0 for name in steps}

    seconds = probe.measure_candidates(model, make_optimizer, (8, 1, 32, 32), True, measure)
    assert list(seconds) == list(CHANNELS_LAST) and all(s > 0 for s in seconds.values())
    state, opt_state, rng, types_, threads = before
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    after = optimizer.state_dict()
    assert after["param_groups"] == opt_state["param_groups"]
    assert all(torch.equal(v["momentum_buffer"], after["state"][k]["momentum_buffer"])
               for k, v in opt_state["state"].items())
    assert optimizer.param_groups[0]["params"][0] is next(model.parameters())
    assert torch.equal(torch.get_rng_state(), rng) and [type(m) for m in model.modules()] == types_
    assert model.training and torch.get_num_threads() == threads
