"""A checkpoint is one atomic thing (issue 14): ``vggnet train`` killed like SIGKILL (``os._exit(137)``: no cleanup)
before each of the run directory's file renames in turn, then recovered (``--resume``, or, when no checkpoint was
committed yet, a one-line refusal and a fresh start), ends bit-identical to the uninterrupted run. At every kill
every file that exists parses, and once the commit has been rolled forward all of them agree with it. Runs written
before the records moved into the safetensors files still load and resume.

The kills run two at a time, each in a subprocess through a launcher that wraps ``os.replace``; the recoveries run
in-process. All on the CPU at one thread."""

import concurrent.futures
import csv
import io
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

from vggnet.base.files import TEMP_NAME, load_tensors, read_safetensors, safetensors_bytes
from vggnet.store.card import CARD_KEY
from vggnet.store.checkpoint import CHECKPOINT_KEY
from vggnet.store.rundir import RunDir, load
from vggnet.training import resume

TIMING = ("epoch_seconds", "train_images_per_second")
TIMEOUT_S = 120

#: Runs vggnet's CLI with os.replace wrapped: every rename into $VGGNET_TEST_RUN is counted (its target's name is
#: appended to $VGGNET_TEST_LOG), and the $VGGNET_TEST_KILL_AT-th one kills the process before it renames.
LAUNCHER = '''
import os, runpy, sys

run_dir = os.path.abspath(os.environ["VGGNET_TEST_RUN"])
kill_at = int(os.environ.get("VGGNET_TEST_KILL_AT", "0"))
log = os.environ["VGGNET_TEST_LOG"]
real_replace, count = os.replace, [0]


def replace(src, dst, *args, **kwargs):
    if os.path.dirname(os.path.abspath(dst)) == run_dir:
        count[0] += 1
        if count[0] == kill_at:
            os._exit(137)
        with open(log, "a") as f:
            f.write(os.path.basename(dst) + "\\n")
    return real_replace(src, dst, *args, **kwargs)


os.replace = replace
sys.argv[0] = "vggnet"
runpy.run_module("vggnet", run_name="__main__", alter_sys=True)
'''


def launch(launcher, args, run_dir, log, kill_at=0):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VGGNET_TEST_RUN": str(run_dir), "VGGNET_TEST_LOG": str(log),
           "VGGNET_TEST_KILL_AT": str(kill_at)}
    env.pop("VGGNET_DEBUG", None)
    return subprocess.run([sys.executable, str(launcher), *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def crashes(tmp_path_factory, train_cli_args):
    """The uninterrupted two-epoch run (its renames logged), and the same command killed before its N-th rename
    for every N: {"reference": dir, "writes": [names], "killed": {N: dir}}."""
    root = tmp_path_factory.mktemp("crashes")
    launcher = root / "launcher.py"
    launcher.write_text(LAUNCHER)
    reference = root / "reference"
    done = launch(launcher, train_cli_args("--out", reference), reference, root / "reference.log")
    assert done.returncode == 0, done.stderr
    writes = (root / "reference.log").read_text().split()

    def kill(n):
        run_dir = root / f"killed-{n}"
        result = launch(launcher, train_cli_args("--out", run_dir), run_dir, root / f"killed-{n}.log", kill_at=n)
        assert result.returncode == 137, (n, result.stderr)
        return n, run_dir

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        killed = dict(pool.map(kill, range(1, len(writes) + 1)))
    return {"reference": reference, "writes": writes, "killed": killed}


def test_the_run_commits_state_first_and_marks_the_save_complete_last(crashes):
    """Two epochs of the tiny run: config.json once, then per epoch the commit (state.safetensors) first and
    state.json last; the plots only after the last epoch (PLOT_SECONDS); config.json is not rewritten unchanged."""
    derived = ["model.safetensors", "model.json", "metrics.jsonl", "metrics.csv", "eval.json"]
    assert crashes["writes"] == (["config.json"] + ["state.safetensors", *derived, "state.json"]
                                 + ["state.safetensors", *derived, "confusion.png", "curves.png", "state.json"])


def without_timing(history):
    return [{k: v for k, v in record.items() if k not in TIMING} for record in history]


def card_without(card, keys):
    """A card without the training options ``keys`` (e.g. ``out``, the folder equal runs differ in)."""
    return {**card, "train_config": {k: v for k, v in card["train_config"].items() if k not in keys}}


def assert_every_file_parses(run_dir):
    """Whatever a kill left: each file whole and readable by what reads it; only the lock file and temporary files
    beside them."""
    for path in sorted(run_dir.iterdir()):
        name = path.name
        if name == ".lock" or TEMP_NAME.match(name):
            continue
        if name.endswith(".json"):
            json.loads(path.read_text())
        elif name == "metrics.jsonl":
            assert all(json.loads(line) for line in path.read_text().splitlines())
        elif name == "metrics.csv":
            assert list(csv.DictReader(io.StringIO(path.read_text())))
        elif name.endswith(".safetensors"):
            _, metadata = read_safetensors(path)
            json.loads(metadata[CHECKPOINT_KEY if name == "state.safetensors" else CARD_KEY])
        elif name.endswith(".png"):
            Image.open(path).verify()
        else:
            raise AssertionError(f"unexpected file {name}")
    if (run_dir / "model.safetensors").exists():
        loaded = load(run_dir)  # the weights and the card inside them agree, whatever model.json says
        assert loaded.card.metrics.epoch in (1, 2)


def assert_consistent(run_dir):
    """Every file agrees with the committed checkpoint: state.json, config.json, the metrics, the weights (the
    state's model tensors) with their card and model.json, eval.json; the epoch is the same everywhere."""
    rundir = RunDir(run_dir)
    checkpoint = rundir.read_checkpoint()
    state, _ = read_safetensors(run_dir / "state.safetensors")
    history = checkpoint.state["history"]
    epoch = checkpoint.state["run"]["epoch"]
    assert json.loads((run_dir / "state.json").read_text()) == checkpoint.state
    assert json.loads((run_dir / "config.json").read_text()) == checkpoint.config
    assert [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == history
    rows = list(csv.DictReader(io.StringIO((run_dir / "metrics.csv").read_text())))
    assert [int(row["epoch"]) for row in rows] == [r["epoch"] for r in history] == list(range(1, epoch + 1))
    weights, metadata = read_safetensors(run_dir / "model.safetensors")
    assert json.loads(metadata[CARD_KEY]) == checkpoint.card == json.loads((run_dir / "model.json").read_text())
    assert checkpoint.card["metrics"]["epoch"] == epoch
    assert sorted(weights) == sorted(k[len("model/"):] for k in state if k.startswith("model/"))
    assert all(torch.equal(weights[k], state[f"model/{k}"]) for k in weights)
    assert json.loads((run_dir / "eval.json").read_text()) == checkpoint.evaluation
    assert [p.name for p in run_dir.iterdir() if TEMP_NAME.match(p.name)] == []


def assert_same_run(run_dir, reference, differing=("out",)):
    """The recovered run equals the uninterrupted one: weights, every state tensor, the history (but for its
    wall-clock fields), the counters, the card (but for the training options ``differing``) and the test
    evaluation; no temporary or lock file is left."""
    for name in ("model.safetensors", "state.safetensors"):
        a, b = load_tensors(run_dir / name), load_tensors(reference / name)
        assert sorted(a) == sorted(b) and [k for k in a if not torch.equal(a[k], b[k])] == [], name
    state, expected = (json.loads((d / "state.json").read_text()) for d in (run_dir, reference))
    assert without_timing(state["history"]) == without_timing(expected["history"])
    assert {**state["run"], "seconds": 0} == {**expected["run"], "seconds": 0}
    assert state["optimizer"] == expected["optimizer"]
    card, expected_card = (json.loads((d / "model.json").read_text()) for d in (run_dir, reference))
    assert card_without(card, differing) == card_without(expected_card, differing)
    assert json.loads((run_dir / "eval.json").read_text()) == json.loads((reference / "eval.json").read_text())
    assert [p.name for p in run_dir.iterdir() if p.name.startswith(".")] == []


def test_a_kill_before_any_rename_leaves_a_consistent_run_that_recovers_exactly(crashes, cli, one_line_error,
                                                                                  train_cli_args, tmp_path):
    reference, writes = crashes["reference"], crashes["writes"]
    commits = [n for n, name in enumerate(writes, 1) if name == "state.safetensors"]
    for n, run_dir in crashes["killed"].items():
        assert_every_file_parses(run_dir)
        assert any(TEMP_NAME.match(p.name) for p in run_dir.iterdir()), n  # the kill's half-done write
        committed = n > commits[0]
        assert RunDir(run_dir).has_state() == committed, n
        if committed:  # a copy rolled forward by itself agrees everywhere, then resume rolls the original forward
            copy = tmp_path / f"copy-{n}"
            shutil.copytree(run_dir, copy)
            with RunDir(copy).lock():
                RunDir(copy).remove_temp_files()
                assert RunDir(copy).roll_forward() == (writes[n - 1] != "state.safetensors"), n
            assert_consistent(copy)
            code, out, err = cli(["train", "--resume", run_dir, "--threads", "1", "--no-progress"])
            assert code == 0, (n, err)
        else:
            code, out, err = cli(["train", "--resume", run_dir])
            one_line_error(code, err, "no config.json" if n == 1 else "has no saved training state")
            code, out, err = cli(train_cli_args("--out", run_dir))  # the same command again: a fresh start
            assert code == 0, (n, err)
        assert_consistent(run_dir)
        assert_same_run(run_dir, reference)


# ------------------------------------------------------------------------------------------- older runs
def strip_records(run_dir):
    """Make ``run_dir`` a run of an older vggnet: no card or checkpoint record inside the safetensors files."""
    for name in ("model.safetensors", "state.safetensors"):
        path = run_dir / name
        path.write_bytes(safetensors_bytes(load_tensors(path)))


def test_a_run_written_before_the_embedded_records_loads_and_resumes_exactly(train_run_one_epoch, train_run,
                                                                             tmp_path):
    old = tmp_path / "old"
    shutil.copytree(train_run_one_epoch["dir"], old)
    strip_records(old)
    assert RunDir(old).read_checkpoint() is None
    assert load(old).card.to_dict() == json.loads((old / "model.json").read_text())  # model.json is the card
    result = resume(old, epochs=2)  # from state.json, as before
    assert without_timing(result["history"]) == without_timing(train_run["result"]["history"])
    a, b = load_tensors(old / "model.safetensors"), load_tensors(train_run["dir"] / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert RunDir(old).read_checkpoint() is not None  # its new checkpoint is committed the new way


def test_the_card_inside_the_weights_wins_over_a_stale_model_json(train_run_copy):
    """model.json one epoch behind its weights (a kill between the two renames, or an edit): loading reads the
    card inside model.safetensors."""
    stale = json.loads((train_run_copy / "model.json").read_text())
    embedded = dict(stale)
    stale["metrics"] = {**stale["metrics"], "epoch": 0, "test_acc": 0.0}
    stale["classes"] = [f"old-{i}" for i in range(10)]
    (train_run_copy / "model.json").write_text(json.dumps(stale))
    loaded = load(train_run_copy)
    assert loaded.card.to_dict() == embedded and loaded.classes[0] == "T-shirt/top"


class Killed(BaseException):
    """Stands for a kill right after a commit's rename (nothing after it runs; no vggnet handler catches it)."""


def test_an_extension_cut_short_after_its_commit_is_completed_by_resume(train_run_copy, train_run, monkeypatch):
    """``--resume RUN --epochs 2`` killed right after epoch 2's commit: config.json still says 1 epoch, model.* and
    state.json hold epoch 1. The commit's configuration is the run's (2 epochs); a plain ``--resume`` trains nothing
    and brings every file up to the commit, equal to the run trained straight to 2 epochs."""
    def killed(self, *args, **kwargs):
        raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(RunDir, "_derive", killed)
        with pytest.raises(Killed):
            resume(train_run_copy, epochs=2)
    rundir = RunDir(train_run_copy)
    assert json.loads(rundir.config.read_text())["epochs"] == 1 and rundir.read_config()["epochs"] == 2
    assert json.loads(rundir.state.read_text())["run"]["epoch"] == 1 == load(train_run_copy).card.metrics.epoch
    result = resume(train_run_copy)
    assert result["epochs"] == 2 and json.loads(rundir.config.read_text())["epochs"] == 2
    assert_consistent(train_run_copy)
    # An extension keeps the schedule length it started with (1 epoch): schedule_epochs differs.
    assert_same_run(train_run_copy, train_run["dir"], differing=("out", "schedule_epochs"))
