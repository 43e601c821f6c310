"""--tta flip in training and the ``hour`` preset: the final model's test score with mirrored images averaged in,
against vggnet.evaluation.metrics run independently on the saved weights (CPU)."""

import csv
import json

import pytest

from vggnet.base.errors import ConfigError
from vggnet.evaluation.metrics import evaluate
from vggnet.store.rundir import load
from vggnet.training import PRESETS, resolve_config, train


@pytest.fixture(scope="module")
def tta_run(tmp_path_factory, train_options):
    run_dir = tmp_path_factory.mktemp("tta") / "run"
    result = train(resolve_config(**train_options(tta="flip", out=str(run_dir))))
    return run_dir, result


def test_the_last_epoch_is_also_scored_with_flips_as_evaluate_scores_the_saved_model(tta_run, train_options):
    from vggnet.data import load_dataset

    run_dir, result = tta_run
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert "test_acc_tta" not in history[0]  # only the final model
    loaded = load(run_dir)
    _, test_set = load_dataset("fashion-mnist", train_options()["data_dir"], 32)
    flipped = evaluate(loaded.model, test_set, loaded.card.preprocess, "cpu", "fp32", tta="flip")
    plain = evaluate(loaded.model, test_set, loaded.card.preprocess, "cpu", "fp32")
    last = history[-1]
    assert last["test_acc_tta"] == result["test_acc_tta"] == flipped.top1
    assert last["test_top5_tta"] == flipped.top5 and last["test_loss_tta"] == pytest.approx(flipped.loss, rel=1e-6)
    assert last["test_acc"] == plain.top1 and last["test_loss_tta"] != last["test_loss"]
    assert loaded.card.metrics.test_acc_tta == flipped.top1  # the model card carries it


def test_metrics_csv_has_the_tta_columns_empty_before_the_last_epoch(tta_run):
    run_dir, _ = tta_run
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    assert [r["test_acc_tta"] for r in rows[:-1]] == [""] and rows[-1]["test_acc_tta"] != ""
    assert list(rows[0])[-3:] == ["test_loss_tta", "test_acc_tta", "test_top5_tta"]


def test_the_hour_avx2_preset_and_a_named_model_beside_it():
    """The fixed recipe that was the hour preset before ``hour`` became a 60-minute budget (tests/training/
    test_budget.py)."""
    hour = resolve_config("hour_avx2")
    assert (hour.model, hour.width, hour.head, hour.dropout) == ("vgg13_bn", 0.25, "gap", 0.0)
    assert (hour.erasing, hour.epochs, hour.tta, hour.schedule, hour.lr) == (0.3, 34, "flip", "onecycle", 0.1)
    named = resolve_config("hour_avx2", model="vgg16_bn")  # the model's own shape, the preset's training
    assert (named.width, named.head, named.epochs, named.tta) == (1.0, "classic", 34, "flip")
    assert PRESETS["hour_avx2"]["tta"] == "flip"


def test_an_unknown_tta_is_one_line_naming_the_choice():
    with pytest.raises(ConfigError, match=r"--tta must be flip, got 'mirror'"):
        resolve_config(tta="mirror")


def test_cli_summary_line_shows_both_scores(cli, train_cli_args, tmp_path):
    code, out, err = cli(train_cli_args("--tta", "flip", "--epochs", "1", "--out", tmp_path / "run"))
    assert code == 0, err
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert (f"test accuracy {100 * record['test_acc']:.2f}% ({100 * record['test_acc_tta']:.2f}% with test-time "
            "augmentation) after 1 epochs") in out


def test_a_finished_tta_run_extended_by_resume_keeps_both_final_scores(cli, train_cli_args, tmp_path):
    """The first run's last record holds the TTA scores and the others do not: a resume that extends it (more
    epochs) is not a corrupt state, and its own last epoch is scored with flips again."""
    run = tmp_path / "run"
    code, _, err = cli(train_cli_args("--tta", "flip", "--epochs", "2", "--out", run))
    assert code == 0, err
    code, _, err = cli(["train", "--resume", str(run), "--epochs", "3", "--no-progress"])
    assert code == 0, err
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert ["test_acc_tta" in r for r in history] == [False, True, True]  # each final model's
