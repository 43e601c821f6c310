"""No "internal error" for a user's or the environment's mistake (issue 14): option bounds at parse time and in
TrainConfig.validate, hand-edited config.json and state records (state.safetensors) on resume, OSError and
out-of-memory as one line with exit status 2, multi-line messages collapsed, and file names that are not UTF-8
printed without a crash."""

import dataclasses
import errno
import json
import math
import sys

import pytest

import vggnet.cli.models as cli_models
from vggnet.base.errors import CheckpointError, ConfigError
from vggnet.base.files import read_safetensors, safetensors_bytes
from vggnet.store.checkpoint import CHECKPOINT_KEY, STATE_COUNTERS
from vggnet.training import resolve_config, resume
from vggnet.training.config import RANGES, Range
from vggnet.store.checkpoint import RunState


# ------------------------------------------------------------------------------------------------ Range
@pytest.mark.parametrize("allowed, value, problem", [
    (Range(1, 10, integer=True), 0, "must be >= 1, got 0"),
    (Range(1, 10, integer=True), 11, "must be <= 10, got 11"),
    (Range(1, 10, integer=True), 10, None),
    (Range(1, 10, integer=True), 2.0, "must be an integer, got 2.0"),
    (Range(1, 10, integer=True), True, "must be an integer, got True"),
    (Range(1, 10, integer=True), "5", "must be an integer, got '5'"),
    (Range(0, 1e6, open_low=True), 0.0, "must be > 0, got 0.0"),
    (Range(0, 1e6, open_low=True), 1e6, None),
    (Range(0, 1e6, open_low=True), 1e308, "must be <= 1000000, got 1e+308"),
    (Range(0, 1e6, open_low=True), math.nan, "must be a finite number, got nan"),
    (Range(0, 1e6, open_low=True), -math.inf, "must be a finite number, got -inf"),
    (Range(0, 1, open_high=True), 1.0, "must be in [0, 1), got 1.0"),  # a fraction: its interval
    (Range(0, 1, open_low=True), 0, "must be in (0, 1], got 0"),
    (Range(0, 1), 1, None),
    (Range(0, 2**32 - 1, integer=True), 2**70, "must be <= 4294967295, got 1180591620717411303424"),
    pytest.param(Range(0, 10, integer=True), -10**5000, "must be >= 0, got an integer of about 5000 digits",
                 id="5000-digits"),  # str() of it would raise
])
def test_range_problem_says_what_is_wrong(allowed, value, problem):
    assert allowed.problem(value) == problem


# ------------------------------------------------------------------------------------------------ parse time
@pytest.mark.parametrize("argv, fragment", [
    (["summary", "vgg11", "--width", "17"], "argument --width: must be <= 16, got 17.0"),
    (["summary", "vgg11", "--width", "inf"], "argument --width: must be a finite number, got inf"),
    (["summary", "vgg11", "--in-channels", "8193"], "argument --in-channels: must be <= 8192, got 8193"),
    (["summary", "vgg11", "--num-classes", "100001"], "argument --num-classes: must be <= 100000, got 100001"),
    (["summary", "vgg11", "--input-size", "8193x32"], "at most 8192 pixels a side, got '8193x32'"),
    (["summary", "vgg11", "--batch-size", "1048577"], "argument --batch-size: must be <= 1048576, got 1048577"),
    (["summary", "vgg11", "--batch-size", "2" * 5000], "is too long for a number"),
    (["summary", "vgg11", "--memory-budget", "1048577TiB"], "'1048577TiB' is more than 1152921504606846976 bytes"),
    (["summary", "custom", "--arch", "conv999-8"], "kernel 999: channels must be >= 1 and <= 8192, the kernel odd "
                                                   "and <= 15"),
    (["summary", "custom", "--arch", "8193,M"], "convolution 8193 channels"),
    (["summary", "custom", "--arch", "1" * 5000], "is not a layer"),
    (["eval", "nowhere", "--scales", "32,8193"], "argument --scales: '32,8193': test scales (pixels) are at most 8192"),
    (["eval", "nowhere", "--scales", "3" * 5000], "test scales (pixels) are at most 8192"),
    (["eval", "nowhere", "--crops", "65x5"], "'65x5': the grid's rows and columns are at most 64"),
    (["eval", "nowhere", "--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    (["eval", "nowhere", "--device", "cuda:99999999999999999999"], "argument --device: must be auto, cpu, cuda or "
                                                                    "cuda:N, got 'cuda:99999999999999999999'"),
    (["predict", "nowhere", "x.png", "--top-k", "100001"], "argument --top-k: must be <= 100000, got 100001"),
    (["predict", "nowhere", "x.png", "--threads", "1025"], "argument --threads: must be <= 1024, got 1025"),
    (["features", "nowhere", "x.png", "--layer", "relu1_1", "--out", "f.npy", "--batch-size", "-3"],
     "argument --batch-size: must be >= 1, got -3"),
    (["explain", "nowhere", "x.png", "--out", "d", "--alpha", "nan"], "argument --alpha: must be a finite number"),
    (["export", "nowhere", "--format", "onnx", "--out", "m.onnx", "--tolerance", "2"],
     "argument --tolerance: must be in (0, 1], got 2.0"),
    (["export", "nowhere", "--format", "onnx", "--out", "m.onnx", "--check-count", "0"], "must be >= 1, got 0"),
    (["compress", "nowhere", "--out", "c", "--svd", "fc6=" + "9" * 30], "ranks are at most 1000000"),
    (["compress", "nowhere", "--out", "c", "--svd-energy", "0"], "argument --svd-energy: must be in (0, 1], got 0.0"),
    (["compress", "nowhere", "--out", "c", "--rounds", "10001"], "argument --rounds: must be <= 10000, got 10001"),
    (["bench", "--wait-idle", "nan"], "argument --wait-idle: must be a finite number, got nan"),
    (["bench", "--subset", "0"], "argument --subset: must be >= 1, got 0"),
    (["bench", "--device", "gpu"], "argument --device: must be auto, cpu, cuda or cuda:N, got 'gpu'"),
    (["data", "info", "fashion-mnist", "--image-size", "8193"], "argument --image-size: must be <= 8192, got 8193"),
    (["train", "--width", "nan"], "argument --width: must be a finite number, got nan"),
    (["train", "--lr", "x"], "argument --lr: 'x' is not a number"),
    (["train", "--seed", "1.5"], "argument --seed: '1.5' is not an integer"),
    (["train", "--scale-jitter", "0.5", "2"], "argument --scale-jitter: must be in (0, 1], got 2.0"),
    (["train", "--classes", "0-100000"], "at most 100000 classes, indices 0 to 99999"),
    (["train", "--classes", "5" * 5000], "is not a class list"),
    (["models", "vgg16", "a\nb"], "unrecognized arguments: a b"),  # argparse's own message, newline and all
])
def test_options_out_of_bounds_are_refused_at_parse_time(argv, fragment, cli, one_line_error, tmp_path,
                                                         monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(argv)
    one_line_error(code, err, fragment)
    assert out == "" and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("option, value, fragment", [
    ("--lr", "1e308", "--lr must be <= 1000000, got 1e+308"),  # was: RuntimeError from a float32 overflow
    ("--seed", str(2**70), "--seed must be <= 4294967295, got 1180591620717411303424"),  # was: torch's overflow
    ("--epochs", str(10**20), "--epochs must be <= 1000000, got 100000000000000000000"),  # was: accepted
    ("--epochs", "0", "--epochs must be >= 1, got 0"),
    ("--image-size", "8193", "--image-size must be <= 8192, got 8193"),
    ("--batch-size", "1048577", "--batch-size must be <= 1048576, got 1048577"),
    ("--weight-decay", "2", "--weight-decay must be in [0, 1], got 2.0"),
    ("--warmup-epochs", "1e7", "--warmup-epochs must be <= 1000000, got 10000000.0"),
    ("--crop-padding", "8193", "--crop-padding must be <= 8192, got 8193"),
    ("--grad-clip", "0", "--grad-clip must be > 0, got 0.0"),
    ("--val-split", "-1", "--val-split must be >= 0, got -1"),
    ("--threads", "1025", "--threads must be <= 1024, got 1025"),
    ("--width", "16.5", "--width must be <= 16, got 16.5"),
    ("--arch", "8,M,conv4-8", "kernel 4: channels must be >= 1 and <= 8192, the kernel odd and <= 15"),
])
def test_train_options_out_of_range_fail_before_any_work(option, value, fragment, cli, one_line_error, tmp_path,
                                                        train_cli_args):
    code, out, err = cli(train_cli_args("--out", tmp_path / "run") + [option, value])
    one_line_error(code, err, fragment)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides, message", [
    (dict(flip="yes"), "flip must be true or false, got 'yes'"),
    (dict(batch_norm=1), "batch_norm must be true, false or null, got 1"),
    (dict(dataset=5), "--dataset must be a string, got 5"),
    (dict(data_dir=["a"]), "--data-dir must be a string, got ['a']"),
    (dict(model=["vgg11"]), "--model must be a string, got ['vgg11']"),
    (dict(device="cuda:99999"), "--device must be auto, cpu, cuda or cuda:N, got 'cuda:99999'"),
    (dict(lr="0.1"), "--lr must be a number, got '0.1'"),
    (dict(epochs=2.0), "--epochs must be an integer, got 2.0"),
    (dict(seed=-1), "--seed must be >= 0, got -1"),
    (dict(plateau_patience=-1), "plateau_patience must be >= 0, got -1"),
    (dict(arch=7, model="custom"), "--arch must be a string or a list of layer tokens, got 7"),
    (dict(scale_jitter=(0.9, 0.5)), "--scale-jitter must be two fractions of the side, 0 < LO <= HI <= 1"),
    (dict(classes=[0, 100000]), "--classes must be a list of class indices in 0..99999, got [0, 100000]"),
    (dict(classes="0-4"), "--classes must be a list of class indices"),
    (dict(init_from="runs/a", loaded_lr_scale=101.0), "--loaded-lr-scale must be <= 100, got 101.0"),
])
def test_validate_refuses_wrong_types_and_values_for_api_users(overrides, message):
    with pytest.raises(ConfigError) as err:
        resolve_config(**overrides)
    assert str(err.value) == message or str(err.value).startswith(message)


def test_ranges_cover_every_numeric_option():
    """Every int/float field of TrainConfig has a range (a new numeric option needs one)."""
    from vggnet.training import TrainConfig

    numeric = {f.name for f in dataclasses.fields(TrainConfig) if f.type.split(" |")[0] in ("int", "float")}
    assert numeric == set(RANGES)


# ------------------------------------------------------------------------------------------------ resume
@pytest.mark.parametrize("edit, fragment", [
    ({"lr": "0.1"}, "--lr must be a number, got '0.1'"),
    ({"lr": 1e308}, "--lr must be <= 1000000"),
    ({"epochs": 2.5}, "--epochs must be an integer, got 2.5"),
    ({"seed": 2**70}, "--seed must be <= 4294967295"),
    ({"flip": "no"}, "flip must be true or false, got 'no'"),
    ({"dataset": 5}, "--dataset must be a string, got 5"),
    ({"scale_jitter": 5}, "--scale-jitter must be two fractions"),
    ({"arch": "8,M,conv999-16,M"}, "convolution 16 channels, kernel 999"),
    ({"schedule_epochs": "x"}, "schedule_epochs must be an integer, got 'x'"),
    ({"nosuch": 1}, "unknown training option(s) ['nosuch']"),
])
def test_resume_refuses_a_hand_edited_config_json(edit, fragment, train_run_copy, cli, one_line_error,
                                                  train_snapshot):
    path = train_run_copy / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    before = train_snapshot(train_run_copy)
    code, out, err = cli(["train", "--resume", train_run_copy, "--epochs", "2"])
    one_line_error(code, err, f"{path} holds an invalid configuration: {fragment}")
    assert train_snapshot(train_run_copy) == before


def test_resume_refuses_a_config_json_that_is_not_an_object(train_run_copy):
    (train_run_copy / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="config.json holds an invalid configuration: a training configuration "
                                              "must be a JSON object, got list"):
        resume(train_run_copy)


@pytest.mark.parametrize("epochs, message", [
    (10**20, "--epochs must be <= 1000000, got 100000000000000000000"),
    (2.0, "--epochs must be an integer, got 2.0"),
    (1, "--epochs 1 is not beyond the 1 epoch(s)"),
])
def test_resume_checks_a_new_epoch_total_as_an_option_not_as_config_json(epochs, message, train_run_copy):
    with pytest.raises(ConfigError) as err:
        resume(train_run_copy, epochs)
    assert not isinstance(err.value, CheckpointError) and str(err.value).startswith(message)


@pytest.mark.parametrize("edit, fragment", [
    (lambda s: s["run"].update(epoch="1"), "run.epoch must be an integer >= 0, got '1'"),
    (lambda s: s["run"].update(step=-4), "run.step must be an integer >= 0, got -4"),
    (lambda s: s["run"].pop("batch"), "run.batch is missing"),
    (lambda s: s["run"].update(loss_sum=None), "run.loss_sum must be a number, got None"),
    (lambda s: s["run"].update(plateau=[]), "run.plateau must be an object, got []"),
    (lambda s: s["run"]["plateau"].update(scale=0), "run.plateau.scale must be a positive number, got 0"),
    (lambda s: s["run"]["plateau"].update(speed=1), "run.plateau must hold the numbers of a plateau schedule"),
    (lambda s: s.pop("optimizer"), "optimizer must be an object with param_groups"),
    (lambda s: s["optimizer"].update(param_groups={}), "optimizer must be an object with param_groups"),
    (lambda s: s.update(history=5), "history must be a list of epoch records of numbers"),
    (lambda s: s["history"][0].update(test_acc="high"), "history must be a list of epoch records of numbers"),
    (lambda s: s["history"].append({"epoch": 2}), "history's epoch records must all have the same fields"),
    (lambda s: s.update(scaler=3), "scaler must be an object, got 3"),
])
def test_resume_refuses_a_hand_edited_state_record(edit, fragment, train_run_copy, cli, one_line_error,
                                                   train_snapshot):
    """The record resume reads is the one committed inside state.safetensors (state.json mirrors it)."""
    path = train_run_copy / "state.safetensors"
    tensors, metadata = read_safetensors(path)
    checkpoint = json.loads(metadata[CHECKPOINT_KEY])
    edit(checkpoint["state"])
    path.write_bytes(safetensors_bytes(tensors, {CHECKPOINT_KEY: json.dumps(checkpoint)}))
    before = train_snapshot(train_run_copy)
    code, out, err = cli(["train", "--resume", train_run_copy, "--epochs", "2"])
    one_line_error(code, err, f"{path} is corrupt ({fragment}", "start the run again")
    assert train_snapshot(train_run_copy) == before


def test_state_counters_are_the_loops_run_state():
    """rundir checks state.json against STATE_COUNTERS: they must stay the fields of the loop's RunState."""
    assert set(STATE_COUNTERS) == {f.name for f in dataclasses.fields(RunState)}


# ------------------------------------------------------------------------------------------------ main's last line
@pytest.mark.parametrize("raised, status, line", [
    (PermissionError(errno.EACCES, "Permission denied", "/data/x"), 2,
     "vggnet models: error: cannot access /data/x: Permission denied"),
    (OSError(errno.ENOSPC, "No space left on device", "/out/y.json"), 2,
     "vggnet models: error: cannot write /out/y.json: No space left on device"),
    (OSError(errno.EROFS, "Read-only file system", "/ro/z"), 2,
     "vggnet models: error: cannot write /ro/z: Read-only file system"),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", b"/f\xff/x"), 2,
     "vggnet models: error: cannot access /f\\udcff/x: Not a directory"),  # bytes name, not UTF-8
    (OSError(errno.ENOSPC, "No space left on device"), 2, "vggnet models: error: No space left on device"),
    (MemoryError(), 2, "vggnet models: error: out of memory: use a smaller batch, image size or model"),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
                  "tried to allocate 8 bytes.\nframe #0: c10::Error"), 2,
     "vggnet models: error: out of memory ([enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't "
     "allocate memory: you tried to allocate 8 bytes.): use a smaller batch, image size or model"),
    (CheckpointError("state.json does not fit:\n\tMissing key(s): a\n  b"), 2,
     "vggnet models: error: state.json does not fit: Missing key(s): a b"),
    (ValueError("a bug\nframe #0"), 1,
     "vggnet models: internal error: ValueError: a bug (set VGGNET_DEBUG=1 for the traceback)"),
])
def test_main_turns_what_escapes_into_one_line(raised, status, line, cli, monkeypatch):
    def run(args):
        raise raised

    monkeypatch.delenv("VGGNET_DEBUG", raising=False)
    monkeypatch.setattr(cli_models, "run", run)
    code, out, err = cli(["models"])
    assert (code, out, err) == (status, "", line + "\n")


def test_a_file_name_that_is_not_utf8_is_a_user_error(cli, monkeypatch):
    name = b"caf\xe9/im.png".decode("utf-8", "surrogateescape")  # what os.listdir gives for those bytes

    def run(args):
        name.encode("utf-8")  # code that meant to encode text met the name

    monkeypatch.setattr(cli_models, "run", run)
    code, out, err = cli(["models"])
    assert (code, err) == (2, "vggnet models: error: caf\\udce9/im.png is not valid UTF-8 (a file or folder name with "
                              "bytes that do not decode): rename it\n")


def test_a_path_that_is_too_long_is_one_line(cli, one_line_error, tmp_path, train_cli_args):
    long = tmp_path / ("x" * 300)  # longer than a name may be (255 bytes)
    code, out, err = cli(train_cli_args("--out", long))
    one_line_error(code, err, f"cannot access {long}: File name too long")


def test_writers_name_the_file_they_cannot_write(cli, one_line_error, train_run, train_data_dir, tmp_path,
                                                 monkeypatch):
    import vggnet.base.files

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(vggnet.base.files.os, "fsync", full_disk)
    out = tmp_path / "ev"
    code, _, err = cli(["eval", train_run["dir"], "--data-dir", train_data_dir, "--device", "cpu", "--threads", "1",
                        "--out", out, "--json"])
    one_line_error(code, err, f"cannot write {out / 'eval.json'}: No space left on device")
    assert [p.name for p in out.iterdir()] == []  # no temporary file left behind


def test_a_folder_through_a_file_is_one_line(cli, one_line_error, train_run, train_data_dir, tmp_path):
    (tmp_path / "file").write_text("")
    code, _, err = cli(["eval", train_run["dir"], "--data-dir", train_data_dir, "--device", "cpu", "--threads", "1",
                        "--out", tmp_path / "file" / "ev", "--json"])
    one_line_error(code, err, f"cannot create the folder {tmp_path / 'file' / 'ev'}")


def test_paths_that_are_not_utf8_print_on_a_strict_stdout(cli, train_run, image_files, tmp_path):
    """capsys's stdout is strict UTF-8, like a terminal's: the file's name comes back as a backslash escape."""
    picture = tmp_path / b"x\xff.png".decode("utf-8", "surrogateescape")
    picture.write_bytes(image_files["rgb"].read_bytes())
    assert sys.stdout.errors == "strict"
    code, out, err = cli(["predict", train_run["dir"], picture, "--device", "cpu", "--threads", "1", "--top-k", "1",
                          "--precision", "fp32"])  # auto would print its choice on stderr
    assert (code, err) == (0, "")
    assert out.startswith(f"{tmp_path}/x\\udcff.png: ") and out.count("\n") == 1
    assert sys.stdout.errors == "strict"  # restored for whoever prints next
