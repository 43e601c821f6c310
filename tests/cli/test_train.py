"""``vggnet train`` / ``eval`` / ``data fetch`` from the command line: flags, one-line errors, SIGTERM and resume."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import vggnet.cli.train as cli_train
from vggnet.base.files import load_tensors, safetensors_bytes
from vggnet.store.card import CARD_KEY
from vggnet.store.rundir import load
from vggnet.data import load_dataset
from vggnet.evaluation.metrics import evaluate
from vggnet.training import resolve_config, train

TIMEOUT_S = 120



def read_history(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def without_timing(history):
    return [{k: v for k, v in r.items() if k not in ("epoch_seconds", "train_images_per_second")} for r in history]


def subprocess_env(tmp_path, train_data_dir):
    env = dict(os.environ, VGGNET_DATA=str(train_data_dir), XDG_CACHE_HOME=str(tmp_path / "cache"),
               PYTHONUNBUFFERED="1")
    env.pop("VGGNET_DEBUG", None)
    return env


# ------------------------------------------------------------------------------------------------ train: flags
def test_flags_become_the_configuration(monkeypatch, train_cli):
    captured = []

    def fake_train(config):
        captured.append(config)
        return {"run_dir": "runs/x", "test_acc": 0.5, "val_acc": 0.625, "best_val_acc": 0.75, "epochs": 3,
                "history": [{}]}

    monkeypatch.setattr(cli_train, "train", fake_train)
    argv = ["train", "--preset", "paper", "--model", "custom", "--arch", "8,M", "--batch-norm", "--lr", "0.3",
            "--no-flip", "--scale-jitter", "0.4", "0.9", "--epochs", "3", "--no-channels-last", "--out", "runs/x"]
    code, out, err = train_cli(argv + ["--json"])
    assert code == 0, err
    assert captured == [resolve_config("paper", model="custom", arch="8,M", batch_norm=True, lr=0.3, flip=False,
                                       scale_jitter=(0.4, 0.9), epochs=3, channels_last=False, out="runs/x",
                                       progress=False)]  # --json: stdout carries only the result
    assert json.loads(out) == {"run_dir": "runs/x", "test_acc": 0.5, "val_acc": 0.625, "best_val_acc": 0.75,
                               "epochs": 3}
    code, out, err = train_cli(argv)
    assert out == "test accuracy 50.00%, validation 62.50% (best 75.00%) after 3 epochs; run directory runs/x\n"


def test_resume_flag_passes_only_the_new_epoch_total(monkeypatch, train_cli, tmp_path):
    captured = []
    monkeypatch.setattr(cli_train, "resume", lambda run_dir, epochs, **rt: captured.append((run_dir, epochs, rt)) or
                        {"run_dir": run_dir, "test_acc": 0.25, "epochs": 5, "history": []})
    assert train_cli(["train", "--resume", tmp_path, "--epochs", "5"])[0] == 0
    assert train_cli(["train", "--resume", tmp_path])[0] == 0
    assert train_cli(["train", "--resume", tmp_path, "--threads", "1", "--no-progress"])[0] == 0
    assert captured == [(str(tmp_path), 5, {}), (str(tmp_path), None, {}),
                        (str(tmp_path), None, {"threads": 1, "progress": False})]


# ------------------------------------------------------------------------------------------------ train: errors
@pytest.mark.parametrize("argv, fragments", [
    (["--epochs", "0"], ["--epochs", "must be >= 1, got 0"]),
    (["--lr", "-1"], ["--lr", "must be > 0, got -1.0"]),
    (["--batch-size", "x"], ["--batch-size", "'x' is not an integer"]),
    (["--dropout", "1.5"], ["--dropout", "must be in [0, 1)"]),
    (["--schedule", "linear"], ["--schedule", "invalid choice"]),
    (["--preset", "nosuch"], ["--preset", "invalid choice"]),
    (["--num-classes", "3"], ["unrecognized arguments: --num-classes"]),  # from the dataset: not offered
    (["--in-channels", "3"], ["unrecognized arguments: --in-channels"]),
    (["--warmup-epochs", "-1"], ["--warmup-epochs must be >= 0, got -1.0"]),
    (["--dataset", "nosuch"], ["unknown dataset 'nosuch'", "fashion-mnist"]),
    (["--dataset", "folder:/nonexistent"], ["/nonexistent", "no such directory"]),
])
def test_train_usage_errors(argv, fragments, train_cli, tmp_path, one_line_error):
    code, out, err = train_cli(["train", "--out", tmp_path / "run", "--no-progress", *argv])
    one_line_error(code, err, *fragments)
    assert not (tmp_path / "run").exists()


def test_unknown_model_lists_the_choices(train_cli, train_cli_args, tmp_path, one_line_error):
    code, out, err = train_cli(train_cli_args("--out", tmp_path / "run") + ["--model", "vgg99"])
    one_line_error(code, err, "unknown model 'vgg99'", "vgg11_bn", "custom")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("dataset, fragments", [
    ("cifar10", ["CIFAR-10 not found", "vggnet data fetch cifar10", "--data-dir"]),
    ("fashion-mnist", ["Fashion-MNIST not found", "no IDX files", "vggnet data fetch fashion-mnist"]),
])
def test_missing_dataset_names_the_places_searched(dataset, fragments, data_env, train_cli, one_line_error):
    empty = data_env / "empty"
    empty.mkdir()
    code, out, err = train_cli(["train", "--dataset", dataset, "--data-dir", empty, "--out", data_env / "run"])
    one_line_error(code, err, str(empty), "omit --data-dir to search $VGGNET_DATA and the default places",
                   *fragments)
    assert str(data_env / "xdg-cache") not in err  # a given --data-dir is searched alone (no silent fallback)
    assert not (data_env / "run").exists()
    code, out, err = train_cli(["train", "--dataset", dataset, "--out", data_env / "run"])
    one_line_error(code, err, str(data_env / "xdg-cache" / "vggnet" / "data"), *fragments[:1])  # the default places


def test_resume_errors_leave_the_run_untouched(train_run_copy, tmp_path, train_cli, train_snapshot,
                                               one_line_error):
    before = train_snapshot(train_run_copy)
    code, out, err = train_cli(["train", "--resume", tmp_path / "nothing"])
    one_line_error(code, err, "not a vggnet run directory")
    code, out, err = train_cli(["train", "--resume", train_run_copy, "--lr", "0.1"])
    one_line_error(code, err, "--lr cannot change", "only --epochs")
    code, out, err = train_cli(["train", "--resume", train_run_copy, "--preset", "paper", "--no-flip"])
    one_line_error(code, err, "--flip, --preset cannot change")
    code, out, err = train_cli(["train", "--out", train_run_copy, "--epochs", "1"])
    one_line_error(code, err, "already holds a run", f"--resume {train_run_copy}")
    assert train_snapshot(train_run_copy) == before


# ------------------------------------------------------------------------------------------------ eval
def test_eval_json_equals_evaluate(train_run_one_epoch, train_data_dir, tmp_path, train_cli, train_snapshot):
    run_dir = train_run_one_epoch["dir"]
    before = train_snapshot(run_dir)
    code, out, err = train_cli(["eval", run_dir, "--data-dir", train_data_dir, "--json", "--out", tmp_path / "ev"])
    assert code == 0, err
    record = json.loads(out)
    assert {"top1", "top5", "per_class", "n", "loss", "confusion", "classes"} <= set(record)
    loaded = load(run_dir)
    _, test = load_dataset("fashion-mnist", train_data_dir)
    expected = evaluate(loaded.model, test, loaded.preprocess)
    assert record["n"] == expected.n == 64
    assert (record["top1"], record["top5"]) == (expected.top1, expected.top5)
    assert record["per_class"] == expected.per_class and record["confusion"] == expected.confusion
    assert record["loss"] == pytest.approx(expected.loss, abs=1e-6)
    assert all(0 <= v <= 1 for v in record["per_class"] + [record["top1"], record["top5"]])
    # What training measured for this epoch is what eval measures on the saved weights.
    assert record["top1"] == train_run_one_epoch["result"]["history"][-1]["test_acc"]
    assert json.loads((tmp_path / "ev" / "eval.json").read_text()) == record
    assert (tmp_path / "ev" / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    assert train_snapshot(run_dir) == before  # --out elsewhere: the run directory is not written


def write_card(run_dir, card):
    """Replace a run's card where loading reads it (inside model.safetensors) and its mirror model.json."""
    weights = run_dir / "model.safetensors"
    weights.write_bytes(safetensors_bytes(load_tensors(weights), {CARD_KEY: json.dumps(card)}))
    (run_dir / "model.json").write_text(json.dumps(card))


def break_format(run_dir):
    meta = json.loads((run_dir / "model.json").read_text())
    write_card(run_dir, {**meta, "format": 99})


def truncate_weights(run_dir):
    data = (run_dir / "model.safetensors").read_bytes()
    (run_dir / "model.safetensors").write_bytes(data[:100])


def other_architecture(run_dir):
    meta = json.loads((run_dir / "model.json").read_text())
    meta["model"]["arch"] = [8, "M", 24, "M"]
    write_card(run_dir, meta)


@pytest.mark.parametrize("damage, fragments", [
    (break_format, ["format 99", "reads format 1"]),
    (truncate_weights, ["model.safetensors", "truncated"]),
    (other_architecture, ["does not match the architecture", "wrong shape"]),
])
def test_eval_errors_are_one_line_and_damage_nothing(damage, fragments, train_run_copy, train_data_dir, train_cli,
                                                     train_snapshot, one_line_error):
    damage(train_run_copy)
    before = train_snapshot(train_run_copy)
    code, out, err = train_cli(["eval", train_run_copy, "--data-dir", train_data_dir])
    one_line_error(code, err, *fragments)
    assert train_snapshot(train_run_copy) == before


def test_eval_of_a_directory_that_is_not_a_run(tmp_path, train_cli, one_line_error):
    code, out, err = train_cli(["eval", tmp_path])
    one_line_error(code, err, "not a vggnet run directory")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------ data fetch
def test_fetch_with_wrong_checksums_saves_nothing(data_env, data_fake_fashion_mnist, train_cli, one_line_error):
    mirror, out_dir = data_env / "mirror", data_env / "out"
    data_fake_fashion_mnist(mirror)
    code, out, err = train_cli(["data", "fetch", "fashion-mnist", "--url", mirror.as_uri(), "--to", out_dir])
    one_line_error(code, err, "md5", "does not match", "nothing was saved")
    assert list(out_dir.iterdir()) == []


# ------------------------------------------------------------------------------------------------ subprocesses
def test_errors_through_python_m_vggnet(train_run_copy, tmp_path, train_data_dir, one_line_error):
    env = subprocess_env(tmp_path, train_data_dir)
    for argv, fragment in ((["train", "--resume", str(train_run_copy), "--lr", "0.1"], "--lr cannot change"),
                           (["eval", str(tmp_path / "nothing")], "does not exist")):
        proc = subprocess.run([sys.executable, "-m", "vggnet", *argv], env=env, capture_output=True, text=True,
                              timeout=TIMEOUT_S)
        one_line_error(proc.returncode, proc.stderr, fragment)


def test_sigterm_then_resume_equals_an_uninterrupted_run(tmp_path, train_data_dir, train_cli_args, train_options,
                                                         train_run):
    run_dir = tmp_path / "run"
    env = subprocess_env(tmp_path, train_data_dir)
    argv = [sys.executable, "-m", "vggnet"] + train_cli_args("--out", str(run_dir))
    argv[argv.index("--epochs") + 1] = "1000"  # far more than will run
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not (run_dir / "confusion.png").exists():  # the last file of an epoch: epoch 1 is saved
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the first epoch took too long"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 128 + signal.SIGTERM, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "SIGTERM" in lines[0] and f"resume with vggnet train --resume {run_dir}" in lines[0]
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".")]  # no temp files left

    state = json.loads((run_dir / "state.json").read_text())["run"]
    assert state["epoch"] >= 1 and len(read_history(run_dir)) == state["epoch"]
    assert load(run_dir).card.metrics.epoch == state["epoch"]  # the saved model is readable and current
    print(f"SIGTERM landed at epoch {state['epoch'] + 1}, batch {state['batch']}")
    epochs = state["epoch"] + 1  # finishes the interrupted epoch, or trains one more after a completed one

    proc = subprocess.run([sys.executable, "-m", "vggnet", "train", "--resume", str(run_dir), "--epochs", str(epochs)],
                          env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr
    if epochs == 2:
        reference = train_run["dir"]
    else:  # the constant schedule does not depend on the total: a straight run of this length is the reference
        reference = tmp_path / "reference"
        train(**train_options(epochs=epochs, out=str(reference)))
    resumed, straight = load_tensors(run_dir / "model.safetensors"), load_tensors(reference / "model.safetensors")
    assert sorted(resumed) == sorted(straight)
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    assert without_timing(read_history(run_dir)) == without_timing(read_history(reference))
