"""A user's folder is never overwritten (issue 14): ``train --out`` writes only into a new folder, an empty one or
a run of vggnet's own without a checkpoint, refusing anything else in one line before any data loads; one process
at a time writes a run (a lock on RUN/.lock, released by the OS when its holder dies); ``vggnet eval`` writes beside
training's files (RUN/evals/NAME.json and .png), never over them nor into another run; writes fsync the folder
after their rename, and the temporary files a kill leaves are cleared. All on the CPU with the tiny run."""

import json
import os
import shutil
import signal
import stat
import subprocess
import sys

import pytest

from vggnet.base.errors import ConfigError
from vggnet.base.files import atomic_write_bytes, remove_temp_files
from vggnet.evaluation.multiscale import Protocol
from vggnet.store.rundir import RunDir
from vggnet.training import check_out, resume, train

TIMING = ("epoch_seconds", "train_images_per_second")
TIMEOUT_S = 120


def without_timing(history):
    return [{k: v for k, v in record.items() if k not in TIMING} for record in history]


def subprocess_env():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("VGGNET_DEBUG", None)
    return env


# ------------------------------------------------------------------------------------------------ --out
def foreign_user_files(folder):
    """The issue's case: a user's own config.json, metrics.csv and model.safetensors."""
    (folder / "config.json").write_text('{"learning_rate": 0.1}\n')
    (folder / "metrics.csv").write_text("step,loss\n1,0.5\n")
    (folder / "model.safetensors").write_bytes(b"my weights")


def compressed_model(folder):
    """A vggnet model that is not a training run (what vggnet compress writes): no config.json."""
    (folder / "model.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"weights")


def notes(folder):
    (folder / "notes.txt").write_text("mine")


@pytest.mark.parametrize("fill, shown", [(foreign_user_files, "config.json, metrics.csv, model.safetensors"),
                                         (compressed_model, "model.json, model.safetensors"),
                                         (notes, "notes.txt")])
def test_out_refuses_a_folder_it_did_not_write_before_any_data_loads(fill, shown, tmp_path, cli, one_line_error,
                                                                      train_cli_args, train_snapshot):
    folder = tmp_path / "mine"
    folder.mkdir()
    fill(folder)
    before = train_snapshot(folder)
    code, out, err = cli(train_cli_args("--out", folder, "--data-dir", tmp_path / "no-data-here"))
    one_line_error(code, err, f"--out {folder} is not empty ({shown}): vggnet train writes only into a new or empty "
                   "folder or a run of its own", "choose another --out")
    assert train_snapshot(folder) == before and sorted(p.name for p in folder.iterdir()) == sorted(before)


def test_out_refuses_a_file(tmp_path, cli, one_line_error, train_cli_args):
    (tmp_path / "file").write_text("x")
    code, out, err = cli(train_cli_args("--out", tmp_path / "file"))
    one_line_error(code, err, f"--out {tmp_path / 'file'} is a file")
    assert (tmp_path / "file").read_text() == "x"


def test_out_starts_in_an_empty_folder_and_again_in_its_own_run_that_has_no_checkpoint(
        tmp_path, train_options, train_run_one_epoch):
    """An empty folder is a new run's; so is a run killed before its first checkpoint (config.json, the killed
    write's temporary file, the dead holder's lock file): it starts again, clears the leftovers and computes the
    same run as one started fresh."""
    empty = tmp_path / "empty"
    empty.mkdir()
    train(**train_options(epochs=1, out=str(empty)))
    again = tmp_path / "again"
    again.mkdir()
    shutil.copy(train_run_one_epoch["dir"] / "config.json", again / "config.json")
    (again / ".state.safetensors.ab12cd34.tmp").write_bytes(b"half a state")
    (again / ".lock").write_text("4242424\n")  # its holder was killed: the OS released the lock, the file stays
    result = train(**train_options(epochs=1, out=str(again)))
    assert without_timing(result["history"]) == without_timing(train_run_one_epoch["result"]["history"])
    assert [p.name for p in again.iterdir() if p.name.startswith(".")] == []
    assert json.loads((again / "config.json").read_text())["out"] == str(again)
    board_only = tmp_path / "board-only" / "tensorboard"  # killed after --tensorboard's folder, before config.json
    board_only.mkdir(parents=True)
    check_out(RunDir(board_only.parent))


# ------------------------------------------------------------------------------------------------ the lock
def test_a_second_writer_is_refused_in_one_line_naming_the_holders_pid(tmp_path, train_run_copy, train_options,
                                                                        train_snapshot):
    """flock locks belong to an open file description: a second open and lock in this same process conflicts like
    another process would. Neither train nor resume writes anything then."""
    new = tmp_path / "new"
    with RunDir(new).lock(create=True):
        assert (new / ".lock").read_text() == f"{os.getpid()}\n"
        with pytest.raises(ConfigError, match=rf"^{new} is being written by another vggnet process \(pid "
                                              rf"{os.getpid()}, holding {new / '.lock'}\)"):
            train(**train_options(epochs=1, out=str(new)))
        assert [p.name for p in new.iterdir()] == [".lock"]
    assert not new.exists()  # the holder made the folder and leaves nothing behind
    before = train_snapshot(train_run_copy)
    with RunDir(train_run_copy).lock():
        with pytest.raises(ConfigError, match=f"pid {os.getpid()}"):
            resume(train_run_copy, epochs=2)
    assert train_snapshot(train_run_copy) == before


HOLDER = """
import sys, time
from vggnet.store.rundir import RunDir
with RunDir(sys.argv[1]).lock():
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_killed_holder_leaves_no_stale_lock(train_run_copy, cli, one_line_error):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(train_run_copy)], env=subprocess_env(),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        code, out, err = cli(["train", "--resume", train_run_copy, "--epochs", "2"])
        one_line_error(code, err, f"{train_run_copy} is being written by another vggnet process (pid {holder.pid}")
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=TIMEOUT_S)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert (train_run_copy / ".lock").read_text() == f"{holder.pid}\n"  # the file stays; its lock died with it
    code, out, err = cli(["train", "--resume", train_run_copy, "--epochs", "2", "--threads", "1"])
    assert code == 0, err
    assert not (train_run_copy / ".lock").exists()


def test_two_runs_started_into_one_folder_one_succeeds_and_the_other_says_why(tmp_path, train_cli_args):
    """The issue's lost run: both used to report success. Whichever comes second is refused in one line, by the
    lock while the first runs, or as a run that already holds a checkpoint after it."""
    folder = tmp_path / "shared"
    argv = [sys.executable, "-m", "vggnet", *train_cli_args("--out", folder)]
    procs = [subprocess.Popen(argv, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=TIMEOUT_S), *p.communicate()) for p in procs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], results
    err = next(err for code, _, err in results if code == 2)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "being written by another vggnet process" in err or f"{folder} already holds a run" in err, err
    assert json.loads((folder / "state.json").read_text())["run"]["epoch"] == 2


# ------------------------------------------------------------------------------------------------ eval
@pytest.mark.parametrize("protocol, tta, weights, dataset, name", [
    (None, None, "model", "fashion-mnist", "test"),
    (None, "flip", "model", "fashion-mnist", "test-flip"),
    (None, None, "best", "fashion-mnist", "best-test"),
    (Protocol((32, 36, 40), dense=True), None, "model", "fashion-mnist", "scales-32-36-40-dense"),
    (Protocol((32, 40), dense=True, crops=(5, 5), flip=True), None, "model", "fashion-mnist",
     "scales-32-40-dense-crops-5x5-flip"),
    (Protocol((32,), crops=(2, 3)), None, "best", "fashion-mnist", "best-scales-32-crops-2x3"),
    (None, None, "model", "folder:/data/my shots/", "test-on-folder-data-my-shots"),
])
def test_eval_names_its_files_by_what_it_measured(protocol, tta, weights, dataset, name):
    from vggnet.evaluation.source import eval_name

    assert eval_name(protocol, tta, weights, dataset, "fashion-mnist") == name


def test_eval_writes_beside_trainings_files_never_over_them(train_run_copy, train_data_dir, cli, train_snapshot):
    before = train_snapshot(train_run_copy)
    runs = {"test": [], "test-flip": ["--tta", "flip"], "scales-32-dense": ["--scales", "32"]}
    records = {}
    for name, extra in runs.items():
        code, out, err = cli(["eval", train_run_copy, "--data-dir", train_data_dir, "--device", "cpu", "--threads",
                              "1", "--json", *extra])
        assert code == 0, err
        records[name] = json.loads(out)
    after = train_snapshot(train_run_copy)
    written = {path: data for path, data in after.items() if path not in before}
    assert {path: data for path, data in after.items() if path in before} == before  # training's files untouched
    assert sorted(written) == sorted(f"evals/{name}.{ext}" for name in runs for ext in ("json", "png"))
    for name, record in records.items():
        assert json.loads(written[f"evals/{name}.json"]) == record
        assert written[f"evals/{name}.png"][:4] == b"\x89PNG"
    assert records["test"]["top1"] == json.loads(before["eval.json"])["top1"]  # the same weights, measured again
    code, out, err = cli(["eval", train_run_copy, "--data-dir", train_data_dir, "--device", "cpu", "--out",
                          train_run_copy])  # --out naming the run itself: the same place
    assert code == 0, err
    assert f"{train_run_copy / 'evals' / 'test.png'} and {train_run_copy / 'evals' / 'test.json'}" in out


def test_eval_never_writes_into_another_run(train_run_copy, train_run, tmp_path, cli, one_line_error,
                                            train_snapshot):
    before = train_snapshot(train_run_copy)
    code, out, err = cli(["eval", train_run["dir"], "--data-dir", tmp_path / "no-data-here", "--out", train_run_copy])
    one_line_error(code, err, f"--out {train_run_copy} is another run directory", "choose a folder that is not a run")
    assert train_snapshot(train_run_copy) == before


# ------------------------------------------------------------------------------------------------ files
def test_a_write_fsyncs_the_file_then_its_folder_after_the_rename(tmp_path, monkeypatch):
    import vggnet.base.files

    target = tmp_path / "x.json"
    target.write_bytes(b"old")
    synced = []
    real_fsync = os.fsync

    def record(fd):
        synced.append((stat.S_ISDIR(os.fstat(fd).st_mode), target.read_bytes()))
        real_fsync(fd)

    monkeypatch.setattr(vggnet.base.files.os, "fsync", record)
    atomic_write_bytes(target, b"new")
    assert synced == [(False, b"old"), (True, b"new")]  # the file's data, then the folder holding the rename


def test_only_vggnets_temporary_files_are_removed(tmp_path):
    names = [".model.json.ab12cd_z.tmp", ".state.safetensors.0123abcd.tmp", ".short.abc.tmp", "notes.tmp",
             ".model.json.ab12cd34.tmp.keep", "model.json"]
    for name in names:
        (tmp_path / name).write_text("x")
    (tmp_path / ".folder.abcdefgh.tmp").mkdir()
    assert remove_temp_files(tmp_path) == [".model.json.ab12cd_z.tmp", ".state.safetensors.0123abcd.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[2:] + [".folder.abcdefgh.tmp"])


def test_eval_of_a_run_being_trained_reads_one_version_of_its_weights(train_run_copy, monkeypatch):
    """The card and the tensors of a weights file come from one version of it: a file replaced between the header
    read and the tensor read is read again."""
    import vggnet.store.card as card_module
    from vggnet.base.files import safetensors_bytes

    real = card_module.read_safetensors
    replaced = []

    def replace_first(path):
        if not replaced:  # a training run renames a newer file into place just now
            replaced.append(path)
            tensors, metadata = real(path)
            card = json.loads(metadata[card_module.CARD_KEY])
            card["metrics"]["epoch"] = 2
            data = safetensors_bytes(tensors, {card_module.CARD_KEY: json.dumps(card)})
            atomic_write_bytes(path, data)
        return real(path)

    monkeypatch.setattr(card_module, "read_safetensors", replace_first)
    loaded = RunDir(train_run_copy).load()
    assert replaced and loaded.card.metrics.epoch == 2
