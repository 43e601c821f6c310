"""The training API: configuration resolution, the loop, the run directory, determinism, resume, divergence."""

import csv
import dataclasses
import json
import math
import os
import shutil
import signal
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vggnet
from vggnet.store import card as card_module
from vggnet.store import rundir
from vggnet.data import DATASETS
from vggnet.base.errors import CheckpointError, ConfigError, OutputError, VggnetError
from vggnet.base.files import load_tensors, read_metadata, read_safetensors, save_tensors
from vggnet.store.card import CARD_KEY
from vggnet.store.checkpoint import CHECKPOINT_KEY
from vggnet.store.rundir import load
from vggnet.base.schedule import Plateau, lr_factor
from vggnet.training import (PRESETS, TrainConfig, TrainingDiverged, build_run, loop, resolve_config, resume,
                             seed_epoch, train, train_step)

TIMING = ("epoch_seconds", "train_images_per_second")
# Without a validation split there is no best checkpoint (the test set selects nothing).
RUN_FILES = {"config.json", "confusion.png", "curves.png", "eval.json", "metrics.csv", "metrics.jsonl", "model.json",
             "model.safetensors", "state.json", "state.safetensors"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def without_timing(history):
    """Epoch records without the wall-clock fields (the only ones allowed to differ between equal runs)."""
    return [{k: v for k, v in record.items() if k not in TIMING} for record in history]


def read_history(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_tensors(a, b):
    assert sorted(a) == sorted(b)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert different == []


def count_bn(model):
    return sum(isinstance(layer, torch.nn.BatchNorm2d) for layer in model.modules())


# ------------------------------------------------------------------------------------------------ configuration
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_values_override_the_defaults(name):
    expected = TrainConfig.from_dict({**TrainConfig().to_dict(), **PRESETS[name], "preset": name}).complete()
    assert resolve_config(name).to_dict() == expected.to_dict()


def test_no_preset_is_the_fast_preset():
    assert resolve_config() == resolve_config("fast")
    assert resolve_config().preset == "fast"


def test_explicit_options_override_the_preset_and_none_does_not():
    paper = PRESETS["paper"]
    config = resolve_config("paper", lr=0.123, epochs=3, dropout=None, momentum=None, width=0.75)
    assert (config.lr, config.epochs, config.width) == (0.123, 3, 0.75)
    assert config.dropout == paper["dropout"] and config.momentum == paper["momentum"]  # None: preset kept
    assert config.head == paper["head"] and config.schedule == paper["schedule"]
    assert config.init == TrainConfig().init  # not in the preset: the default


def test_unknown_preset_names_it_and_the_choices():
    with pytest.raises(ConfigError) as err:
        resolve_config("nosuch")
    assert "'nosuch'" in str(err.value) and all(name in str(err.value) for name in PRESETS)


def test_unknown_option_is_a_config_error_naming_it():
    with pytest.raises(ConfigError, match="lrate"):
        resolve_config(lrate=0.1)
    with pytest.raises(ConfigError, match="lrate"):
        TrainConfig.from_dict({**TrainConfig().to_dict(), "lrate": 0.1})


def test_train_takes_a_config_or_options_not_both():
    with pytest.raises(ConfigError, match="not both"):
        train(TrainConfig(), lr=0.1)


@pytest.mark.parametrize("option, value, flag", [
    ("epochs", 0, "--epochs"),
    ("batch_size", 0, "--batch-size"),
    ("lr", 0.0, "--lr"),
    ("lr", -1.0, "--lr"),
    ("lr", float("nan"), "--lr"),
    ("lr", float("inf"), "--lr"),
    ("image_size", 0, "--image-size"),
    ("subset", 0, "--subset"),
    ("label_smoothing", 1.0, "--label-smoothing"),
    ("label_smoothing", -0.1, "--label-smoothing"),
    ("grad_clip", 0.0, "--grad-clip"),
    ("weight_decay", -1e-4, "--weight-decay"),
    ("warmup_epochs", -1.0, "--warmup-epochs"),
    ("eval_batch_size", 0, "eval_batch_size"),
    ("head", "nosuch", "--head"),
    ("optimizer", "rmsprop", "--optimizer"),
    ("schedule", "linear", "--schedule"),
    ("normalize", "zca", "--normalize"),
    ("precision", "fp8", "--precision"),
])
def test_validate_rejects_out_of_range_values_naming_the_option(option, value, flag):
    config = TrainConfig(**{option: value})
    with pytest.raises(ConfigError) as err:
        config.validate()
    assert flag in str(err.value)
    with pytest.raises(ConfigError):
        resolve_config(**{option: value})


def test_validate_accepts_the_boundaries():
    TrainConfig(label_smoothing=0.0, weight_decay=0.0, warmup_epochs=0.0, subset=1, grad_clip=None, epochs=1,
                batch_size=1, eval_batch_size=1).validate()


def test_batch_norm_option_builds_batch_norm_layers(train_options):
    from vggnet.training.build import build_model

    dataset = types.SimpleNamespace(classes=list("abc"), images=torch.zeros(1, 1, 28, 28, dtype=torch.uint8))
    plain = build_model(resolve_config(**train_options()), dataset)
    with_bn = build_model(resolve_config(**train_options(batch_norm=True)), dataset)
    assert (count_bn(plain), count_bn(with_bn)) == (0, 2)
    assert with_bn.config["batch_norm"] is True
    assert count_bn(build_model(resolve_config(model="vgg11_bn", width=0.0625, image_size=32), dataset)) == 8


# ------------------------------------------------------------------------------------------------ schedules
@pytest.mark.parametrize("schedule, step, total, warmup, expected", [
    ("onecycle", 0, 100, 0, 1 / 30),  # no warmup given: 30% of training
    ("onecycle", 29, 100, 0, 1.0),
    ("onecycle", 65, 100, 0, 0.5),
    ("onecycle", 100, 100, 0, 0.0),
    ("cosine", 4, 100, 10, 0.5),
    ("cosine", 10, 100, 10, 1.0),
    ("cosine", 55, 100, 10, 0.5),
    ("cosine", 100, 100, 10, 0.0),
    ("step", 49, 100, 0, 1.0),
    ("step", 50, 100, 0, 0.1),
    ("step", 75, 100, 0, 0.01),
    ("plateau", 80, 100, 0, 1.0),
])
def test_lr_factor_hand_values(schedule, step, total, warmup, expected):
    assert lr_factor(schedule, step, total, warmup) == pytest.approx(expected, abs=1e-12)


def test_plateau_divides_after_patience_epochs_without_improvement():
    plateau = Plateau(patience=2)
    scales = []
    for accuracy in (0.5, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6):
        plateau.update(accuracy)
        scales.append(plateau.scale)
    assert scales == pytest.approx([1, 1, 1, 1, 0.1, 0.1, 0.1, 0.01])


def test_the_plateau_schedule_uses_the_configured_patience(tmp_path, train_options):
    config = resolve_config(**train_options(schedule="plateau", plateau_patience=5, val_split=32, epochs=1,
                                            out=str(tmp_path / "run")))
    train(config)
    plateau = json.loads((tmp_path / "run" / "state.json").read_text())["run"]["plateau"]
    expected = Plateau(patience=5)
    expected.update(plateau["best"])  # the one epoch's validation accuracy
    assert plateau == expected.to_dict()


# ------------------------------------------------------------------------------------------------ the loop
def test_a_few_steps_lower_the_loss_on_a_fixed_batch(tmp_path, train_options):
    config = resolve_config(**train_options(flip=False, crop_padding=0, dropout=0.0, out=str(tmp_path / "run")))
    run = build_run(config)
    images, labels = run.train_set.images[:32], run.train_set.labels[:32]

    def loss_now():
        with torch.no_grad():
            return F.cross_entropy(run.model(run.preprocess(images)), labels).item()

    before = loss_now()
    seed_epoch(run, 0)
    run.net.train()
    first, _ = train_step(run, images, labels, config.lr)
    assert first.item() == pytest.approx(before, abs=1e-5)  # the step's loss is the batch's cross-entropy
    for _ in range(9):
        train_step(run, images, labels, config.lr)
    after = loss_now()
    assert after < before - 0.05, (before, after)


def test_run_directory_contents(train_run, train_data_dir):
    run_dir, config, result = train_run["dir"], train_run["config"], train_run["result"]
    assert {p.name for p in run_dir.iterdir()} == RUN_FILES  # nothing else: no .NAME.*.tmp left behind

    # What the run recorded: the resolved configuration (never changed) plus what the built run derived from it.
    recorded = dataclasses.replace(config, schedule_epochs=config.epochs)
    assert config.schedule_epochs is None
    assert json.loads((run_dir / "config.json").read_text()) == recorded.to_dict()
    assert TrainConfig.from_dict(json.loads((run_dir / "config.json").read_text())) == recorded
    assert config.out == str(run_dir)

    history = read_history(run_dir)
    assert history == result["history"]
    assert [r["epoch"] for r in history] == [1, 2] and [r["step"] for r in history] == [4, 8]
    for record in history:
        assert {"epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "epoch_seconds",
                "train_images_per_second"} <= set(record)
        assert 0 <= record["train_acc"] <= 1 and 0 <= record["test_acc"] <= record["test_top5"] <= 1
        assert (record["train_acc"] * 128).is_integer() and (record["test_acc"] * 64).is_integer()  # counts / n
        assert record["lr"] == 0.05  # constant schedule
        assert math.isfinite(record["train_loss"]) and math.isfinite(record["test_loss"])
        assert record["epoch_seconds"] > 0
        assert record["train_images_per_second"] == pytest.approx(128 / record["epoch_seconds"])

    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [list(row) for row in rows] == [list(record) for record in history]
    assert [{k: float(v) for k, v in row.items()} for row in rows] == history  # the same numbers, exactly

    for name in ("curves.png", "confusion.png"):
        data = (run_dir / name).read_bytes()
        assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR" and data[-8:-4] == b"IEND"

    eval_json = json.loads((run_dir / "eval.json").read_text())
    assert eval_json["n"] == 64 and eval_json["top1"] == history[-1]["test_acc"]
    assert sum(eval_json["confusion"][i][i] for i in range(10)) / 64 == history[-1]["test_acc"]

    meta = json.loads((run_dir / "model.json").read_text())
    assert meta["format"] == card_module.FORMAT and meta["vggnet_version"] == vggnet.__version__
    assert meta["model"] == {"name": "custom", "arch": [8, "M", 16, "M"], "batch_norm": False, "num_classes": 10,
                             "in_channels": 1, "dropout": 0.1, "width": 1.0, "head": "gap", "input_size": [32, 32],
                             "hidden": 4096, "init": config.init}
    assert meta["classes"] == DATASETS["fashion-mnist"]["classes"]
    assert meta["dataset"] == "fashion-mnist" and meta["image_size"] == 32 and meta["train_config"] == recorded.to_dict()
    assert meta["metrics"] == {"test_acc": history[-1]["test_acc"], "test_top5": history[-1]["test_top5"],
                               "test_loss": history[-1]["test_loss"], "epoch": 2}
    # The preprocessing is the training set's own statistics, by hand: population mean and std of pixels / 255.
    train_images = _train_images(train_data_dir).numpy().astype(np.float64) / 255
    assert meta["preprocess"]["image_size"] == 32 and meta["preprocess"]["in_size"] == 28
    assert meta["preprocess"]["mean"] == pytest.approx([train_images.mean()], abs=1e-9)
    assert meta["preprocess"]["std"] == pytest.approx([train_images.std()], abs=1e-9)

    model = load_tensors(run_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match="--val-split"):
        load(run_dir, "best")  # no validation split: no best weights

    state = json.loads((run_dir / "state.json").read_text())
    assert {k: state["run"][k] for k in ("epoch", "batch", "step", "seen", "correct")} == \
        {"epoch": 2, "batch": 0, "step": 8, "seen": 0, "correct": 0}
    assert state["run"]["best_acc"] == -1.0  # nothing selected by the test set
    assert state["history"] == history
    tensors = load_tensors(run_dir / "state.safetensors")
    assert {"rng/torch", "rng/augment"} <= set(tensors)
    assert_same_tensors({k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}, model)
    momentum = [k for k in tensors if k.startswith("optimizer/") and k.endswith("/momentum_buffer")]
    assert len(momentum) == len(model) == 6  # one buffer per parameter (2 convs + 1 linear, no BN buffers)

    assert result["run_dir"] == str(run_dir) and result["epochs"] == 2
    assert result["test_acc"] == history[-1]["test_acc"] and "best_val_acc" not in result


def _train_images(directory):
    from vggnet.data import load_fashion_mnist

    train_set, _ = load_fashion_mnist(directory)
    return train_set.images


def test_training_refuses_to_overwrite_a_run(train_run):
    before = (train_run["dir"] / "state.json").read_bytes()
    with pytest.raises(OutputError, match="--resume"):
        train(dataclasses.replace(train_run["config"]))
    assert (train_run["dir"] / "state.json").read_bytes() == before


def test_resume_needs_a_run_directory_with_state(tmp_path):
    with pytest.raises(CheckpointError, match="not a vggnet run directory"):
        resume(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(TrainConfig().to_dict()))
    with pytest.raises(CheckpointError, match="state.json"):
        resume(tmp_path)


# ------------------------------------------------------------------------------------------------ determinism
def test_same_seed_same_run_different_seed_different_run(tmp_path, train_options, train_run_one_epoch, train_run):
    reference = train_run_one_epoch["dir"]
    again = train(**train_options(epochs=1, out=str(tmp_path / "same")))
    other = train(**train_options(epochs=1, seed=1, out=str(tmp_path / "other")))

    assert without_timing(again["history"]) == without_timing(read_history(reference))
    # The same weights (the files' bytes differ only in the embedded card, which names each run's folder).
    assert_same_tensors(load_tensors(tmp_path / "same" / "model.safetensors"),
                        load_tensors(reference / "model.safetensors"))
    assert_same_tensors(load_tensors(tmp_path / "same" / "state.safetensors"),
                        load_tensors(reference / "state.safetensors"))
    # The constant schedule does not depend on the number of epochs: run A's first epoch is this run too.
    assert without_timing(read_history(train_run["dir"]))[0] == without_timing(again["history"])[0]

    first = load_tensors(reference / "model.safetensors")
    changed = load_tensors(tmp_path / "other" / "model.safetensors")
    assert all(not torch.equal(first[k], changed[k]) for k in first)
    assert other["history"][0]["train_loss"] != again["history"][0]["train_loss"]


def test_resume_to_more_epochs_equals_training_straight_through(tmp_path, train_run_one_epoch, train_run):
    run_b = tmp_path / "run-b"
    shutil.copytree(train_run_one_epoch["dir"], run_b)
    result = resume(run_b, epochs=2)
    assert json.loads((run_b / "config.json").read_text())["epochs"] == 2
    assert_same_tensors(load_tensors(run_b / "model.safetensors"), load_tensors(train_run["dir"] / "model.safetensors"))
    assert without_timing(result["history"]) == without_timing(train_run["result"]["history"])
    assert without_timing(read_history(run_b)) == without_timing(read_history(train_run["dir"]))
    state_b = load_tensors(run_b / "state.safetensors")
    state_a = load_tensors(train_run["dir"] / "state.safetensors")
    assert_same_tensors({k: v for k, v in state_b.items() if k.startswith("optimizer/")},
                        {k: v for k, v in state_a.items() if k.startswith("optimizer/")})


def sigterm_after_step(monkeypatch, n):
    """Make the loop's n-th train_step send SIGTERM to this process (through the real handler the loop installed);
    returns the real train_step, to put back before resuming."""
    original, steps = loop.train_step, []

    def step_then_signal(run, images, labels, lr):
        out = original(run, images, labels, lr)
        steps.append(1)
        if len(steps) == n:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(loop, "train_step", step_then_signal)
    return original


def test_sigterm_mid_epoch_saves_state_and_resume_finishes_identically(tmp_path, train_cli, train_cli_args,
                                                                       train_run, monkeypatch):
    """The signal lands after step 6 (epoch 2, batch 2 of 4): RNG and batch position must be restored exactly."""
    run_dir = tmp_path / "run"
    original = sigterm_after_step(monkeypatch, 6)
    code, out, err = train_cli(train_cli_args("--out", run_dir))
    assert code == 128 + signal.SIGTERM
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "SIGTERM" in err and "epoch 2, batch 2/4" in err and f"--resume {run_dir}" in err
    state = json.loads((run_dir / "state.json").read_text())
    assert {k: state["run"][k] for k in ("epoch", "batch", "step", "seen")} == \
        {"epoch": 1, "batch": 2, "step": 6, "seen": 64}
    assert len(read_history(run_dir)) == 1
    assert load(run_dir).card.metrics.epoch == 1  # the epoch-1 checkpoint is intact
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".")]

    monkeypatch.setattr(loop, "train_step", original)
    code, out, err = train_cli(["train", "--resume", run_dir])
    assert code == 0, err
    assert_same_tensors(load_tensors(run_dir / "model.safetensors"),
                        load_tensors(train_run["dir"] / "model.safetensors"))
    assert without_timing(read_history(run_dir)) == without_timing(read_history(train_run["dir"]))
    # The CLI's flags gave exactly run A's configuration (--arch stays the string the user typed).
    config = json.loads((run_dir / "config.json").read_text())
    assert {**config, "out": None, "arch": None} == {**train_run["config"].to_dict(), "out": None, "arch": None,
                                                     "schedule_epochs": train_run["config"].epochs}
    assert config["arch"] == "8,M,16,M" and load(run_dir).card.model.arch == [8, "M", 16, "M"]


# ------------------------------------------------------------------------------------------------ strict JSON
def strict_json(text):
    """``json.loads`` refusing NaN, Infinity and -Infinity, as JSON (RFC 8259), jq and browsers do."""
    def refuse(token):
        raise ValueError(f"{token} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_every_json_record_of_a_run_is_strict_json(train_run):
    """The plateau schedule's initial best (-inf, in every run's state) is written as the string "-Infinity"."""
    run_dir = train_run["dir"]
    files = sorted(p.name for p in run_dir.glob("*.json"))
    assert files == ["config.json", "eval.json", "model.json", "state.json"]
    for name in files:
        strict_json((run_dir / name).read_text())
    assert [strict_json(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    state = strict_json((run_dir / "state.json").read_text())
    assert state["run"]["plateau"]["best"] == "-Infinity"
    assert strict_json(read_metadata(run_dir / "state.safetensors")[CHECKPOINT_KEY])["state"] == state
    strict_json(read_metadata(run_dir / "model.safetensors")[CARD_KEY])
    assert rundir.RunDir(run_dir).read_state_record()["run"]["plateau"]["best"] == -math.inf  # read back as a number


def test_a_plateau_run_stopped_before_its_first_best_resumes_exactly(tmp_path, train_cli, train_cli_args,
                                                                    train_options, monkeypatch):
    """SIGTERM at step 2 of epoch 1 (of 3 steps: 32 of the 128 images are held out): the checkpoint holds the
    plateau's best still at -inf, as strict JSON; the resumed run equals one trained straight through."""
    plateau = ("--schedule", "plateau", "--val-split", "32")
    straight = train(**train_options(schedule="plateau", val_split=32, out=str(tmp_path / "straight")))
    run_dir = tmp_path / "run"
    original = sigterm_after_step(monkeypatch, 2)
    code, out, err = train_cli(train_cli_args(*plateau, "--out", run_dir))
    assert code == 128 + signal.SIGTERM, err
    state = strict_json((run_dir / "state.json").read_text())
    assert (state["run"]["epoch"], state["run"]["batch"], state["run"]["plateau"]["best"]) == (0, 2, "-Infinity")
    strict_json(read_metadata(run_dir / "state.safetensors")[CHECKPOINT_KEY])

    monkeypatch.setattr(loop, "train_step", original)
    code, out, err = train_cli(["train", "--resume", run_dir])
    assert code == 0, err
    assert without_timing(read_history(run_dir)) == without_timing(straight["history"])
    assert_same_tensors(load_tensors(run_dir / "model.safetensors"),
                        load_tensors(tmp_path / "straight" / "model.safetensors"))
    assert strict_json((run_dir / "state.json").read_text())["run"]["plateau"] == \
        strict_json((tmp_path / "straight" / "state.json").read_text())["run"]["plateau"]


def test_a_run_of_an_older_version_with_bare_infinity_still_resumes(train_run_copy, train_run):
    """Runs written before the records were strict hold -Infinity tokens in state.json and the checkpoint."""
    state_path = train_run_copy / "state.safetensors"
    tensors, metadata = read_safetensors(state_path)
    record = json.loads(metadata[CHECKPOINT_KEY])
    record["state"]["run"]["plateau"]["best"] = -math.inf
    text = json.dumps(record)  # the older writer
    assert '"best": -Infinity' in text
    save_tensors(state_path, tensors, {CHECKPOINT_KEY: text})
    (train_run_copy / "state.json").write_text(json.dumps(record["state"], indent=2) + "\n")
    result = resume(train_run_copy, epochs=2)
    assert without_timing(result["history"]) == without_timing(train_run["result"]["history"])
    assert_same_tensors(load_tensors(train_run_copy / "model.safetensors"),
                        load_tensors(train_run["dir"] / "model.safetensors"))
    assert strict_json((train_run_copy / "state.json").read_text())["run"]["plateau"]["best"] == "-Infinity"


# ------------------------------------------------------------------------------------------------ divergence
def test_nan_loss_stops_with_the_previous_checkpoint_intact(tmp_path, train_run_one_epoch, train_snapshot,
                                                            monkeypatch):
    run_dir = tmp_path / "run"
    shutil.copytree(train_run_one_epoch["dir"], run_dir)
    before = train_snapshot(run_dir)
    def nan_loss(*args, **kwargs):
        return F.cross_entropy(*args, **kwargs) * float("nan")

    monkeypatch.setattr(loop, "F", types.SimpleNamespace(cross_entropy=nan_loss))
    with pytest.raises(TrainingDiverged) as err:
        resume(run_dir, epochs=2)
    message = str(err.value)
    assert isinstance(err.value, VggnetError)
    assert "epoch 2" in message and "--lr" in message and "(epoch 1)" in message and str(run_dir) in message
    after = train_snapshot(run_dir)
    assert after == before  # every file byte-identical: a failed resume leaves even config.json untouched
    x = train_run_one_epoch["preprocess"](train_run_one_epoch["test_set"].images[:8])
    with torch.no_grad():  # (the trainer's model is channels_last: equal up to float summation order)
        torch.testing.assert_close(load(run_dir).model(x), train_run_one_epoch["model"](x), rtol=0, atol=1e-6)


def test_huge_learning_rate_diverges_in_the_first_epoch(tmp_path, train_options):
    run_dir = tmp_path / "run"
    with pytest.raises(TrainingDiverged) as err:
        train(**train_options(lr=1e6, epochs=1, out=str(run_dir)))
    assert "epoch 1" in str(err.value) and "--lr" in str(err.value) and "no checkpoint" in str(err.value)
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.json"]
    with pytest.raises(CheckpointError, match="no saved training state"):
        resume(run_dir)
