"""Checkpoints: round trips to identical logits, atomic writes, optimizer state, and every way loading can fail."""

import json
import math
import os

import pytest
import torch

from vggnet import create_model
from vggnet.base.files import (atomic_write_bytes, load_tensors, model_state, optimizer_from_tensors, optimizer_to_tensors,
                          safetensors_bytes, save_tensors)
from vggnet.store.card import CARD_KEY, FORMAT, ModelCard
from vggnet.store.checkpoint import checked_state
from vggnet.store.rundir import RunDir, load, save_model, write_evaluation
from vggnet.base.strictjson import decode_nonfinite, dumps
from vggnet.base.errors import CheckpointError


def write_card(run_dir, text):
    """Replace a run's card where loading reads it (inside model.safetensors) and its mirror model.json."""
    weights = run_dir / "model.safetensors"
    weights.write_bytes(safetensors_bytes(load_tensors(weights), {CARD_KEY: text}))
    (run_dir / "model.json").write_text(text)


def test_load_gives_the_in_memory_models_logits(train_run_one_epoch):
    trained = train_run_one_epoch["model"]  # channels_last, as trained
    loaded = load(train_run_one_epoch["dir"])
    assert not loaded.model.training
    x = train_run_one_epoch["preprocess"](train_run_one_epoch["test_set"].images)
    with torch.no_grad():
        expected = trained(x)
        same_layout = loaded.model.to(memory_format=torch.channels_last)(x)
        contiguous = loaded.model.to(memory_format=torch.contiguous_format)(x)
    assert torch.equal(same_layout, expected)
    torch.testing.assert_close(contiguous, expected, rtol=0, atol=1e-6)
    assert loaded.classes == train_run_one_epoch["test_set"].classes
    assert loaded.preprocess == train_run_one_epoch["preprocess"]


def test_save_model_then_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = create_model("custom", arch=[4, "M", (6, 1), "LRN", "M"], batch_norm=True, num_classes=3, in_channels=2,
                         input_size=8, head="fitted", hidden=5, dropout=0.0).eval()
    with torch.no_grad():  # non-default BN statistics, so that buffers are checked too
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
    card = ModelCard(model={}, preprocess={"image_size": 8, "mean": [0.5, 0.5], "std": [0.25, 0.25], "fit": "auto",
                                           "in_size": 8}, classes=["a", "b", "c"], metrics={"test_acc": 0.5})
    save_model(tmp_path, model, card)
    loaded = load(tmp_path)
    x = torch.randn(4, 2, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(x))
    assert loaded.card.model.to_dict() == model.config and loaded.card.format == FORMAT
    assert loaded.classes == ["a", "b", "c"] and loaded.card.metrics.to_dict() == {"test_acc": 0.5} and loaded.card.metrics.test_acc == 0.5
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_model_state_strips_wrapper_prefixes():
    model = create_model("custom", arch=[2, "M"], num_classes=2, in_channels=1, input_size=4, head="gap")

    class Wrapper(torch.nn.Module):
        def __init__(self, inner, name):
            super().__init__()
            self.add_module(name, inner)

    wrapped = Wrapper(Wrapper(model, "_orig_mod"), "module")
    assert list(model_state(wrapped)) == list(model.state_dict())


def test_atomic_write_leaves_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"new contents")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]  # the temp file is gone


@pytest.mark.parametrize("make", [
    lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True),
    lambda params: torch.optim.Adam(params, lr=0.01),
    lambda params: torch.optim.AdamW(params, lr=0.01, weight_decay=0.1),
])
def test_optimizer_state_round_trips_through_safetensors_and_json(make, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(5, 3)

    def step(model, optimizer):
        optimizer.zero_grad()
        model(x).square().sum().backward()
        optimizer.step()

    a = torch.nn.Linear(3, 2)
    opt_a = make(a.parameters())
    step(a, opt_a)
    restored, fresh = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    restored.load_state_dict(a.state_dict())
    fresh.load_state_dict(a.state_dict())
    opt_restored, opt_fresh = make(restored.parameters()), make(fresh.parameters())
    tensors, rest = optimizer_to_tensors(opt_a)
    save_tensors(tmp_path / "state.safetensors", tensors)  # through the files, as in a run directory
    optimizer_from_tensors(opt_restored, load_tensors(tmp_path / "state.safetensors"), json.loads(json.dumps(rest)))
    for model, optimizer in ((a, opt_a), (restored, opt_restored), (fresh, opt_fresh)):
        step(model, optimizer)
    assert all(torch.equal(pa, pr) for pa, pr in zip(a.parameters(), restored.parameters()))
    assert not all(torch.equal(pa, pf) for pa, pf in zip(a.parameters(), fresh.parameters()))  # the state matters


def test_load_rejects_a_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load(tmp_path / "nothing")


def test_load_rejects_a_directory_that_is_not_a_run(tmp_path):
    with pytest.raises(CheckpointError, match="not a vggnet run directory"):
        load(tmp_path)


def test_load_rejects_another_format(train_run_copy):
    meta = json.loads((train_run_copy / "model.json").read_text())
    write_card(train_run_copy, json.dumps({**meta, "format": 99}))
    with pytest.raises(CheckpointError) as err:
        load(train_run_copy)
    assert "format 99" in str(err.value) and f"format {FORMAT}" in str(err.value)


@pytest.mark.parametrize("text, match", [("{not json", "corrupt"), ('{"model": {}}', "no format/model"),
                                          ("[1, 2]", "no format/model")])
def test_load_rejects_a_corrupt_model_json(train_run_copy, text, match):
    write_card(train_run_copy, text)
    with pytest.raises(CheckpointError, match=match):
        RunDir(train_run_copy).read_card()


def test_load_rejects_truncated_weights(train_run_copy):
    data = (train_run_copy / "model.safetensors").read_bytes()
    (train_run_copy / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load(train_run_copy)
    (train_run_copy / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load(train_run_copy)
    with pytest.raises(CheckpointError, match="weights must be one of model, best"):
        load(train_run_copy, "nosuch")


def test_load_rejects_weights_of_another_architecture(train_run_copy):
    meta = json.loads((train_run_copy / "model.json").read_text())
    meta["model"]["arch"] = [8, "M", 32, "M"]  # same layer names, other shapes
    write_card(train_run_copy, json.dumps(meta))
    with pytest.raises(CheckpointError, match="does not match the architecture") as err:
        load(train_run_copy)
    assert "wrong shape" in str(err.value)
    meta["model"]["arch"] = [8, "M", 16, 16, "M"]  # one more conv: its weights are missing
    write_card(train_run_copy, json.dumps(meta))
    with pytest.raises(CheckpointError, match="missing"):
        load(train_run_copy)


def test_load_rejects_an_unbuildable_model_description(train_run_copy):
    meta = json.loads((train_run_copy / "model.json").read_text())
    meta["model"]["head"] = "nosuch"
    write_card(train_run_copy, json.dumps(meta))
    with pytest.raises(CheckpointError, match="no buildable model"):
        load(train_run_copy)


def test_state_tensors_restore_the_trainers_model(train_run_one_epoch):
    tensors = load_tensors(train_run_one_epoch["dir"] / "state.safetensors")
    model_tensors = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    trained = train_run_one_epoch["model"].state_dict()
    assert sorted(model_tensors) == sorted(trained)
    assert all(torch.equal(model_tensors[k], trained[k]) for k in trained)


def test_unwritable_places_are_one_line_output_errors(tmp_path):
    from vggnet.base.errors import OutputError, VggnetError
    from vggnet.base.files import make_dirs

    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match=r"cannot write .*file/x\.json") as err:
        atomic_write_bytes(tmp_path / "file" / "x.json", b"{}")  # a path through a file
    assert isinstance(err.value, VggnetError) and isinstance(err.value, OSError)
    with pytest.raises(OutputError, match="cannot create the folder"):
        make_dirs(tmp_path / "file" / "sub")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # nothing left behind


def test_unreadable_files_are_checkpoint_errors(tmp_path, monkeypatch):
    from pathlib import Path

    from vggnet.base.files import read_json

    (tmp_path / "x.json").write_text("{}")
    (tmp_path / "x.safetensors").write_bytes(b"\x00")

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "open", refuse)  # the safetensors header is read first, through Path.open
    monkeypatch.setattr(Path, "read_bytes", refuse)
    monkeypatch.setattr(Path, "read_text", refuse)
    with pytest.raises(CheckpointError, match=r"x\.safetensors cannot be read \(Permission denied\)"):
        load_tensors(tmp_path / "x.safetensors")
    with pytest.raises(CheckpointError, match=r"x\.json cannot be read \(Permission denied\)"):
        read_json(tmp_path / "x.json")


def test_load_refuses_tensors_of_another_dtype_and_draws_no_random_numbers(train_run_copy):
    from safetensors.torch import load_file, save_file

    state = torch.get_rng_state()
    load(train_run_copy)
    assert torch.equal(torch.get_rng_state(), state)  # built on the meta device, filled from the file
    tensors = load_file(train_run_copy / "model.safetensors")
    first = sorted(k for k in tensors if tensors[k].is_floating_point())[0]
    tensors[first] = tensors[first].to(torch.float64)
    save_file(tensors, train_run_copy / "model.safetensors")
    with pytest.raises(CheckpointError, match=f"wrong dtype \\['{first}'\\]"):
        load(train_run_copy)


def test_non_finite_numbers_are_written_as_strings_and_names_stay_names(tmp_path):
    """eval.json of a test set lacking a class: its per-class accuracy is NaN, written as strict JSON ("NaN"); a class
    named "NaN" is still a name, and the state record decodes only where numbers belong."""
    def refuse(token):
        raise ValueError(f"{token} is not JSON")

    result = {"loss": float("nan"), "per_class": [1.0, float("nan")], "classes": ["NaN", "b"], "top1": 1.0}
    write_evaluation(result, "t", tmp_path / "eval.json")
    assert json.loads((tmp_path / "eval.json").read_text(), parse_constant=refuse) == \
        {"loss": "NaN", "per_class": [1.0, "NaN"], "classes": ["NaN", "b"], "top1": 1.0}
    values = [float("inf"), -float("inf"), 0.5, None, True]
    assert dumps(values) == '["Infinity", "-Infinity", 0.5, null, true]'
    assert decode_nonfinite(json.loads(dumps(values))) == values
    assert math.isnan(decode_nonfinite(json.loads(dumps(float("nan")))))
    record = {"run": {"epoch": 0, "batch": 0, "step": 0, "best_acc": -1.0, "loss_sum": 0.0, "correct": 0, "seen": 0,
                      "seconds": 0.0, "plateau": {"patience": 2, "factor": 0.1, "scale": 1.0, "best": "-Infinity",
                                                  "bad_epochs": 0}},
              "optimizer": {"param_groups": [], "scalars": {}}, "history": [], "note": "NaN"}
    checked = checked_state(json.loads(dumps(record)), tmp_path / "state.json")
    assert checked["run"]["plateau"]["best"] == -math.inf and checked["note"] == "NaN"
