"""``--help`` names every option's default (for ``vggnet train``: the default recipe's, and each preset's that
differs), and ``VGGNET_DEBUG=1`` prints the traceback of a user's or the environment's error before its one line."""

import errno
import re

import pytest

import vggnet.cli.models as cli_models
from vggnet.base.errors import CheckpointError
from vggnet.training import PRESETS, TrainConfig, resolve_config

#: Options without a default: what they name has to be given (--arch for model custom, the run to --resume).
NO_DEFAULT = {"--arch", "--resume"}


def option_help(cli, verb):
    """``vggnet VERB --help`` as {option: its help text, whitespace collapsed}, for the options that take a value
    (switches, whose default is off, and --help itself left out)."""
    code, out, err = cli([verb, "--help"])
    assert code == 0, err
    options = out.split("\noptions:\n", 1)[1]
    entries = re.split(r"\n(?=  -)", "\n" + options)
    found = {}
    for entry in entries:
        match = re.match(r"\s*(--[\w-]+)( [A-Z{])?", entry)
        if match and match.group(2):  # a value follows the flag: not a switch
            found[match.group(1)] = " ".join(entry.split())
    return found


def shown(value):
    if value is None or value == []:
        return "none"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def test_every_train_option_that_takes_a_value_shows_its_default(cli):
    helps = option_help(cli, "train")
    assert {"--epochs", "--batch-size", "--lr", "--schedule", "--preset"} <= set(helps)
    missing = sorted(flag for flag, text in helps.items() if flag not in NO_DEFAULT and "default" not in text)
    assert missing == []


@pytest.mark.parametrize("field", ["epochs", "batch_size", "lr", "optimizer", "momentum", "weight_decay", "schedule",
                                   "warmup_epochs", "label_smoothing", "image_size", "normalize", "crop_padding",
                                   "erasing", "val_split", "seed", "init", "tta", "grad_clip", "model"])
def test_train_help_shows_the_default_recipes_value_and_each_presets_own(cli, field):
    """e.g. ``--epochs``: (default 15; --preset d2l 10, hour 34, paper 74), read from the resolved recipes."""
    text = option_help(cli, "train")["--" + field.replace("_", "-")]
    recipe = getattr(resolve_config(), field)
    match = re.search(r"\(default (\S+?)(?:; --preset ([^)]*))?\)", text)
    assert match is not None, text
    assert match.group(1) == shown(recipe)
    others = {name: shown(getattr(resolve_config(name), field)) for name in PRESETS
              if getattr(resolve_config(name), field) != recipe}
    listed = dict(item.split(" ", 1) for item in match.group(2).split(", ")) if match.group(2) else {}
    assert listed == others


def test_the_default_recipe_is_what_train_help_says_for_epochs_batch_and_lr(cli):
    """The numbers a reader of --help gets, against TrainConfig's own defaults (the fast preset changes none)."""
    helps = option_help(cli, "train")
    defaults = TrainConfig()
    assert f"(default {defaults.epochs};" in helps["--epochs"]
    assert f"(default {defaults.batch_size};" in helps["--batch-size"]
    assert f"(default {defaults.lr:g};" in helps["--lr"]
    assert "(default fast" in helps["--preset"]


def test_every_predict_option_that_takes_a_value_shows_its_default(cli):
    helps = option_help(cli, "predict")
    assert "(default 5)" in helps["--top-k"]
    missing = sorted(flag for flag, text in helps.items() if "default" not in text)
    assert missing == []


# ------------------------------------------------------------------------------------------------ VGGNET_DEBUG
@pytest.mark.parametrize("raised, status, line", [
    (CheckpointError("state.json is corrupt"), 2, "vggnet models: error: state.json is corrupt"),
    (OSError(errno.ENOSPC, "No space left on device"), 2, "vggnet models: error: No space left on device"),
])
def test_vggnet_debug_prints_the_traceback_then_the_one_line(raised, status, line, cli, monkeypatch):
    def run(args):
        raise raised

    monkeypatch.setenv("VGGNET_DEBUG", "1")
    monkeypatch.setattr(cli_models, "run", run)
    code, out, err = cli(["models"])
    lines = err.splitlines()
    assert (code, out) == (status, "")
    assert lines[0] == "Traceback (most recent call last):"
    assert "in run\n    raise raised" in err  # the frame that raised
    assert lines[-2].endswith(str(raised)) and lines[-1] == line


def test_vggnet_debug_traceback_of_a_real_user_error(cli, monkeypatch, tmp_path):
    monkeypatch.setenv("VGGNET_DEBUG", "1")
    code, out, err = cli(["eval", tmp_path / "nothing", "--device", "cpu"])
    lines = err.splitlines()
    assert code == 2 and lines[0] == "Traceback (most recent call last):"
    assert lines[-1].startswith("vggnet eval: error: ") and "nothing" in lines[-1]
    assert lines[-2].startswith("vggnet.base.errors.")  # the VggnetError subclass, named by the traceback

    monkeypatch.delenv("VGGNET_DEBUG")
    code, out, err2 = cli(["eval", tmp_path / "nothing", "--device", "cpu"])
    assert code == 2 and err2.splitlines() == [lines[-1]]  # without it, the one line alone
