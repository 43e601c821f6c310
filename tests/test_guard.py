"""The one output guard (:mod:`vggnet.base.guard`): a verb never replaces a file it did not write, never writes over
one of its inputs, and says so in one line before any work. Unit tests of the three checks, then the two bugs it
closes, through the CLI: ``explain IMAGE --out <the image's own folder>`` overwrote the image, and
``export --out notes.txt`` replaced an unrelated file without a word; then each verb's own-output rule."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from vggnet.base.errors import OutputError
from vggnet.base.guard import json_of, new_folder, output_file, output_folder

CPU = ["--device", "cpu", "--threads", "1"]


# ------------------------------------------------------------------------------------------------ output_file
def test_output_file_accepts_a_new_file_and_leaves_the_folder_alone(tmp_path):
    assert output_file(tmp_path / "new.json") == tmp_path / "new.json"
    assert list(tmp_path.iterdir()) == []


def test_output_file_refuses_a_bad_place_in_one_line(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("x")
    for path, message in [
        (tmp_path / "folder", f"cannot write {tmp_path}/folder: it is a folder; give a file name, e.g. "
                              f"{tmp_path}/folder/model.onnx"),
        (tmp_path / "missing" / "f", f"cannot write {tmp_path}/missing/f: the folder {tmp_path}/missing does not "
                                     "exist (create it first)"),
        (tmp_path / "file" / "f", f"cannot write {tmp_path}/file/f: the folder {tmp_path}/file is a file, not a "
                                  "folder"),
    ]:
        with pytest.raises(OutputError) as caught:
            output_file(path, example="model.onnx")
        assert str(caught.value) == message


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into read-only folders")
def test_output_file_refuses_a_read_only_folder(tmp_path):
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o500)
    try:
        with pytest.raises(OutputError, match="the folder .*ro is not writable"):
            output_file(tmp_path / "ro" / "f")
    finally:
        (tmp_path / "ro").chmod(0o700)


def test_output_file_replaces_only_what_owned_recognises(tmp_path):
    mine, theirs = tmp_path / "mine.json", tmp_path / "theirs.json"
    mine.write_text("{}")
    theirs.write_text("{}")
    assert output_file(mine, owned=lambda p: p.name == "mine.json") == mine
    with pytest.raises(OutputError, match=f"^cannot write {theirs}: a file is there that vggnet bench did not write; "
                                          "choose another name, or move that file away first$"):
        output_file(theirs, owned=lambda p: p.name == "mine.json", writer="vggnet bench")
    with pytest.raises(OutputError, match="did not write"):
        output_file(theirs)  # no owned test: nothing is replaced


def test_an_owned_test_that_fails_means_not_owned(tmp_path):
    (tmp_path / "f").write_text("x")

    def broken(path):
        raise ValueError("cannot tell")

    with pytest.raises(OutputError, match="did not write"):
        output_file(tmp_path / "f", owned=broken)


def test_a_dangling_symlink_is_not_replaced(tmp_path):
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    with pytest.raises(OutputError, match="did not write"):
        output_file(tmp_path / "link")


@pytest.mark.parametrize("spell", ["same", "relative", "hard link", "symlink"])
def test_output_file_never_writes_over_an_input_however_it_is_spelt(tmp_path, monkeypatch, spell):
    image = tmp_path / "a.png"
    image.write_bytes(b"pixels")
    out = {"same": image, "relative": "a.png", "hard link": tmp_path / "b.png", "symlink": tmp_path / "c.png"}[spell]
    monkeypatch.chdir(tmp_path)
    if spell == "hard link":
        os.link(image, out)
    elif spell == "symlink":
        out.symlink_to(image)
    with pytest.raises(OutputError, match=f"it is the input {image}, which vggnet never writes over; choose another"):
        output_file(out, inputs=[image], owned=lambda p: True)  # an input is refused even when it looks owned


def test_an_input_that_does_not_exist_yet_is_matched_by_path(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(OutputError, match="it is the input"):
        output_file(tmp_path / "x" / ".." / "new.npy", inputs=[tmp_path / "new.npy"])


# ------------------------------------------------------------------------------------------------ output_folder
def test_output_folder_creates_only_when_asked(tmp_path):
    assert output_folder(tmp_path / "a" / "b", names=["x.png"], create=False) == tmp_path / "a" / "b"
    assert not (tmp_path / "a").exists()
    assert output_folder(tmp_path / "a" / "b", names=["x.png"]).is_dir()


def test_output_folder_refuses_a_file_in_place_of_the_folder_or_above_it(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match=f"^cannot write into {tmp_path / 'file'}: it is an existing file, not a "
                                          "folder; name a folder"):
        output_folder(tmp_path / "file")
    with pytest.raises(OutputError, match=f"cannot create the folder {tmp_path / 'file' / 'sub'}: "
                                          f"{tmp_path / 'file'} is a file, not a folder"):
        output_folder(tmp_path / "file" / "sub", create=False)
    assert (tmp_path / "file").read_text() == "x"


def test_output_folder_checks_every_name_and_leaves_other_files_alone(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.png").write_bytes(b"old")
    (out / "notes.txt").write_text("mine")
    (out / "dir.png").mkdir()
    owned = {"mine.png"}.__contains__
    assert output_folder(out, names=["mine.png", "new.png"], owned=lambda p: owned(p.name)) == out
    with pytest.raises(OutputError, match=f"^cannot write {out / 'notes.txt'}: a file is there that vggnet explain "
                                          "did not write; choose another --out folder, or move that file away first$"):
        output_folder(out, names=["new.png", "notes.txt"], owned=lambda p: owned(p.name), writer="vggnet explain")
    with pytest.raises(OutputError, match="a folder of that name is in the way"):
        output_folder(out, names=["dir.png"], owned=lambda p: True)
    with pytest.raises(OutputError, match=f"cannot write {out / 'mine.png'}: it is the input"):
        output_folder(out, names=["mine.png"], inputs=[out / "mine.png"], owned=lambda p: True)
    assert (out / "notes.txt").read_text() == "mine" and (out / "mine.png").read_bytes() == b"old"


# ------------------------------------------------------------------------------------------------ new_folder
def test_new_folder_takes_a_new_or_empty_folder_and_creates_nothing(tmp_path):
    assert new_folder(tmp_path / "new", hint="h") == tmp_path / "new" and not (tmp_path / "new").exists()
    (tmp_path / "empty").mkdir()
    assert new_folder(tmp_path / "empty", hint="h") == tmp_path / "empty"


def test_new_folder_refuses_a_file_and_a_full_folder_naming_what_is_there(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match=f"^--out {tmp_path / 'file'} is a file: do this$"):
        new_folder(tmp_path / "file", hint="do this")
    full = tmp_path / "full"
    full.mkdir()
    for name in "dcba":
        (full / name).write_text(name)
    with pytest.raises(OutputError, match=rf"^--out {full} is not empty \(a, b, c, \.\.\.\): do this$"):
        new_folder(full, hint="do this")
    with pytest.raises(OutputError, match=r"is not empty \(d\)"):
        new_folder(full, hint="do this", blocking=lambda names: [n for n in names if n == "d"])
    assert new_folder(full, hint="h", blocking=lambda names: []) == full  # the verb's own rule lets it in
    assert new_folder(full, hint="h", contents=lambda path: []) == full  # nothing that counts is there
    assert sorted(p.name for p in full.iterdir()) == ["a", "b", "c", "d"]


def test_json_of_never_fails(tmp_path):
    (tmp_path / "good.json").write_text('{"a": 1}')
    (tmp_path / "bad.json").write_text("{")
    (tmp_path / "big.json").write_text("[" + "0, " * 100 + "0]")
    assert json_of(tmp_path / "good.json") == {"a": 1}
    assert json_of(tmp_path / "bad.json") is None and json_of(tmp_path / "missing") is None
    assert json_of(tmp_path) is None and json_of(tmp_path / "big.json", limit=100) is None


# ------------------------------------------------------------------------------------------------ the two bugs
@pytest.fixture
def grey_image(tmp_path):
    folder = tmp_path / "pictures"
    folder.mkdir()
    path = folder / "bag.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)).save(path)
    return path


def test_explain_into_the_images_own_folder_leaves_the_image_as_it_was(cli, one_line_error, train_run, grey_image):
    """The bug: the PNG of pictures/bag.png is pictures/bag.png, so --out pictures wrote the heat map over it."""
    before = grey_image.read_bytes()
    code, _, err = cli(["explain", train_run["dir"], grey_image, "--out", grey_image.parent, *CPU, "--no-progress"])
    one_line_error(code, err, f"cannot write {grey_image}: it is the input {grey_image}", "choose another --out")
    assert grey_image.read_bytes() == before
    assert sorted(p.name for p in grey_image.parent.iterdir()) == ["bag.png"]


def test_export_over_an_unrelated_file_leaves_it_as_it_was(cli, one_line_error, train_run, tmp_path):
    """The bug: export --out notes.txt replaced the user's notes (train and compress refuse the same thing)."""
    notes = tmp_path / "notes.txt"
    notes.write_bytes(b"my notes\n")
    code, _, err = cli(["export", train_run["dir"], "--format", "torchscript", "--out", notes])
    one_line_error(code, err, f"cannot write {notes}: a file is there that vggnet export did not write")
    assert notes.read_bytes() == b"my notes\n" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


# ------------------------------------------------------------------------------------------------ own outputs
def test_export_replaces_its_own_export_but_not_a_foreign_card(cli, one_line_error, train_run, tmp_path):
    out = tmp_path / "m.pt"
    args = ["export", train_run["dir"], "--format", "torchscript", "--check-count", "4", "--out", out]
    assert cli(args)[0] == 0
    card = json.loads((tmp_path / "m.pt.json").read_text())
    assert cli(args)[0] == 0  # the card beside it says vggnet export wrote m.pt: an export again replaces both
    assert json.loads((tmp_path / "m.pt.json").read_text())["check"] == card["check"]
    other = tmp_path / "other.pt"
    (tmp_path / "other.pt.json").write_text('{"my": "settings"}')
    code, _, err = cli(["export", train_run["dir"], "--format", "torchscript", "--out", other])
    one_line_error(code, err, f"cannot write {tmp_path / 'other.pt.json'}: a file is there that vggnet export")
    assert not other.exists() and (tmp_path / "other.pt.json").read_text() == '{"my": "settings"}'
    code, _, err = cli(["export", train_run["dir"], "--format", "torchscript", "--out", tmp_path / "x.pt",
                        "--check-images", tmp_path / "x.pt"])
    one_line_error(code, err, f"cannot write {tmp_path / 'x.pt'}: it is the input")


def test_explain_runs_again_into_its_own_folder_but_not_over_a_users_png(cli, one_line_error, train_run, grey_image,
                                                                         tmp_path):
    out = tmp_path / "out"
    args = ["explain", train_run["dir"], grey_image, "--out", out, *CPU, "--no-progress"]
    assert cli(args)[0] == 0
    assert cli(args)[0] == 0  # bag.png is listed in out/explain.json and carries explain's mark
    other = tmp_path / "other"
    other.mkdir()
    Image.new("RGB", (4, 4)).save(other / "bag.png")
    before = (other / "bag.png").read_bytes()
    code, _, err = cli(["explain", train_run["dir"], grey_image, "--out", other, *CPU, "--no-progress"])
    one_line_error(code, err, f"cannot write {other / 'bag.png'}: a file is there that vggnet explain did not write")
    assert (other / "bag.png").read_bytes() == before and sorted(p.name for p in other.iterdir()) == ["bag.png"]


def test_an_explain_png_dropped_from_the_listing_is_still_explains(cli, train_run, grey_image, tmp_path):
    """A later run's explain.json no longer lists an earlier run's PNG; its mark still says whose it is."""
    out = tmp_path / "out"
    second = tmp_path / "second.png"
    second.write_bytes(grey_image.read_bytes())
    for image in (grey_image, second, grey_image):
        assert cli(["explain", train_run["dir"], image, "--out", out, *CPU, "--no-progress"])[0] == 0
    assert Image.open(out / "bag.png").info["Software"] == "vggnet explain"


@pytest.mark.parametrize("out, spoil, refused", [
    ("f.npy", lambda path: path.with_name("f.npy.json").unlink(), "f.npy"),  # a .npy without its metadata
    ("f.npy", lambda path: path.with_name("f.npy.json").write_text("mine"), "f.npy"),  # metadata not features'
    ("f.safetensors", lambda path: path.write_bytes(b"not safetensors"), "f.safetensors"),
])
def test_features_replaces_its_own_output_only(cli, one_line_error, train_run, grey_image, tmp_path, out, spoil,
                                               refused):
    path = tmp_path / out
    args = ["features", train_run["dir"], grey_image, "--layer", "pool1", "--out", path, *CPU, "--no-progress"]
    assert cli(args)[0] == 0
    assert cli(args)[0] == 0  # its metadata says vggnet features wrote it
    spoil(path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    code, _, err = cli(args)
    one_line_error(code, err, f"cannot write {tmp_path / refused}: a file is there that vggnet features did not write")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


def test_a_features_sidecar_that_is_not_its_own_is_refused(cli, one_line_error, train_run, grey_image, tmp_path):
    (tmp_path / "f.npy.json").write_text("mine")
    code, _, err = cli(["features", train_run["dir"], grey_image, "--layer", "pool1", "--out", tmp_path / "f.npy",
                        *CPU, "--no-progress"])
    one_line_error(code, err, f"cannot write {tmp_path / 'f.npy.json'}: a file is there that vggnet features")
    assert not (tmp_path / "f.npy").exists() and (tmp_path / "f.npy.json").read_text() == "mine"


def test_bench_out_replaces_an_earlier_bench_json_only(tmp_path, capsys, monkeypatch):
    import vggnet.cli.bench as cli_bench
    from vggnet.cli import main

    results = {"schema": 1, "quick": True, "targets": {}, "conditions": {}, "summary": {}}
    monkeypatch.setattr(cli_bench, "run", lambda cfg: results)
    monkeypatch.setattr(cli_bench, "render", lambda r: "table")
    earlier, notes = tmp_path / "bench.json", tmp_path / "notes.txt"
    earlier.write_text(json.dumps(dict(results, quick=False)))
    notes.write_text("mine")
    assert main(["bench", "--only", "peak", "--out", str(earlier)]) == 0
    assert json.loads(earlier.read_text()) == results
    monkeypatch.setattr(cli_bench, "run", lambda cfg: pytest.fail("the bench ran before --out was checked"))
    assert main(["bench", "--only", "peak", "--out", str(notes)]) == 2
    assert "a file is there that vggnet bench did not write" in capsys.readouterr().err
    assert notes.read_text() == "mine"
