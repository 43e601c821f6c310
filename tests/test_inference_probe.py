"""precision auto for inference by measurement (vggnet.evaluation.probe): the 5% rule, the cache and --reprobe,
what never probes, the key, the line eval and predict print and eval's record, and a probe that leaves the model
as it was. The forward times are injected: nothing here asserts a real time."""

import copy
import dataclasses
import json
import types

import pytest
import torch

from vggnet.base import probecache
from vggnet.evaluation import probe
from vggnet.runtime import Runtime, resolve_runtime
from vggnet.store.rundir import load


@pytest.fixture
def probed(monkeypatch, tmp_path):
    """bf16 a candidate on any CPU, the cache under tmp_path, and injected forward times (``probed.seconds``, in s);
    ``probed.calls`` counts the measurements, ``probed.built`` the candidates built for them (no forward pass runs:
    on a CPU without bf16 the bf16 copy could not); a candidate without an injected time is measured but left out
    of the result, as if it were not timed."""
    state = types.SimpleNamespace(calls=0, built=[], seconds={"fp32": 0.010, "bf16": 0.012},
                                  cache=tmp_path / "c" / "probe.json")

    def fake_candidate(model, name, shape):
        state.built.append((name, tuple(shape)))
        return lambda: None

    def fake_measure(calls):
        assert set(state.seconds) <= set(calls)
        state.calls += 1
        return dict(state.seconds)

    monkeypatch.setattr(probe, "bf16_candidate", lambda device: device.type == "cpu")
    monkeypatch.setattr(probe, "candidate_forward", fake_candidate)
    monkeypatch.setattr(probe, "median_forward_seconds", fake_measure)
    monkeypatch.setattr(probe, "cache_path", lambda: state.cache)
    return state


@pytest.fixture(scope="module")
def loaded(train_run_one_epoch):
    return load(train_run_one_epoch["dir"])


def cpu(precision="fp32", threads=1):
    return resolve_runtime("cpu", precision, threads=threads)


# ------------------------------------------------------------------------------------------------ the choice
@pytest.mark.parametrize("fp32, bf16, chosen", [(0.010, 0.005, "bf16"), (0.010, 0.0095, "bf16"),
                                                (0.010, 0.00951, "fp32"), (0.010, 0.010, "fp32"),
                                                (0.010, 0.014, "fp32")])
def test_auto_runs_in_the_measured_choice_and_bf16_must_be_5_percent_faster(probed, loaded, fp32, bf16, chosen,
                                                                           monkeypatch):
    monkeypatch.setattr(probe, "small_map_layers", lambda model, shape: 1)  # as a model with 2x2 maps has
    probed.seconds = {"fp32": fp32, "bf16": bf16}
    choice = probe.decide(loaded, cpu("fp32"), "auto", batch=64)
    assert probed.calls == 1 and choice.runtime.precision == chosen
    record = choice.record
    assert (record["precision"], record["by"], record["fp32_ms"], record["bf16_ms"], record["batch"],
            record["threads"], record["device"]) == (chosen, "measured", round(1000 * fp32, 3),
                                                     round(1000 * bf16, 3), 64, 1, "cpu")
    assert choice.line.startswith(f"vggnet eval: precision auto: {chosen} (fp32 {1000 * fp32:.1f} ms, bf16 "
                                  f"{1000 * bf16:.1f} ms per batch of 64, measured in ")
    assert choice.line.endswith(f" s; cached in {probed.cache})")
    # every candidate on the model's own input: 1 channel, 32x32, in both layouts; with a map small enough for the
    # GEMM path, bf16 without it is a candidate too
    assert probed.built == [(name, (64, 1, 32, 32)) for name in ("fp32", "fp32_nchw", "bf16", "bf16_nchw",
                                                                 "bf16_onednn", "bf16_onednn_nchw")]


@pytest.mark.parametrize("gemm, onednn, chosen", [(0.006, 0.005, "bf16_onednn"), (0.005, 0.006, "bf16"),
                                                  (0.005, 0.005, "bf16"), (0.011, 0.0096, "fp32")])
def test_bf16_without_the_small_map_gemm_is_a_candidate_and_its_choice_reaches_the_runtime(probed, loaded, gemm,
                                                                                         onednn, chosen, monkeypatch):
    monkeypatch.setattr(probe, "small_map_layers", lambda model, shape: 1)
    probed.seconds = {"fp32": 0.010, "bf16": gemm, "bf16_onednn": onednn}
    choice = probe.decide(loaded, cpu(), "auto", batch=64)
    precision, small_maps = {"fp32": ("fp32", False), "bf16": ("bf16", True), "bf16_onednn": ("bf16", False)}[chosen]
    assert (choice.runtime.precision, choice.runtime.small_map_convs) == (precision, small_maps)
    assert choice.record["small_map_convs"] is (chosen == "bf16")
    label = {"fp32": "fp32", "bf16": "bf16", "bf16_onednn": "bf16 without small-map GEMM"}[chosen]
    assert choice.line.startswith(f"vggnet eval: precision auto: {label} (fp32 10.0 ms, bf16 {1000 * gemm:.1f} ms, "
                                  f"bf16 without small-map GEMM {1000 * onednn:.1f} ms per batch of 64, measured in ")
    again = probe.decide(loaded, cpu(), "auto", batch=64)  # read back from the cache: the same choice, the same line
    assert probed.calls == 1 and again.record["by"] == "cache" and again.runtime == choice.runtime
    assert again.record["bf16_onednn_ms"] == 1000 * onednn and again.line.startswith(choice.line.split(", measured")[0])


def test_without_a_small_map_bf16_is_measured_once(probed, loaded):
    probe.decide(loaded, cpu(), "auto", batch=64)  # the tiny model's maps: 32x32 and 16x16
    assert [name for name, *_ in probed.built] == ["fp32", "fp32_nchw", "bf16", "bf16_nchw"]


def test_the_cache_is_read_instead_of_measuring_and_reprobe_measures_again(probed, loaded):
    first = probe.decide(loaded, cpu(), "auto", batch=64)
    probed.seconds = {"fp32": 0.010, "bf16": 0.001}  # what a new measurement would say
    second = probe.decide(loaded, cpu(), "auto", batch=64, verb="predict")
    assert probed.calls == 1 and first.runtime.precision == second.runtime.precision == "fp32"
    assert (second.record["by"], second.record["fp32_ms"], second.record["bf16_ms"]) == ("cache", 10.0, 12.0)
    measured = second.record["measured"]
    assert second.line == (f"vggnet predict: precision auto: fp32 (fp32 10.0 ms, bf16 12.0 ms per batch of 64, cached "
                           f"in {probed.cache}, measured {measured}; --reprobe measures again)")
    third = probe.decide(loaded, cpu(), "auto", batch=64, reprobe=True)
    assert probed.calls == 2 and third.runtime.precision == "bf16" and third.record["by"] == "measured"
    fourth = probe.decide(loaded, cpu(), "auto", batch=64)
    assert probed.calls == 2 and fourth.runtime.precision == "bf16"  # the new measurement replaced the old one
    (entry,) = json.loads(probed.cache.read_text())["entries"].values()
    assert entry["key"]["kind"] == "inference" and entry["precision"] == "bf16"


def test_inference_and_training_decisions_share_the_cache_file_under_their_own_keys(probed, loaded):
    from vggnet.training import probe as training_probe

    key = probe.probe_key(loaded.model, (64, 1, 32, 32), 1)
    training_key = training_probe.probe_key(loaded.model, (64, 1, 32, 32), 1, "auto", "sgd")
    assert (key["kind"], training_key["kind"]) == ("inference", "training")
    assert key["layers"] and key["path"] == probe.INFERENCE_PATH and "optimizer" not in key
    assert key["input"] == [64, 1, 32, 32] and key["threads"] == 1 and key["channels_last"] == "auto"
    probe.decide(loaded, cpu(), "auto", batch=64)
    training_probe.write_cache(probed.cache, training_key, {"precision": "bf16", "fp32_ms": 1.0, "bf16_ms": 0.5})
    assert probe.decide(loaded, cpu(), "auto", batch=64).record["by"] == "cache" and probed.calls == 1
    assert len(json.loads(probed.cache.read_text())["entries"]) == 2


def test_another_batch_or_thread_count_is_measured_anew_and_the_runtimes_layout_is_not_a_key(probed, loaded):
    probe.decide(loaded, cpu(), "auto", batch=64)
    probe.decide(loaded, cpu(), "auto", batch=32)
    # both layouts are timed whatever the runtime held: its decision is the cached one
    assert probe.decide(loaded, resolve_runtime("cpu", "fp32", channels_last=False, threads=1), "auto",
                        batch=32).runtime.channels_last is True
    before = torch.get_num_threads()
    try:
        probe.decide(loaded, cpu(threads=2), "auto", batch=32)
    finally:
        torch.set_num_threads(before)
    assert probed.calls == 3 and len(json.loads(probed.cache.read_text())["entries"]) == 3


def test_a_runtime_that_follows_the_load_measures_at_the_thread_count_the_load_leaves(probed, loaded):
    settled = []

    class Busy:  # AdaptiveThreads on a machine where another process keeps one of two cores busy
        def settle(self):
            settled.append(torch.get_num_threads())
            torch.set_num_threads(1)
            return 1

    before = torch.get_num_threads()
    try:
        runtime = dataclasses.replace(cpu(threads=2), adaptive=Busy())
        choice = probe.decide(loaded, runtime, "auto", batch=8)
    finally:
        torch.set_num_threads(before)
    assert settled == [2] and probed.calls == 1 and choice.record["threads"] == 1
    (entry,) = json.loads(probed.cache.read_text())["entries"].values()
    assert entry["key"]["threads"] == 1


def test_the_batch_is_the_verbs_capped_by_the_images_and_the_probes_pixels(probed, loaded):
    assert probe.decide(loaded, cpu(), "auto").record["batch"] == 128  # eval's 256 at 32x32, capped at 128
    assert probe.decide(loaded, cpu(), "auto", images=3).record["batch"] == 3  # predict of 3 files
    assert [probe.probe_batch(b, 32) for b in (1, 128, 256)] == [1, 128, 128]
    assert [probe.probe_batch(b, 224) for b in (1, 16)] == [1, 2]


def test_a_cache_that_cannot_be_written_is_a_warning_and_the_line_names_no_cache(probed, loaded, tmp_path):
    (tmp_path / "a-file").write_text("")
    probed.cache = tmp_path / "a-file" / "probe.json"
    with pytest.warns(UserWarning, match="could not write the precision probe's cache"):
        choice = probe.decide(loaded, cpu(), "auto", batch=8)
    assert choice.runtime.precision == "fp32" and "cached" not in choice.line
    assert choice.line.startswith("vggnet eval: precision auto: fp32 (fp32 10.0 ms, bf16 12.0 ms per batch of 8, "
                                  "measured in ")


# ------------------------------------------------------------------------------------------------ what never probes
@pytest.mark.parametrize("requested", ["fp32", "bf16"])
def test_an_explicit_precision_never_probes(probed, loaded, requested):
    runtime = cpu("fp32")
    choice = probe.decide(loaded, runtime, requested)
    assert choice == probe.Choice(runtime, None, None) and probed.calls == 0 and not probed.cache.exists()
    with pytest.raises(Exception, match=f"--reprobe measures which precision 'auto' runs eval in, but --precision "
                                        f"{requested} was given"):
        probe.decide(loaded, runtime, requested, reprobe=True)


@pytest.mark.parametrize("nchw, chosen", [(0.009, "fp32_nchw"), (0.0096, "fp32")])
def test_a_cpu_without_native_bf16_times_fp32_in_both_layouts(probed, loaded, monkeypatch, nchw, chosen):
    monkeypatch.setattr(probe, "bf16_candidate", lambda device: False)
    probed.seconds = {"fp32": 0.010, "fp32_nchw": nchw}
    choice = probe.decide(loaded, cpu("fp32"), "auto", batch=64)
    assert [name for name, _ in probed.built] == ["fp32", "fp32_nchw"] and probed.calls == 1
    assert (choice.runtime.precision, choice.runtime.channels_last) == ("fp32", chosen == "fp32")
    assert (choice.record["precision"], choice.record["channels_last"]) == ("fp32", chosen == "fp32")
    assert choice.line.startswith(f"vggnet eval: precision auto: {probecache.label(chosen)} (fp32 10.0 ms, fp32 NCHW "
                                  f"{1000 * nchw:.1f} ms per batch of 64, measured in ")
    # its own key: the same CPU's decision with bf16 a candidate is another entry
    assert json.loads(probed.cache.read_text())["entries"].popitem()[1]["key"]["bf16"] is False


def test_a_gpu_takes_its_rule_without_probing(probed, loaded):
    gpu = Runtime(torch.device("cuda"), "fp16", True, 2)  # never touched: the rule needs no device
    choice = probe.decide(loaded, gpu, "auto")
    assert choice.runtime == gpu and choice.runtime.precision == "fp16" and choice.line is None
    assert choice.record == {"precision": "fp16", "by": "rule", "device": "cuda"}
    assert probed.calls == 0 and not probed.cache.exists()


# ------------------------------------------------------------------------------------------------ the verbs
def test_eval_auto_prints_the_choice_and_records_it(probed, cli, train_run, train_data_dir, tmp_path):
    code, out, err = cli(["eval", train_run["dir"], "--data-dir", train_data_dir, "--device", "cpu", "--threads", "1",
                          "--precision", "auto", "--json", "--out", tmp_path / "ev"])
    assert code == 0, err
    (line,) = err.strip().splitlines()
    assert line.startswith("vggnet eval: precision auto: fp32 (fp32 10.0 ms, bf16 12.0 ms per batch of 128, "
                           "measured in ")  # eval's batch at 32x32, 256, capped at the probe's 128
    printed = json.loads(out)
    written = json.loads((tmp_path / "ev" / "eval.json").read_text())
    for record in (printed, written):
        assert record["precision"] == "fp32"
        assert {k: record["precision_record"][k] for k in ("precision", "by", "fp32_ms", "bf16_ms", "batch")} == {
            "precision": "fp32", "by": "measured", "fp32_ms": 10.0, "bf16_ms": 12.0, "batch": 128}
    # --batch-size 16 is another key, measured anew
    code, out, err = cli(["eval", train_run["dir"], "--data-dir", train_data_dir, "--device", "cpu", "--threads", "1",
                          "--precision", "auto", "--batch-size", "16", "--json", "--out", tmp_path / "ev16"])
    assert code == 0 and probed.calls == 2 and "per batch of 16, measured in" in err
    assert json.loads(out)["precision_record"]["batch"] == 16


def test_eval_runs_in_nchw_where_the_probe_found_it_5_percent_faster(probed, cli, train_run, train_data_dir, tmp_path,
                                                                    monkeypatch):
    from vggnet.evaluation import metrics

    probed.seconds = {"fp32": 0.010, "fp32_nchw": 0.009, "bf16": 0.012, "bf16_nchw": 0.013}
    layouts = []
    real = metrics.inference_form
    monkeypatch.setattr(metrics, "inference_form", lambda model, device, precision, channels_last, *a, **k: (
        layouts.append(channels_last) or real(model, device, precision, channels_last, *a, **k)))
    code, out, err = cli(["eval", train_run["dir"], "--data-dir", train_data_dir, "--device", "cpu", "--threads", "1",
                          "--precision", "auto", "--json", "--out", tmp_path / "ev"])
    assert code == 0, err
    assert err.startswith("vggnet eval: precision auto: fp32 NCHW (fp32 10.0 ms, fp32 NCHW 9.0 ms, bf16 12.0 ms, "
                          "bf16 NCHW 13.0 ms per batch of 128, measured in ")
    assert json.loads(out)["precision_record"]["channels_last"] is False and layouts == [False]
    probed.seconds = {"fp32": 0.010, "fp32_nchw": 0.0096, "bf16": 0.012, "bf16_nchw": 0.013}  # within 5%
    code, out, err = cli(["eval", train_run["dir"], "--data-dir", train_data_dir, "--device", "cpu", "--threads", "1",
                          "--precision", "auto", "--reprobe", "--json", "--out", tmp_path / "ev2"])
    assert code == 0 and "precision auto: fp32 (" in err and layouts == [False, True]


def test_eval_with_an_explicit_precision_prints_no_line_and_records_none(probed, cli, train_run, train_data_dir,
                                                                         tmp_path, one_line_error):
    code, out, err = cli(["eval", train_run["dir"], "--data-dir", train_data_dir, "--device", "cpu", "--threads", "1",
                          "--json", "--out", tmp_path / "ev"])  # eval's default: fp32
    assert (code, err) == (0, "") and probed.calls == 0
    assert "precision_record" not in json.loads(out) and json.loads(out)["precision"] == "fp32"
    one_line_error(*cli(["eval", train_run["dir"], "--reprobe"])[::2],
                   "--reprobe measures which precision 'auto' runs eval in, but --precision fp32 was given")
    assert probed.calls == 0


def test_predict_auto_prints_the_choice_and_reprobe_measures_again(probed, cli, train_run, image_files,
                                                                  one_line_error, tmp_path):
    argv = ["predict", train_run["dir"], image_files["rgb"], image_files["jpeg"], "--device", "cpu", "--threads", "1",
            "--json"]
    code, out, err = cli(argv)  # predict's default: auto
    assert code == 0, err
    (line,) = err.strip().splitlines()
    assert line.startswith("vggnet predict: precision auto: fp32 (fp32 10.0 ms, bf16 12.0 ms per batch of 2, "
                           "measured in ")
    assert len(json.loads(out)) == 2
    code, _, err = cli(argv)
    assert code == 0 and probed.calls == 1 and "per batch of 2, cached in " in err
    code, _, err = cli(argv + ["--reprobe"])
    assert code == 0 and probed.calls == 2 and "measured in " in err
    one_line_error(*cli(argv + ["--precision", "fp32", "--reprobe"])[::2],
                   "--reprobe measures which precision 'auto' runs predict in, but --precision fp32 was given")
    code, _, err = cli(argv + ["--precision", "fp32"])
    assert (code, err) == (0, "") and probed.calls == 2
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    one_line_error(*cli(argv + [bad])[::2], "bad.png")  # an error stays the one line: no choice printed beside it


@pytest.mark.cpu_bf16
@pytest.mark.parametrize("small_maps", [True, False])
def test_the_chosen_bf16_variant_is_what_eval_multiscale_eval_and_predict_run(monkeypatch, train_run, train_data_dir,
                                                                            image_files, small_maps, tmp_path):
    """The runtime's small_map_convs (the probe's choice) reaches every inference copy the verbs build."""
    import shutil

    from vggnet.evaluation import metrics
    from vggnet.evaluation.multiscale import Protocol
    from vggnet.evaluation.source import evaluate_source
    from vggnet.use.predict import predict_files

    built = []
    real = metrics.optimize_for_inference

    def spy(model, precision, channels_last, **options):
        net = real(model, precision, channels_last, **options)
        built.append((precision, options.get("small_maps"), "small_map_gemm" in net.steps))
        return net

    monkeypatch.setattr(metrics, "optimize_for_inference", spy)
    runtime = dataclasses.replace(cpu("bf16"), small_map_convs=small_maps)
    run = shutil.copytree(train_run["dir"], tmp_path / "run")  # evaluations write into the run: a copy
    evaluate_source(run, runtime, data_dir=str(train_data_dir))
    evaluate_source(run, runtime, data_dir=str(train_data_dir), protocol=Protocol((32, 40), dense=True))
    predict_files(load(run), [image_files["rgb"]], runtime=runtime)
    assert built == [("bf16", small_maps, small_maps)] * 3


# ------------------------------------------------------------------------------------------------ the measurement
@pytest.mark.cpu_bf16
def test_the_probe_leaves_the_model_and_the_random_state_untouched(train_run_one_epoch):
    model = copy.deepcopy(train_run_one_epoch["model"]).train()
    before = (copy.deepcopy(model.state_dict()), torch.get_rng_state(), [type(m) for m in model.modules()])
    seconds = probe.measure_candidates(model, (8, 1, 32, 32), True)  # the real timer, in channels_last
    assert sorted(seconds) == ["bf16", "fp32"] and all(s > 0 for s in seconds.values())
    seconds = probe.measure_candidates(model, (8, 1, 4, 4))  # its second conv on 2x2 maps: the GEMM path's
    assert sorted(seconds) == ["bf16", "bf16_nchw", "bf16_onednn", "bf16_onednn_nchw", "fp32", "fp32_nchw"]
    assert all(s > 0 for s in seconds.values())
    state, rng, types_ = before
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # BN statistics included
    assert torch.equal(torch.get_rng_state(), rng) and [type(m) for m in model.modules()] == types_
    assert model.training


@pytest.mark.cpu_bf16
def test_the_candidates_run_what_evaluation_runs(train_run_one_epoch):
    """fp32: the model itself; bf16: the folded bf16 copy of optimize_for_inference, whose logits agree with fp32's
    to bf16 rounding."""
    model = copy.deepcopy(train_run_one_epoch["model"]).eval()
    outputs = {}
    for name, (precision, small_maps) in probecache.VARIANTS.items():
        net, _ = probe.inference_form(model, torch.device("cpu"), precision, True, small_maps=small_maps)
        outputs[name] = net
    assert outputs["fp32"] is model and outputs["bf16"].precision == outputs["bf16_onednn"].precision == "bf16"
    assert "fold_bn" in outputs["bf16"].steps or not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert "small_map_gemm" in outputs["bf16"].steps and "small_map_gemm" not in outputs["bf16_onednn"].steps
    x = torch.randn(8, 1, 4, 4)  # 2x2 maps after the first pool: the GEMM path against oneDNN
    with torch.no_grad():
        reference = model(x)
        for name in ("bf16", "bf16_onednn"):  # both bf16 forms compute the model, to bf16 rounding
            error = (outputs[name](x) - reference).norm() / reference.norm()
            assert error < 0.03, (name, error)
