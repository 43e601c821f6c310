"""What the precision probes share (vggnet.base.probecache): the 5% rule, the interleaved timer, the key and the
cache file. The probes themselves are tested in tests/training/test_probe.py and tests/test_inference_probe.py."""

import json
import os

import pytest
import torch
from torch import nn

from vggnet.base import probecache
from vggnet.net.models import create_model

CPU = {"cpu": "Test CPU", "features": ["avx512f", "avx512_bf16"], "onednn_max_cpu_isa": None}


@pytest.mark.parametrize("bf16, chosen", [(5.0, "bf16"), (9.5, "bf16"), (9.5001, "fp32"), (10.0, "fp32"),
                                          (14.0, "fp32")])
def test_bf16_is_chosen_only_when_at_least_5_percent_faster(bf16, chosen):
    assert probecache.faster({"fp32": 10.0, "bf16": bf16}) == chosen


@pytest.mark.parametrize("a, b, chosen", [(5.0, 6.0, "a"), (6.0, 5.0, "b"), (7.0, 7.0, "a"), (9.6, 9.5, "b"),
                                          (9.51, 9.6, "ref"), (12.0, 11.0, "ref")])
def test_the_fastest_of_several_variants_wins_when_at_least_5_percent_faster(a, b, chosen):
    seconds = {"ref": 10.0, "a": a, "b": b, "other": 0.1}  # "other" is not a candidate here
    assert probecache.faster(seconds, ("ref", "a", "b")) == chosen
    assert probecache.faster(seconds, ("ref", "b", "a")) == ("b" if chosen == "a" and a == b else chosen)


def test_a_measured_entry_holds_the_choice_and_the_milliseconds():
    entry = probecache.measured_entry({"fp32": 0.0041, "bf16": 0.0053125})
    assert (entry["precision"], entry["fp32_ms"], entry["bf16_ms"]) == ("fp32", 4.1, 5.312)
    assert sorted(entry) == ["bf16_ms", "channels_last", "fp32_ms", "measured", "precision", "small_map_convs"]
    assert entry["channels_last"] is True  # NCHW was not timed
    assert entry["small_map_convs"] is False  # bf16 without the GEMM path was not measured against it


@pytest.mark.parametrize("gemm, onednn, chosen, small_maps", [(5.0, 6.0, "bf16", True), (6.0, 5.0, "bf16", False),
                                                              (9.6, 9.7, "fp32", False)])
def test_a_measured_entry_of_three_candidates_says_which_bf16_variant_won(gemm, onednn, chosen, small_maps):
    entry = probecache.measured_entry({"fp32": 0.010, "bf16": gemm / 1000, "bf16_onednn": onednn / 1000})
    assert (entry["precision"], entry["small_map_convs"], entry["bf16_onednn_ms"]) == (chosen, small_maps, onednn)
    assert probecache.candidate_of(entry) == {(True, "bf16"): "bf16", (False, "bf16"): "bf16_onednn"}.get(
        (small_maps, chosen), "fp32")
    assert probecache.uses_small_map_convs(entry) is small_maps


# ---------------------------------------------------------------------------------------------------- layouts
def test_the_candidates_are_each_variant_in_each_layout_channels_last_first():
    assert probecache.candidate_names() == probecache.ALL_CANDIDATES == (
        "fp32", "fp32_nchw", "bf16", "bf16_nchw", "bf16_onednn", "bf16_onednn_nchw")
    assert probecache.probe_candidates(False, "auto") == ("fp32", "fp32_nchw", "bf16", "bf16_nchw")
    assert probecache.probe_candidates(True, True) == ("fp32", "bf16", "bf16_onednn")
    assert probecache.probe_candidates(False, False) == ("fp32_nchw", "bf16_nchw")
    assert [probecache.variant_of(n) for n in ("fp32", "bf16_nchw", "bf16_onednn_nchw", "fp16", "fp16_nchw")] == [
        ("fp32", False, True), ("bf16", True, False), ("bf16", False, False), ("fp16", True, True),
        ("fp16", True, False)]
    assert [probecache.label(n) for n in ("fp32_nchw", "bf16_onednn", "bf16_onednn_nchw", "fp16")] == [
        "fp32 NCHW", "bf16 without small-map GEMM", "bf16 without small-map GEMM NCHW", "fp16"]


@pytest.mark.parametrize("seconds, chosen", [
    ({"fp32": 10.0, "fp32_nchw": 9.5}, "fp32_nchw"),  # NCHW 5% faster than channels_last: it wins
    ({"fp32": 10.0, "fp32_nchw": 9.51}, "fp32"),  # a near tie goes to channels_last
    ({"fp32": 10.0, "fp32_nchw": 12.0, "bf16": 6.0, "bf16_nchw": 5.0}, "bf16_nchw"),
    ({"fp32": 10.0, "fp32_nchw": 12.0, "bf16": 6.0, "bf16_nchw": 5.8}, "bf16"),
    # each variant's layout first, then the 5% rule between variants: bf16 NCHW 9.4 is within 5% of fp32 NCHW 9.5
    ({"fp32": 10.0, "fp32_nchw": 9.5, "bf16": 9.9, "bf16_nchw": 9.4}, "fp32_nchw"),
    ({"fp32": 10.0, "fp32_nchw": 11.0, "bf16": 8.0, "bf16_nchw": 9.0, "bf16_onednn": 7.0,
      "bf16_onednn_nchw": 6.0}, "bf16_onednn_nchw"),
    ({"fp32_nchw": 10.0, "bf16_nchw": 9.0}, "bf16_nchw")])  # one layout given: NCHW alone
def test_nchw_wins_only_where_5_percent_faster_than_channels_last(seconds, chosen):
    assert probecache.winner(seconds) == chosen
    entry = probecache.measured_entry({name: s / 1000 for name, s in seconds.items()})
    assert probecache.candidate_of(entry) == chosen
    assert entry["channels_last"] is not chosen.endswith("_nchw")
    assert entry["small_map_convs"] is (chosen.startswith("bf16") and not chosen.startswith("bf16_onednn")
                                        and "bf16_onednn" in seconds)
    assert probecache.runs_channels_last(entry, default=not entry["channels_last"]) is entry["channels_last"]


def test_a_record_without_a_layout_keeps_the_runs_own():
    assert probecache.runs_channels_last(None, True) is True
    assert probecache.runs_channels_last({"precision": "fp32"}, False) is False  # recorded before layouts were timed
    assert probecache.runs_channels_last({"precision": "fp32", "channels_last": False}, True) is False
    assert probecache.candidate_of({"precision": "bf16", "small_map_convs": False, "channels_last": False,
                                    "bf16_onednn_nchw_ms": 1.0}) == "bf16_onednn_nchw"
    line = probecache.times_line({"fp32_ms": 10.0, "fp32_nchw_ms": 12.04, "bf16_ms": 6.0, "batch": 8}, "ms/step")
    assert line == "fp32 10.0, fp32 NCHW 12.0, bf16 6.0 ms/step at batch 8, no map small enough for the GEMM path"


def test_the_timer_warms_up_alternates_and_returns_medians():
    clock, calls = {"now": 0.0}, []

    def call(name, seconds):
        def run():
            calls.append(name)
            clock["now"] += seconds.pop(0)
        return run

    result = probecache.median_seconds({"fp32": call("fp32", [5.0, 0.2, 0.3, 0.1]),
                                        "bf16": call("bf16", [5.0, 0.4, 0.6, 0.5])},
                                       warmup=1, min_rounds=3, max_rounds=3, round_seconds=1.0,
                                       clock=lambda: clock["now"])
    assert result == pytest.approx({"fp32": 0.2, "bf16": 0.5})
    assert calls == ["fp32", "bf16", "fp32", "bf16", "bf16", "fp32", "fp32", "bf16"]


# -------------------------------------------------------------------------------------------------------- keys
def key(model, kind="inference", cpu=CPU, shape=(4, 1, 32, 32), threads=2, channels_last=True, **extra):
    return probecache.probe_key(kind, cpu, model, shape, threads, channels_last, **extra)


def test_the_key_holds_what_a_measurement_depends_on():
    model = create_model("vgg11", num_classes=10, in_channels=1, input_size=32, width=0.25, head="gap")
    k = key(model, path=1)
    assert k == {"version": probecache.CACHE_VERSION, "kind": "inference", **CPU, "torch": torch.__version__,
                 "model": {name: value for name, value in model.config.items() if name != "init"},
                 "input": [4, 1, 32, 32], "threads": 2, "channels_last": True, "path": 1}
    assert json.loads(json.dumps(k)) == k  # what a read back compares equal to
    different = [key(model, kind="training"), key(model, cpu={**CPU, "onednn_max_cpu_isa": "AVX512_CORE"}),
                 key(model, shape=(8, 1, 32, 32)), key(model, threads=1), key(model, channels_last=False),
                 key(model, path=2), key(create_model("vgg13", num_classes=10, in_channels=1, input_size=32,
                                                      width=0.25, head="gap"), path=1)]
    digests = {probecache.digest(k)} | {probecache.digest(other) for other in different}
    assert len(digests) == 1 + len(different)


def test_the_initialisation_is_not_part_of_the_key_but_the_layers_signature_tells_a_compressed_copy():
    a = create_model("vgg11", num_classes=10, in_channels=1, input_size=32, width=0.25, head="gap", init="torchvision")
    b = create_model("vgg11", num_classes=10, in_channels=1, input_size=32, width=0.25, head="gap", init="xavier")
    assert key(a) == key(b) and probecache.layer_signature(a) == probecache.layer_signature(b)
    b.classifier = nn.Sequential(nn.Linear(b.classifier[-1].in_features, 4), nn.Linear(4, 10))  # same config
    assert probecache.layer_signature(a) != probecache.layer_signature(b)


# ------------------------------------------------------------------------------------------------------- cache
ENTRY = {"precision": "bf16", "small_map_convs": True, "channels_last": True, "fp32_ms": 4.1, "bf16_ms": 2.0,
         "measured": "2025-01-01 00:00:00 UTC"}


def test_the_cache_round_trips_an_entry_under_its_key(tmp_path):
    path = tmp_path / "deep" / "probe.json"
    assert probecache.read_cache(path, {"n": 1}) is None  # no file yet
    assert probecache.write_cache(path, {"n": 1}, ENTRY) is None
    assert probecache.write_cache(path, {"n": 2}, dict(ENTRY, precision="fp32")) is None
    assert probecache.read_cache(path, {"n": 1}) == {"key": {"n": 1}, **ENTRY}
    assert probecache.read_cache(path, {"n": 2})["precision"] == "fp32"
    assert probecache.read_cache(path, {"n": 3}) is None
    saved = json.loads(path.read_text())
    assert saved["version"] == probecache.CACHE_VERSION and len(saved["entries"]) == 2


@pytest.mark.parametrize("entry", [dict(ENTRY, precision="fp16"), dict(ENTRY, fp32_ms=0), dict(ENTRY, bf16_ms=-1.0),
                                   dict(ENTRY, bf16_ms="2"), dict(ENTRY, fp32_ms=True),
                                   {k: v for k, v in ENTRY.items() if k != "fp32_ms"},
                                   {k: v for k, v in ENTRY.items() if k != "small_map_convs"},
                                   dict(ENTRY, small_map_convs="yes"), dict(ENTRY, bf16_onednn_ms=0),
                                   dict(ENTRY, bf16_onednn_ms=None), dict(ENTRY, channels_last="yes"),
                                   {k: v for k, v in ENTRY.items() if k != "channels_last"},
                                   dict(ENTRY, channels_last=False),  # no time of the chosen bf16_nchw
                                   dict(ENTRY, fp32_nchw_ms=0.0)])
def test_an_entry_that_is_not_a_decision_is_measured_again(tmp_path, entry):
    path = tmp_path / "probe.json"
    probecache.write_cache(path, {"n": 1}, entry)
    assert probecache.read_cache(path, {"n": 1}) is None


@pytest.mark.parametrize("text", ["{not json", "[]", '{"version": 99, "entries": {}}', '{"version": 1}'])
def test_a_foreign_or_unreadable_cache_holds_nothing_and_is_rewritten(tmp_path, text):
    path = tmp_path / "probe.json"
    path.write_text(text)
    assert probecache.read_cache(path, {"n": 1}) is None
    assert probecache.write_cache(path, {"n": 1}, ENTRY) is None
    assert probecache.read_cache(path, {"n": 1})["precision"] == "bf16"


def test_the_cache_keeps_a_bounded_number_of_entries(tmp_path, monkeypatch):
    monkeypatch.setattr(probecache, "MAX_CACHE_ENTRIES", 3)
    path = tmp_path / "probe.json"
    for i in range(5):
        assert probecache.write_cache(path, {"n": i}, dict(ENTRY, precision="fp32")) is None
    assert probecache.read_cache(path, {"n": 0}) is None and probecache.read_cache(path, {"n": 1}) is None
    assert [probecache.read_cache(path, {"n": i})["key"] for i in (2, 3, 4)] == [{"n": 2}, {"n": 3}, {"n": 4}]


def test_a_cache_that_cannot_be_written_says_why(tmp_path):
    (tmp_path / "a-file").write_text("")
    problem = probecache.write_cache(tmp_path / "a-file" / "probe.json", {"n": 1}, ENTRY)
    assert problem is not None and "a-file" in problem


def test_the_cache_lives_in_vggnets_cache_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert probecache.cache_path() == tmp_path / "vggnet" / "probe.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert probecache.cache_path() == tmp_path.__class__(os.path.expanduser("~")) / ".cache" / "vggnet" / "probe.json"
    assert probecache.home_relative(os.path.join(os.path.expanduser("~"), ".cache", "x")) == "~/.cache/x"
    assert probecache.home_relative("/elsewhere/x") == "/elsewhere/x"
