"""Defaults that must not lie: the model a name gives, validation on every path, selection by validation (never by
the test set), what extending a run does, and the smaller promises of the structure issue."""

import ast
import json
import os
import re
import types
import warnings
from pathlib import Path

import pytest
import torch

import vggnet
from vggnet.net.analysis import summarize
from vggnet.cli import build_parser
from vggnet.data.split import stratified_holdout
from vggnet.base.errors import ConfigError
from vggnet.store.rundir import load
from vggnet.base.schedule import Plateau
from vggnet.training import PRESETS, TrainConfig, resolve_config, resume, train
from vggnet.training.build import build_model

README = Path(__file__).resolve().parents[2] / "README.md"


def read_history(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------- the model a name gives
def test_no_model_named_gives_the_default_recipe():
    config = resolve_config()
    assert (config.model, config.width, config.head, config.dropout) == ("vgg11_bn", 0.25, "gap", 0.0)


def test_a_named_model_is_that_models_own_architecture():
    config = resolve_config(model="vgg16_bn", dataset="cifar10")
    assert (config.model, config.width, config.head, config.dropout) == ("vgg16_bn", 1.0, "classic", 0.5)
    # ... which is create_model's vgg16_bn with the dataset's classes: 138,365,992 - the 1000-class FC3 (4096 x 1000
    # + 1000) + a 10-class one (4096 x 10 + 10) parameters.
    cifar = types.SimpleNamespace(classes=list("0123456789"), images=torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with torch.device("meta"):
        model = build_model(config, cifar)
    assert summarize(model).totals["params"] == 138_365_992 - 4_097_000 + 40_970 == 134_309_962


def test_explicit_shape_options_still_apply_to_a_named_model():
    config = resolve_config(model="vgg16_bn", width=0.5, dropout=0.1)
    assert (config.width, config.head, config.dropout) == (0.5, "classic", 0.1)
    # A preset's model shape is the preset's model: naming another drops it, the rest of the preset stays.
    d2l = resolve_config("d2l", model="vgg13")
    assert (d2l.model, d2l.width, d2l.head, d2l.dropout) == ("vgg13", 1.0, "classic", 0.5)
    assert (d2l.image_size, d2l.lr, d2l.init) == (224, PRESETS["d2l"]["lr"], "xavier")


def test_the_cli_gives_the_same_model_as_the_rule(monkeypatch, train_cli):
    from vggnet.cli import train as cli_train

    captured = []
    monkeypatch.setattr(cli_train, "train", lambda config: captured.append(config) or
                        {"run_dir": "r", "test_acc": 0.5, "epochs": 1, "history": []})
    assert train_cli(["train", "--model", "vgg16_bn", "--dataset", "cifar10"])[0] == 0
    assert train_cli(["train"])[0] == 0
    assert [(c.model, c.width, c.head, c.dropout) for c in captured] == [("vgg16_bn", 1.0, "classic", 0.5),
                                                                        ("vgg11_bn", 0.25, "gap", 0.0)]


def test_train_help_states_the_true_defaults_and_offers_no_dataset_shape_options():
    train_parser = build_parser()._subparsers._group_actions[0].choices["train"]
    text = " ".join(train_parser.format_help().split())
    assert "named model's 1.0; without --model, the default recipe's 0.25" in text
    assert "named model's classic; without --model, the default recipe's gap" in text
    assert "named model's 0.5; without --model, the default recipe's 0" in text
    assert "--num-classes" not in text and "--in-channels" not in text


# ------------------------------------------------------------------------------------------- validation everywhere
def test_train_validates_a_config_it_is_given(tmp_path):
    with pytest.raises(ConfigError, match="--optimizer must be one of sgd, adam, adamw, got 'lamb'"):
        train(TrainConfig(optimizer="lamb", data_dir=str(tmp_path / "none"), out=str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()  # refused before any data was looked for or any file written


@pytest.mark.parametrize("option, value, flag", [("width", float("inf"), "--width"), ("lr", 1e400, "--lr"),
                                                 ("epochs", 2.5, "--epochs"), ("threads", 0, "--threads"),
                                                 ("momentum", 1.0, "--momentum"), ("init", "he", "--init")])
def test_validate_names_non_finite_and_mistyped_values(option, value, flag):
    with pytest.raises(ConfigError, match=flag):
        TrainConfig(**{option: value}).validate()


# ------------------------------------------------------------------------------------------- validation split
def test_stratified_holdout_by_hand():
    labels = torch.tensor([0] * 6 + [1] * 3 + [2] * 1)
    keep, held = stratified_holdout(labels, 4, 3)
    # Shares 4 * (6, 3, 1) / 10 = (2.4, 1.2, 0.4): floors (2, 1, 0), the one left over to the largest remainder,
    # a tie of 0.4 between classes 0 and 2 that goes to the lower index.
    assert torch.bincount(labels[held], minlength=3).tolist() == [3, 1, 0]
    assert sorted(keep.tolist() + held.tolist()) == list(range(10))
    assert keep.tolist() == sorted(keep.tolist()) and held.tolist() == sorted(held.tolist())
    again_keep, again_held = stratified_holdout(labels, 4, 3)
    assert torch.equal(again_held, held) and torch.equal(again_keep, keep)


def test_stratified_holdout_keeps_class_shares_on_real_sized_labels():
    labels = torch.arange(60000) % 10
    _, held = stratified_holdout(labels, 5000, 10)
    assert torch.bincount(labels[held], minlength=10).tolist() == [500] * 10


@pytest.mark.parametrize("n", [0, 10, 11])
def test_stratified_holdout_refuses_impossible_sizes(n):
    with pytest.raises(ConfigError, match="--val-split"):
        stratified_holdout(torch.arange(10) % 2, n, 2)


def test_plateau_needs_a_validation_split_and_the_paper_preset_has_one():
    with pytest.raises(ConfigError, match="--val-split"):
        resolve_config(schedule="plateau")
    assert resolve_config("paper").val_split == 5000


@pytest.fixture(scope="module")
def val_run(tmp_path_factory, train_options):
    """Three epochs with 32 of the 128 training images held out and the plateau schedule (patience 0)."""
    run_dir = tmp_path_factory.mktemp("val") / "run"
    result = train(**train_options(epochs=3, val_split=32, schedule="plateau", plateau_patience=0, out=str(run_dir)))
    return run_dir, result


def test_validation_images_are_never_trained_on(val_run, train_options):
    run_dir, result = val_run
    history = read_history(run_dir)
    assert [r["step"] for r in history] == [3, 6, 9]  # 96 training images / batch 32: the 32 held out are not in it
    for record in history:
        assert (record["val_acc"] * 32).is_integer() and (record["test_acc"] * 64).is_integer()


def test_best_checkpoint_and_plateau_follow_validation_accuracy(val_run):
    run_dir, result = val_run
    history = read_history(run_dir)
    best = max(history, key=lambda r: r["val_acc"])  # the first of equal maxima
    assert json.loads((run_dir / "best.json").read_text())["epoch"] == best["epoch"]
    card = load(run_dir, "best").card
    assert card.metrics.to_dict() == {k: best[k] for k in ("epoch", "val_acc", "val_top5", "val_loss", "test_acc", "test_top5",
                                                 "test_loss")}  # the best epoch's metrics, not the last epoch's
    assert load(run_dir).card.metrics.epoch == 3
    assert result["best_val_acc"] == best["val_acc"] and result["val_acc"] == history[-1]["val_acc"]
    plateau = Plateau(patience=0)
    for record in history:
        plateau.update(record["val_acc"])
    state = json.loads((run_dir / "state.json").read_text())["run"]
    assert state["plateau"] == plateau.to_dict() and state["best_acc"] == best["val_acc"]


# ------------------------------------------------------------------------------------------- extending a run
def test_a_decaying_schedule_cannot_be_extended_and_config_json_is_untouched(tmp_path, train_options):
    run_dir = tmp_path / "run"
    train(**train_options(epochs=1, schedule="onecycle", out=str(run_dir)))
    before = (run_dir / "config.json").read_bytes()
    with pytest.raises(ConfigError, match="onecycle schedule brings the learning rate to 0 at the end of its 1 epochs"):
        resume(run_dir, epochs=2)
    assert (run_dir / "config.json").read_bytes() == before


def test_extending_keeps_the_schedules_length_and_the_saved_options(tmp_path, train_options, capsys):
    run_dir = tmp_path / "run"
    train(**train_options(epochs=2, schedule="step", out=str(run_dir)))  # 8 steps: /10 at step 4, /100 at step 6
    capsys.readouterr()
    resume(run_dir, epochs=3, threads=2, progress=True)
    assert "keeps its 2 epochs" in capsys.readouterr().err  # said, not silent
    history = read_history(run_dir)
    # The rate after each epoch's last step: step 4 is half-way (/10), step 8 the end (/100), and step 12 stays there.
    assert [r["lr"] for r in history] == pytest.approx([0.005, 0.0005, 0.0005])  # no jump back up
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["epochs"], config["schedule_epochs"]) == (3, 2)
    assert (config["threads"], config["progress"]) == (1, False)  # this session's run-time options stay out


# ------------------------------------------------------------------------------------------- smaller promises
def test_tensorboard_is_an_extra_with_an_install_hint(tmp_path, train_options, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(ConfigError, match=r"pip install 'vggnet\[tensorboard\]'"):
        train(**train_options(epochs=1, tensorboard=True, out=str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()


def test_predict_logits_leaves_the_callers_model_in_its_mode():
    from vggnet.data import Preprocess
    from vggnet.evaluation.metrics import predict_logits

    model = vggnet.create_model("custom", arch=[4, "M"], batch_norm=True, num_classes=3, in_channels=1, input_size=8,
                                head="gap")
    images = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    model.train()
    predict_logits(model, images, Preprocess(8, (0.5,), (0.25,)), torch.device("cpu"))
    assert model.training
    model.eval()
    predict_logits(model, images, Preprocess(8, (0.5,), (0.25,)), torch.device("cpu"))
    assert not model.training


def test_predict_runs_in_the_runtimes_precision(train_run_copy, monkeypatch, tmp_path):
    from PIL import Image

    from vggnet.use import predict
    from vggnet.runtime import Runtime

    seen = []
    real = predict.predict_logits
    monkeypatch.setattr(predict, "predict_logits", lambda *a, **k: seen.append(a[4]) or real(*a[:4], "fp32", **k))
    Image.new("L", (28, 28), 99).save(tmp_path / "x.png")
    for precision in ("bf16", "fp32"):
        runtime = Runtime(torch.device("cpu"), precision, True, 1)
        predict.predict_files(load(train_run_copy), [tmp_path / "x.png"], 1, runtime)
    assert seen == ["bf16", "fp32"]


def test_files_reads_the_umask_without_changing_it(monkeypatch, tmp_path):
    import importlib

    from vggnet.base import files

    changes = []
    monkeypatch.setattr(os, "umask", lambda mask: changes.append(mask) or 0o022)
    importlib.reload(files)
    files.atomic_write_text(tmp_path / "x.txt", "x")
    mask = int(re.search(r"Umask:\s+(\d+)", Path("/proc/self/status").read_text()).group(1), 8)
    assert changes == []  # neither at import nor at the first write (Linux shows it in /proc)
    assert (tmp_path / "x.txt").stat().st_mode & 0o777 == 0o666 & ~mask


def test_the_cpu_flags_are_read_with_the_file_closed():
    import gc

    from vggnet import runtime

    runtime._cpu_flags.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runtime._cpu_flags()
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]


def test_the_readmes_python_example_defines_every_name_it_uses():
    block = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    tree = ast.parse(block)
    import builtins

    defined = set(dir(builtins))
    defined |= {alias.asname or alias.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names}
    undefined = []
    for node in tree.body:  # statement by statement, in order: a name must be bound before it is read
        for name in ast.walk(node):
            if isinstance(name, ast.Name) and isinstance(name.ctx, ast.Load) and name.id not in defined:
                undefined.append(name.id)
        for target in ast.walk(node):
            if isinstance(target, ast.Name) and isinstance(target.ctx, ast.Store):
                defined.add(target.id)
    assert undefined == []


def test_the_documented_cifar_recipe_trains_the_model_it_describes(monkeypatch, train_cli):
    from vggnet.cli import train as cli_train

    text = (README.parent / "docs" / "RESULTS.md").read_text()
    command = re.search(r"```sh\n(vggnet train --model vgg16_bn .*?)\n```", text, re.S).group(1)
    argv = command.split("\nvggnet eval")[0].replace("\\\n", " ").split()
    captured = []
    monkeypatch.setattr(cli_train, "train", lambda config: captured.append(config) or
                        {"run_dir": "r", "test_acc": 0.5, "epochs": 1, "history": []})
    code, out, err = train_cli(argv[1:])
    assert code == 0, err
    config = captured[0]
    assert (config.model, config.width, config.head, config.dropout, config.dataset) == \
        ("vgg16_bn", 1.0, "gap", 0.0, "cifar10")
    cifar = types.SimpleNamespace(classes=list("0123456789"), images=torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with torch.device("meta"):
        assert summarize(build_model(config, cifar)).totals["params"] == 14_728_266  # as RESULTS.md says


# ------------------------------------------------------------------------------------------- class subsets
def test_select_classes_keeps_and_relabels_in_the_given_order():
    from vggnet.data import ImageDataset

    images = torch.arange(6, dtype=torch.uint8).view(6, 1, 1, 1)
    ds = ImageDataset(images, torch.tensor([0, 1, 2, 1, 0, 2]), ["a", "b", "c"], "toy")
    picked = ds.select_classes([2, 0])
    assert picked.classes == ["c", "a"]
    assert picked.images.flatten().tolist() == [0, 2, 4, 5] and picked.labels.tolist() == [1, 0, 1, 0]
    with pytest.raises(Exception, match="distinct indices in 0..2"):
        ds.select_classes([0, 3])


def test_classes_option_trains_and_tests_on_those_classes_only(tmp_path, train_options, train_cli):
    from vggnet.cli.train import class_list

    assert class_list("0-2,7") == [0, 1, 2, 7] and class_list("5,6") == [5, 6]
    result = train(**train_options(epochs=1, classes=[5, 6, 7, 8, 9], batch_size=16, out=str(tmp_path / "run")))
    card = load(tmp_path / "run").card
    assert card.classes == ["Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"] and card.model.num_classes == 5
    # Labels are i % 10: 63 of the 128 training images (12 x 5 + 3 of 120..127) -> 3 whole batches of 16; 30 of the
    # 64 test images.
    assert result["history"][0]["step"] == 3
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["n"] == 30
    code, out, err = train_cli(["train", "--classes", "4-2"])
    assert code == 2 and "a range runs from a smaller to a larger index" in err
