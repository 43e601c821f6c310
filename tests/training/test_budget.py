"""--budget (issue 22, item 5): durations, the choice among measured recipes with injected speeds, the deadline with
an injected clock, the record in config.json and resume without probing again, the CLI's one-line errors."""

import json
import os
import signal
from dataclasses import replace

import pytest

from vggnet.base.errors import ConfigError
from vggnet.training import PRESETS, build_run, fit, loop, resolve_config
from vggnet.training import budget, deadline
from vggnet.training.budget import RECIPES, SHAPE_ORDER, Counts, Recipe, Speed, choose, predict, probe_shapes
from vggnet.training.config import format_duration, parse_duration

#: docs/RESULTS.md's CPU images/s per shape (2 threads of the AMD EPYC): a machine that trains at exactly these.
RESULTS_IMAGES_S = dict(zip(SHAPE_ORDER, (1895, 1239, 995, 799, 587, 506, 400, 295)))
#: A whole Fashion-MNIST epoch at batch 256 (234 batches), its test set scored each epoch.
FULL = Counts(trained=59904, evaluated=10000, test=10000)


def machine(factor=1.0):
    """Speeds ``factor`` times those of RESULTS_IMAGES_S (evaluation 3x faster than training)."""
    return {shape: Speed(1 / (ips * factor), 1 / (3 * ips * factor), "fp32") for shape, ips in RESULTS_IMAGES_S.items()}


# ------------------------------------------------------------------------------------------------ durations
@pytest.mark.parametrize("text, seconds, shown", [("90s", 90, "1m30s"), ("10m", 600, "10m"), ("1h", 3600, "1h"),
                                                  ("1h30m", 5400, "1h30m"), ("1.5h", 5400, "1h30m"),
                                                  (" 2M ", 120, "2m"), ("1h0m5s", 3605, "1h5s")])
def test_durations_parse_to_seconds_and_print_back(text, seconds, shown):
    assert parse_duration(text) == seconds
    assert format_duration(parse_duration(text)) == shown


@pytest.mark.parametrize("text, fragment", [("600", "takes a duration such as 90s"), ("10x", "got '10x'"),
                                            ("", "got ''"), ("1m1h", "got '1m1h'"), ("m", "got 'm'"),
                                            ("0s", "give from 1s to 720h"), ("1000h", "give from 1s to 720h")])
def test_a_bad_duration_is_a_config_error_naming_it(text, fragment):
    with pytest.raises(ConfigError, match="--budget") as err:
        parse_duration(text)
    assert fragment in str(err.value) and "\n" not in str(err.value)


# ----------------------------------------------------------------------------------------------- the choice
def test_the_prediction_is_epochs_of_training_evaluation_and_saving_plus_the_tta_pass():
    speed, counts = Speed(0.001, 0.0005, "fp32"), Counts(1000, 200, 100)
    with_tta = Recipe("vgg11_bn", 0.25, 10, 93.0, "x")
    assert predict(with_tta, speed, counts) == pytest.approx(10 * (1.0 + 0.1 + budget.SAVE_SECONDS) + 2 * 100 * 0.0005)
    assert predict(replace(with_tta, tta=None), speed, counts) == pytest.approx(10 * (1.1 + budget.SAVE_SECONDS))


def test_the_batch_preparation_is_priced_at_the_recipes_erasing():
    speed = Speed(0.001, 0.0005, "fp32")
    counts = Counts(1000, 200, 100, prepare=((0.0, 0.0001), (0.3, 0.0002)))
    erasing, plain = (Recipe("vgg11_bn", 0.25, 10, 93.0, "x", tta=None, erasing=e) for e in (0.3, 0.0))
    base = 10 * (1.1 + budget.SAVE_SECONDS)
    assert predict(erasing, speed, counts) == pytest.approx(base + 10 * 1000 * 0.0002)
    assert predict(plain, speed, counts) == pytest.approx(base + 10 * 1000 * 0.0001)
    assert predict(erasing, speed, Counts(1000, 200, 100)) == pytest.approx(base)  # not measured: free
    assert budget.ERASINGS == (0.0, 0.3)  # the recipes' own: the default recipe's 0 and the sweep's 0.3


@pytest.mark.parametrize("factor, seconds, expected", [
    (1.0, 3600, ("vgg13_bn", 0.25, 38)),  # RESULTS' CPU: today's quarter-width VGG-13-BN
    (4.0, 3600, ("vgg13_bn", 0.375, 33)),  # a 4x faster CPU: the wider network the hour affords
    (40.0, 3600, ("vgg16_bn", 0.5, 60)),  # a GPU: the most accurate recipe measured
    (1.0, 600, ("vgg11_bn", 0.25, 15)),  # ten minutes: the default recipe
    (1.8, 600, ("vgg11_bn", 0.25, 25)),  # ten minutes, a little faster: the finer steps RESULTS measured on the CPU
    (2.0, 600, ("vgg13_bn", 0.25, 18)),
])
def test_a_faster_machine_gets_a_wider_recipe_and_a_slower_one_the_cheap_one(factor, seconds, expected):
    choice = choose(RECIPES, machine(factor), FULL, seconds, spent=10.0)
    assert (choice.recipe.model, choice.recipe.width, choice.recipe.epochs) == expected
    assert choice.cut_from is None and choice.recipe in RECIPES


def test_the_default_recipe_and_the_hour_avx2_preset_are_candidates_citing_results():
    default, hour = resolve_config(), resolve_config("hour_avx2")
    for config, top1 in ((default, 93.1), (hour, 94.74)):
        match = [r for r in RECIPES if (r.model, r.width, r.epochs, r.erasing, r.tta) ==
                 (config.model, config.width, config.epochs, config.erasing, config.tta)]
        assert [r.top1 for r in match] == [top1] and "docs/RESULTS.md" in match[0].source


def two_recipes():
    """One shape, 3.5 s per epoch (2 images at 0.5 s, 4 evaluated at 0.25 s, 1.5 s saving): A 7 s, B 15 s."""
    a = Recipe("vgg11_bn", 0.25, 2, 93.0, "a", tta=None)
    b = Recipe("vgg11_bn", 0.25, 4, 94.0, "b")
    return (a, b), {("vgg11_bn", 0.25): Speed(0.5, 0.25, "fp32")}, Counts(2, 4, 2)


def test_a_recipe_ending_exactly_at_the_margin_fits_and_a_moment_later_it_does_not(monkeypatch):
    monkeypatch.setattr(budget, "MARGIN", 0.5)  # exact arithmetic: 0.5 x 36 - 3 = 15
    recipes, speeds, counts = two_recipes()
    assert [predict(r, speeds[r.shape], counts) for r in recipes] == [7.0, 15.0]
    assert choose(recipes, speeds, counts, 36, spent=3.0).recipe.top1 == 94.0
    late = choose(recipes, speeds, counts, 36, spent=3.001)
    assert late.recipe.top1 == 93.0 and [row.fits for row in late.rows] == [True, False]


def test_of_two_equally_accurate_recipes_the_quicker_is_chosen():
    recipes, speeds, counts = two_recipes()
    equal = (recipes[0], replace(recipes[1], top1=93.0))
    assert choose(equal, speeds, counts, 1000, spent=0).recipe.epochs == 2


def test_when_nothing_fits_the_cheapest_recipe_is_cut_to_the_epochs_that_fit(monkeypatch):
    monkeypatch.setattr(budget, "MARGIN", 0.5)
    recipes, speeds, counts = two_recipes()
    choice = choose(recipes, speeds, counts, 14, spent=0.0)  # 7 s: A's 2 epochs fit exactly
    assert (choice.recipe.epochs, choice.cut_from) == (2, None)
    cut = choose(recipes, speeds, counts, 13.98, spent=0.0)  # 6.99 s: one epoch of 3.5 s
    assert (cut.recipe.epochs, cut.cut_from, cut.recipe.top1, cut.predicted) == (1, 2, None, 3.5)
    assert "cut from 2 epochs" in cut.recipe.source


def test_a_budget_that_fits_no_epoch_names_the_least_that_would():
    with pytest.raises(ConfigError) as err:
        choose(RECIPES, machine(), FULL, 30, spent=5.0)  # an epoch of the default recipe: ~38 s here
    message = str(err.value)
    assert message.startswith("--budget 30s does not fit one epoch of the cheapest recipe (VGG-11-BN x0.25: 0.6 min")
    assert message.endswith("give at least --budget 1m") and "\n" not in message


def test_the_probe_skips_shapes_that_cannot_fit_or_cannot_win():
    probed = []

    def measure(shape):
        probed.append(shape)
        return machine()[shape]

    speeds = probe_shapes(RECIPES, FULL, 3600, measure, spent=lambda: 0.0)
    # Once VGG-13 x0.25's 94.81% fits, VGG-16 x0.25 (94.72% at best), VGG-19 x0.25, VGG-16 x0.375 and VGG-13 x0.5
    # cannot beat it; VGG-13 x0.375 (94.96%) might and is measured (56 min: it does not fit); VGG-16 x0.5's recipes
    # that would beat 94.81% (30 and 60 epochs) cannot fit even at VGG-13 x0.375's speed, and its 16 epochs fit but
    # do not beat it.
    assert probed == [("vgg11_bn", 0.25), ("vgg13_bn", 0.25), ("vgg13_bn", 0.375)]
    assert speeds[("vgg19_bn", 0.25)] == replace(machine()[("vgg13_bn", 0.25)], measured=False)
    assert speeds[("vgg16_bn", 0.5)] == replace(machine()[("vgg13_bn", 0.375)], measured=False)
    assert choose(RECIPES, speeds, FULL, 3600, 0.0).recipe == choose(RECIPES, machine(), FULL, 3600, 0.0).recipe
    probed.clear()
    speeds = probe_shapes(RECIPES, FULL, 600, measure, spent=lambda: 0.0)
    assert probed == [("vgg11_bn", 0.25)]  # no other shape's recipe can end within 9 minutes at VGG-11's speed
    assert not any(s.measured for shape, s in speeds.items() if shape != ("vgg11_bn", 0.25))


def test_preset_hour_is_a_60_minute_budget_and_hour_avx2_the_fixed_recipe():
    hour = resolve_config("hour")
    assert hour.budget == 3600 and hour.budget_record is None
    assert {k: v for k, v in hour.to_dict().items() if k not in ("budget", "preset")} == \
        {k: v for k, v in resolve_config().to_dict().items() if k not in ("budget", "preset")}
    assert PRESETS["hour_avx2"]["epochs"] == 34 and resolve_config("hour_avx2").budget is None


@pytest.mark.parametrize("preset, options, fragment", [
    (None, dict(budget=600.0, epochs=3), "--budget 10m chooses the model and the epochs itself"),
    ("hour", dict(model="vgg16_bn"), "--preset hour (--budget 1h) chooses"),
    (None, dict(budget=600.0, width=0.5, tta="flip"), "so --width, --tta cannot be given"),
    ("paper", dict(budget=60.0), "not --preset paper's training"),
    ("hour", dict(budget=60.0), "--preset hour is --budget 1h and --budget 1m was given too"),
])
def test_a_budget_beside_what_it_chooses_is_a_config_error(preset, options, fragment):
    with pytest.raises(ConfigError, match=r"^[^\n]*$") as err:
        resolve_config(preset, **options)
    assert fragment in str(err.value)


# --------------------------------------------------------------------------------------------- the deadline
class FakeTime:
    """A clock that moves only when an epoch's training ends: ``seconds`` per epoch."""

    def __init__(self, monkeypatch, seconds):
        self.now = 0.0
        monkeypatch.setattr(deadline, "wall_clock", lambda: self.now)
        original = loop.train_epoch

        def train_epoch(*args, **kwargs):
            original(*args, **kwargs)
            self.now += seconds

        monkeypatch.setattr(loop, "train_epoch", train_epoch)


def test_the_deadline_stops_after_the_last_epoch_that_fits_and_ends_the_run_normally(tmp_path, train_options,
                                                                                      monkeypatch, capsys):
    FakeTime(monkeypatch, 100.0)
    config = replace(resolve_config(**train_options(epochs=5, tta="flip", out=str(tmp_path / "run"))), budget=350.0)
    result = fit(build_run(config))
    # after epoch 3 (300 s) the next would end at 400 s, past 350 s: epoch 3 is the last, with its TTA score
    assert result["epochs"] == 3 and result["stopped_by_budget"] is True
    assert [r["budget_seconds"] for r in result["history"]] == [100.0, 200.0, 300.0]
    assert ["test_acc_tta" in r for r in result["history"]] == [False, False, True]
    assert result["test_acc_tta"] == result["history"][-1]["test_acc_tta"]
    err = capsys.readouterr().err
    assert "--budget 5m50s: stopping after epoch 3 of 5: the next one would end at 6.7 min" in err
    run_dir = tmp_path / "run"
    assert json.loads((run_dir / "config.json").read_text())["epochs"] == 5  # the plan stays on record
    assert (run_dir / "curves.png").exists() and (run_dir / "model.safetensors").exists()
    assert json.loads((run_dir / "model.json").read_text())["metrics"]["epoch"] == 3


def test_a_resumed_run_counts_the_budget_its_earlier_sessions_used(tmp_path, train_options, monkeypatch, train_cli,
                                                                    one_line_error):
    FakeTime(monkeypatch, 100.0)
    config = replace(resolve_config(**train_options(epochs=5, out=str(tmp_path / "run"))), budget=350.0)
    assert fit(build_run(config))["epochs"] == 3
    code, out, err = train_cli(["train", "--resume", tmp_path / "run"])
    one_line_error(code, err, "has used 5.0 min of its --budget 5m50s and an epoch takes 100 s there",
                   "start a new run to train longer")


def test_without_a_budget_the_slow_clock_changes_nothing(tmp_path, train_options, monkeypatch):
    FakeTime(monkeypatch, 100.0)
    result = fit(build_run(resolve_config(**train_options(epochs=3, out=str(tmp_path / "run")))))
    assert result["epochs"] == 3 and "stopped_by_budget" not in result
    assert not any("budget_seconds" in r for r in result["history"])


# ----------------------------------------------------------------------------------------- plan and record
def budget_argv(train_data_dir, run_dir, *extra):
    return ["train", "--budget", "10m", "--data-dir", train_data_dir, "--batch-size", "32", "--no-progress",
            "--threads", "1", "--device", "cpu", "--out", run_dir, *extra]


def slow_machine(monkeypatch, calls):
    """measure_shape replaced: 1.5 s per trained and 0.1 s per evaluated image (an epoch of the tiny run: 199.9 s),
    so 10 minutes fit 2 epochs of the default recipe."""

    def measure(config, train_set, runtime, shape, reprobe=False):
        calls.append(shape)
        return Speed(1.5, 0.1, "fp32", True, (("fp32_ms", 48000.0),))

    monkeypatch.setattr(budget, "measure_shape", measure)
    monkeypatch.setattr(budget, "prepare_seconds", lambda *args: ())  # free: the predictions below are exact


def test_the_choice_is_printed_recorded_and_resumed_without_probing_again(tmp_path, train_data_dir, monkeypatch,
                                                                          train_cli):
    calls, run_dir = [], tmp_path / "run"
    slow_machine(monkeypatch, calls)
    original, steps = loop.train_step, []

    def step_then_signal(run, images, labels, lr):  # SIGTERM at epoch 2, batch 1 of 4
        out = original(run, images, labels, lr)
        steps.append(1)
        if len(steps) == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(loop, "train_step", step_then_signal)
    code, out, err = train_cli(budget_argv(train_data_dir, run_dir))
    assert code == 128 + signal.SIGTERM and calls == [("vgg11_bn", 0.25)]  # no other shape can fit
    assert "vggnet train: --budget 10m -> VGG-11-BN x0.25, 2 epochs: no measured recipe fits, so the cheapest one " \
           "with its 15 epochs cut to 2" in err
    assert "  VGG-11-BN    0.25      15    50.0 min  93.10%           no" in err
    assert "the default recipe's --batch-size, --subset" not in err and "--batch-size" in err.splitlines()[-2]
    saved = json.loads((run_dir / "config.json").read_text())
    record = saved["budget_record"]
    assert (saved["model"], saved["width"], saved["epochs"], saved["precision"], saved["budget"]) == \
        ("vgg11_bn", 0.25, 2, "fp32", 600.0)
    assert record["chosen"]["cut_from"] == 15 and record["images"] == {"trained": 128, "evaluated": 64, "test": 64}
    assert record["chosen"]["predicted_s"] == round(2 * (128 * 1.5 + 64 * 0.1 + budget.SAVE_SECONDS), 1)
    assert record["speeds"][0] == {"model": "vgg11_bn", "width": 0.25, "train_images_s": 0.7, "eval_images_s": 10.0,
                                   "precision": "fp32", "measured": True, "fp32_ms": 48000.0}

    monkeypatch.setattr(loop, "train_step", original)
    monkeypatch.setattr(budget, "measure_shape", lambda *a: pytest.fail("a resumed run must not probe"))
    code, out, err = train_cli(["train", "--resume", run_dir])
    assert code == 0, err
    assert "after 2 epochs" in out and "--budget" not in err
    resumed = json.loads((run_dir / "config.json").read_text())
    assert resumed["budget_record"] == record
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in history] == [1, 2] and all(r["budget_seconds"] > 0 for r in history)


def test_the_cli_refuses_what_a_budget_cannot_do_in_one_line(tmp_path, train_data_dir, monkeypatch, train_cli,
                                                             one_line_error):
    slow_machine(monkeypatch, [])
    argv = budget_argv(train_data_dir, tmp_path / "run")
    code, _, err = train_cli(argv[:2] + ["10x"] + argv[3:])
    one_line_error(code, err, "argument --budget: takes a duration such as 90s, 10m, 1h or 1h30m, got '10x'")
    code, _, err = train_cli(argv + ["--epochs", "3"])
    one_line_error(code, err, "--budget 10m chooses the model and the epochs itself", "leave out --epochs")
    code, _, err = train_cli(argv[:1] + ["--preset", "hour", "--model", "vgg16_bn"] + argv[3:])
    one_line_error(code, err, "--preset hour (--budget 1h) chooses", "--model cannot be given")
    code, _, err = train_cli(argv + ["--dataset", "cifar10"])
    one_line_error(code, err, "--budget 10m chooses by accuracies measured on Fashion-MNIST", "none on cifar10")
    code, _, err = train_cli(argv[:2] + ["3m"] + argv[3:])  # an epoch takes 199.9 s here, over 90% of 3 minutes
    one_line_error(code, err, "--budget 3m does not fit one epoch of the cheapest recipe", "give at least --budget 4m")
    assert not (tmp_path / "run").exists()
    code, _, err = train_cli(["train", "--resume", tmp_path / "run", "--budget", "1h"])
    one_line_error(code, err, "--budget cannot change it")
