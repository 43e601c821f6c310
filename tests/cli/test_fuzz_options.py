"""Fuzzing the numeric and path options of every verb (issue 14): whatever a user types, the CLI ends with exit
status 0, or 2 with exactly one line on stderr, never an "internal error" or a traceback.

The commands stop before real work: sources that do not exist, no data set to be found (``data_env``), and a bench
whose measuring is replaced. Values: huge, negative, NaN and infinite numbers, numbers in odd spellings, empty
strings, unicode, and the undecodable bytes a real command line can carry (``os.fsdecode``)."""

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vggnet.cli.bench as cli_bench
from vggnet.base.errors import ConfigError

VALUES = st.one_of(
    st.integers().map(str),
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.floats().map(repr),  # nan, inf, 1e308, -0.0, 5e-324 ...
    st.sampled_from(["", " ", "nan", "-inf", "1e308", "1e-320", "0x10", "1_000", " 7 ", "\u0663", "\u00b2", "9" * 5000,
                     "1\n2", "-", "=", "32x32", "8192x8192", "5x5", "fc6=4", "0-4", "0-99999", "cuda:1", "a,b", "M,M"]),
    st.text(st.characters(blacklist_characters="\x00"), max_size=12),  # no NUL: no command line holds one
    st.binary(max_size=8).filter(lambda b: b"\x00" not in b).map(os.fsdecode),  # bytes that may not be UTF-8
)

NOWHERE = "no-such-source"
# (the command up to the fuzzed value, the option or None for a positional argument)
CASES = {
    "summary": [(["summary", "vgg11"], o) for o in ("--input-size", "--in-channels", "--num-classes", "--width",
                                                     "--batch-size", "--memory-budget", "--head")]
               + [(["summary", "custom"], "--arch"), (["summary"], None)],
    "models": [(["models"], None)],
    "train": [(["train", "--no-progress", "--out", "run"], o) for o in (
        "--width", "--dropout", "--loaded-lr-scale", "--image-size", "--epochs", "--batch-size", "--lr", "--momentum",
        "--weight-decay", "--warmup-epochs", "--label-smoothing", "--grad-clip", "--crop-padding", "--erasing",
        "--val-split", "--subset", "--classes", "--seed", "--threads", "--device", "--freeze", "--init-from",
        "--dataset", "--data-dir", "--out", "--resume", "--budget")]
             + [(["train", "--no-progress", "--out", "run", "--model", "custom"], "--arch")],
    "eval": [(["eval", NOWHERE], o) for o in ("--batch-size", "--threads", "--device", "--scales", "--crops", "--out",
                                              "--dataset", "--data-dir")] + [(["eval"], None)],
    "predict": [(["predict", NOWHERE, "x.png"], o) for o in ("--top-k", "--threads", "--device")],
    "features": [(["features", NOWHERE, "x.png", "--layer", "relu1_1", "--out", "f.npy"], o)
                 for o in ("--batch-size", "--threads", "--out")],
    "explain": [(["explain", NOWHERE, "x.png", "--out", "ex"], o) for o in ("--alpha", "--threads", "--out")],
    "export": [(["export", NOWHERE, "--format", "torchscript", "--out", "m.pt"], o)
               for o in ("--tolerance", "--check-count", "--out", "--check-images")],
    "compress": [(["compress", NOWHERE, "--out", "c"], o) for o in ("--svd", "--svd-energy", "--batch-size",
                                                                    "--rounds", "--threads", "--out")],
    "data": [(["data", "info", "cifar10"], o) for o in ("--image-size", "--data-dir")] + [(["data", "info"], None)],
    "weights": [(["weights", "list"], "--dir"), (["weights", "info"], None)],
    "bench": [(["bench"], o) for o in ("--rounds", "--subset", "--threads", "--wait-idle", "--device", "--only")],
}


def argv_of(case, value):
    command, option = case
    return [*command, value] if option is None else [*command, f"{option}={value}"]


def assert_clean_exit(code, err):
    assert code in (0, 2), err
    assert "internal error" not in err and "Traceback" not in err, err
    if code == 2:
        assert len(err.strip().splitlines()) == 1, err


@pytest.fixture
def fuzz_cli(cli, data_env, tmp_path, monkeypatch):
    """The in-process CLI in a scratch folder, with no data set to find and no benchmark to run; the torch thread
    count (which --threads sets) is restored after every command."""
    def stop_before_measuring(config):
        raise ConfigError("stopped before measuring")

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("VGGNET_DEBUG", raising=False)
    monkeypatch.setattr(cli_bench, "run", stop_before_measuring)

    def run(argv):
        threads = torch.get_num_threads()
        try:
            return cli(argv)
        finally:
            torch.set_num_threads(threads)

    return run


FUZZ = settings(max_examples=120, deadline=None, database=None, derandomize=True,  # the same examples in every run
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.mark.parametrize("verb", sorted(CASES))
@FUZZ
@given(data=st.data())
def test_any_option_value_ends_cleanly(verb, data, fuzz_cli):
    case = data.draw(st.sampled_from(CASES[verb]), label="case")
    value = data.draw(VALUES.filter(lambda v: not v.startswith("folder:")), label="value")  # never scan a real tree
    code, _, err = fuzz_cli(argv_of(case, value))
    assert_clean_exit(code, err)


@FUZZ
@given(image=VALUES, top_k=VALUES)
def test_predict_on_a_real_run(image, top_k, fuzz_cli, train_run):
    """A real model: the image path and --top-k reach predict_files."""
    code, _, err = fuzz_cli(["predict", train_run["dir"], "--device", "cpu", "--threads", "1", f"--top-k={top_k}",
                             "--", image])
    assert_clean_exit(code, err)


@FUZZ
@given(target=VALUES, layer=VALUES)
def test_explain_on_a_real_run(target, layer, fuzz_cli, train_run, image_files, tmp_path):
    """A real model and image: --class and --layer reach Grad-CAM."""
    code, _, err = fuzz_cli(["explain", train_run["dir"], image_files["rgb"], "--out", tmp_path / "ex", "--device",
                             "cpu", "--threads", "1", "--no-progress", f"--class={target}", f"--layer={layer}"])
    assert_clean_exit(code, err)
