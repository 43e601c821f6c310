"""Prepared (sharded) data sets: ``prepare`` writes exactly the samples, index and manifest of the format; an
interrupted prepare resumes to the same bytes; wrong reruns, corrupt shards and bad manifests are one-line errors."""

import hashlib
import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from vggnet.base.errors import DataError, OutputError
from vggnet.base.files import TEMP_NAME
from vggnet.data import decode_image, prepare_shards, read_manifest, verify_shards
from vggnet.data import shards
from vggnet.data.folder import plan_split
from vggnet.data.images import ImageFileError

MAX_SIDE = 16
SMALL = {"ant/a0.png": (12, 10), "ant/a1.png": (10, 14), "ant/a2.png": (16, 20),
         "bee/b0.jpg": (12, 12), "bee/b1.jpg": (20, 11), "bee/b2.jpg": (9, 15),
         "cat/c0.png": (13, 16), "cat/c1.png": (11, 9)}
BIG_PNG, ROTATED_JPEG, BROKEN = "cat/big.png", "cat/rotated.jpg", "cat/broken.png"


def random_image(size, seed):
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


@pytest.fixture
def folder(tmp_path):
    """3 classes: small PNGs and JPEGs (kept as they are), a 40x30 PNG and a 50x30 JPEG turned upright by its EXIF
    orientation to 30x50 (both resized), and a broken file."""
    root = tmp_path / "images"
    for i, (rel, size) in enumerate(SMALL.items()):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        random_image(size, i).save(root / rel, **({"quality": 90} if rel.endswith(".jpg") else {}))
    random_image((40, 30), 100).save(root / BIG_PNG)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to display
    random_image((50, 30), 101).save(root / ROTATED_JPEG, quality=90, exif=exif)
    (root / BROKEN).write_bytes(b"\x89PNG\r\n\x1a\n but then nothing an image holds")
    return root


def expected_member(root, rel):
    """(ext, bytes) the format stores for the image ``rel``: its own bytes when small, else its upright pixels
    resized (shorter side MAX_SIDE, bilinear) and encoded JPEG 95 (JPEG sources) or PNG."""
    if rel in SMALL:
        return rel.rsplit(".", 1)[1], (root / rel).read_bytes()
    size = {BIG_PNG: (21, 16), ROTATED_JPEG: (16, 26)}[rel]  # int(16 * 40 / 30) = 21, int(16 * 50 / 30) = 26
    image = Image.fromarray(decode_image(root / rel)).resize(size, Image.Resampling.BILINEAR)
    out = io.BytesIO()
    if rel.endswith(".jpg"):
        image.save(out, "JPEG", quality=95)
    else:
        image.save(out, "PNG")
    return ("jpg" if rel.endswith(".jpg") else "png"), out.getvalue()


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def listing(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_manifest_index_and_samples_are_exactly_the_folder(folder, tmp_path):
    out = tmp_path / "prepared"
    manifest = prepare_shards(folder, out, max_side=MAX_SIDE, shard_samples=3, progress=False)
    assert manifest == read_manifest(out) == json.loads((out / "manifest.json").read_text())
    classes, plan = plan_split(folder, 0.2)
    with pytest.raises(ImageFileError) as broken:
        decode_image(folder / BROKEN)
    assert manifest["bad"] == [{"file": BROKEN, "reason": broken.value.reason}]
    assert {k: manifest[k] for k in ("format", "version", "engine", "classes", "max_side", "source", "complete")} == {
        "format": "vggnet-shards", "version": 1, "engine": "webdataset", "classes": ["ant", "bee", "cat"],
        "max_side": MAX_SIDE, "source": str(folder.resolve()), "complete": True}
    for split in ("train", "test"):
        items = [(rel, label) for rel, label in plan[split] if rel != BROKEN]
        entry = manifest["splits"][split]
        assert entry["samples"] == len(items) and entry["index"] == f"{split}-index.npy"
        assert [s["samples"] for s in entry["shards"]] == [min(3, len(items) - k) for k in range(0, len(items), 3)]
        assert [s["file"] for s in entry["shards"]] == [f"{split}-{k:06d}.tar" for k in range(len(entry["shards"]))]
        for s in entry["shards"]:
            assert (s["bytes"], s["sha256"]) == ((out / s["file"]).stat().st_size, sha256(out / s["file"]))
        assert entry["index_sha256"] == sha256(out / entry["index"])
        index = np.load(out / entry["index"], mmap_mode="r")
        assert index.dtype == shards.INDEX_DTYPE and index.shape == (len(items),)
        for i, ((rel, label), row) in enumerate(zip(items, index)):
            ext, data = expected_member(folder, rel)
            shard = out / entry["shards"][int(row["shard"])]["file"]
            with open(shard, "rb") as f:
                f.seek(int(row["offset"]))
                assert f.read(int(row["size"])) == data, rel
            assert (int(row["shard"]), int(row["label"])) == (i // 3, label)
            with tarfile.open(shard) as tar:
                assert tar.extractfile(f"{i:09d}.cls").read() == str(label).encode()
                assert tar.getmember(f"{i:09d}.{ext}").offset_data == int(row["offset"])
            assert len(tarfile.open(shard).getnames()) == 2 * entry["shards"][int(row["shard"])]["samples"]
    assert sorted(os.listdir(out)) == sorted(["manifest.json", "train-index.npy", "test-index.npy"] + [
        s["file"] for split in manifest["splits"].values() for s in split["shards"]])
    assert verify_shards(out, deep=True) == manifest


def test_large_images_are_resized_upright_to_max_side(folder, tmp_path):
    out = tmp_path / "prepared"
    manifest = prepare_shards(folder, out, max_side=MAX_SIDE, shard_samples=100, progress=False)
    sizes = {}
    for split in ("train", "test"):
        with tarfile.open(out / manifest["splits"][split]["shards"][0]["file"]) as tar:
            for member in tar:
                if not member.name.endswith(".cls"):
                    with Image.open(tar.extractfile(member)) as image:
                        sizes[image.size] = image.format
    assert sizes[(21, 16)] == "PNG" and sizes[(16, 26)] == "JPEG"
    assert set(sizes) == {(21, 16), (16, 26)} | set(SMALL.values())


def test_train_and_test_subfolders_are_the_split(tmp_path):
    root = tmp_path / "imagenet"
    for split, n in (("train", 2), ("test", 1)):
        for c in ("n01", "n02"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                random_image((8, 8), i).save(root / split / c / f"{i}.png")
    manifest = prepare_shards(root, tmp_path / "out", progress=False)
    assert manifest["classes"] == ["n01", "n02"] and manifest["bad"] == []
    assert (manifest["splits"]["train"]["samples"], manifest["splits"]["test"]["samples"]) == (4, 2)
    labels = np.load(tmp_path / "out" / "test-index.npy")["label"].tolist()
    assert sorted(labels) == [0, 1]


def interrupt_after_first_shard(monkeypatch):
    """Make the second shard's finish raise (as a Ctrl-C would) before its rename."""
    finish, calls = shards._ShardFile.finish, []

    def stop_on_second(self):
        calls.append(self.path.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return finish(self)

    monkeypatch.setattr(shards._ShardFile, "finish", stop_on_second)
    return calls


def test_an_interrupted_prepare_resumes_to_the_same_bytes(folder, tmp_path, monkeypatch):
    whole, part = tmp_path / "whole", tmp_path / "part"
    prepare_shards(folder, whole, max_side=MAX_SIDE, shard_samples=3, progress=False)
    with monkeypatch.context() as m:
        interrupt_after_first_shard(m)
        with pytest.raises(KeyboardInterrupt):
            prepare_shards(folder, part, max_side=MAX_SIDE, shard_samples=3, progress=False)
    assert sorted(os.listdir(part)) == [".prepare-progress.json", "train-000000.tar"]  # no temporary file left
    with pytest.raises(DataError, match="unfinished prepare"):
        read_manifest(part)
    first = (part / "train-000000.tar").stat()
    encoded = []
    original = shards._encoded
    monkeypatch.setattr(shards, "_encoded", lambda path, side: encoded.append(path) or original(path, side))
    prepare_shards(folder, part, max_side=MAX_SIDE, shard_samples=3, progress=False)
    assert listing(part) == listing(whole)
    again = (part / "train-000000.tar").stat()
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)  # kept, not rewritten
    assert len(encoded) == 11 - 3  # the first shard's three images were not read again (the bad one is in neither)


def test_a_resume_refuses_a_corrupted_finished_shard(folder, tmp_path, monkeypatch):
    part = tmp_path / "part"
    with monkeypatch.context() as m:
        interrupt_after_first_shard(m)
        with pytest.raises(KeyboardInterrupt):
            prepare_shards(folder, part, max_side=MAX_SIDE, shard_samples=3, progress=False)
    data = bytearray((part / "train-000000.tar").read_bytes())
    data[2000] ^= 0xFF
    (part / "train-000000.tar").write_bytes(bytes(data))
    with pytest.raises(DataError, match="train-000000.tar: its sha256 does not match"):
        prepare_shards(folder, part, max_side=MAX_SIDE, shard_samples=3, progress=False)


def test_wrong_reruns_are_refused(folder, tmp_path, monkeypatch):
    part = tmp_path / "part"
    with monkeypatch.context() as m:
        interrupt_after_first_shard(m)
        with pytest.raises(KeyboardInterrupt):
            prepare_shards(folder, part, max_side=MAX_SIDE, shard_samples=3, progress=False)
    before = listing(part)
    with pytest.raises(OutputError, match="unfinished prepare of other arguments [(]max_side 16, now 20[)]"):
        prepare_shards(folder, part, max_side=20, shard_samples=3, progress=False)
    random_image((8, 8), 7).save(folder / "ant" / "new.png")
    with pytest.raises(OutputError, match="the image files changed since"):
        prepare_shards(folder, part, max_side=MAX_SIDE, shard_samples=3, progress=False)
    (folder / "ant" / "new.png").unlink()
    (part / "notes.txt").write_text("someone else's")
    with pytest.raises(OutputError, match=r"is not empty \(notes.txt\)"):
        prepare_shards(folder, part, max_side=MAX_SIDE, shard_samples=3, progress=False)
    (part / "notes.txt").unlink()
    assert listing(part) == before  # nothing written by the refusals
    done = tmp_path / "done"
    prepare_shards(folder, done, max_side=MAX_SIDE, shard_samples=3, progress=False)
    with pytest.raises(OutputError, match="already holds a complete prepared data set"):
        prepare_shards(folder, done, max_side=MAX_SIDE, shard_samples=3, progress=False)
    with pytest.raises(OutputError, match="inside the image folder"):
        prepare_shards(folder, folder / "prepared", progress=False)
    assert not (folder / "prepared").exists()


def test_verify_finds_corrupt_and_truncated_shards(folder, tmp_path):
    out = tmp_path / "prepared"
    prepare_shards(folder, out, max_side=MAX_SIDE, shard_samples=3, progress=False)
    shard = out / "train-000001.tar"
    good = shard.read_bytes()
    shard.write_bytes(good[:1600] + bytes([good[1600] ^ 1]) + good[1601:])  # same size, one bit flipped
    verify_shards(out)  # sizes and indexes only
    with pytest.raises(DataError, match=f"^{shard}: its sha256 does not match the one recorded"):
        verify_shards(out, deep=True)
    shard.write_bytes(good[:-512])
    with pytest.raises(DataError, match=f"^{shard}: {len(good) - 512} bytes, {len(good)} recorded"):
        verify_shards(out)
    shard.write_bytes(good)
    (out / "test-index.npy").write_bytes((out / "test-index.npy").read_bytes()[:-8])
    with pytest.raises(DataError, match="test-index.npy: not a readable index"):
        verify_shards(out)


@pytest.mark.parametrize("content, message", [
    (None, "manifest.json: no such file"),
    ("{not json", "manifest.json: not JSON"),
    (json.dumps({"format": "vggnet-shards", "version": 2}), "manifest.json: version 2 of the format"),
    (json.dumps({"format": "something-else"}), "manifest.json: not a vggnet-shards manifest"),
])
def test_read_manifest_refuses_in_one_line(tmp_path, content, message):
    (tmp_path / "d").mkdir()
    if content is not None:
        (tmp_path / "d" / "manifest.json").write_text(content)
    with pytest.raises(DataError, match=message) as err:
        read_manifest(tmp_path / "d")
    assert "\n" not in str(err.value)


def test_an_incomplete_manifest_is_refused(folder, tmp_path):
    out = tmp_path / "prepared"
    manifest = prepare_shards(folder, out, max_side=MAX_SIDE, progress=False)
    (out / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    with pytest.raises(DataError, match="manifest.json: the prepare that wrote it did not finish"):
        read_manifest(out)
    manifest["splits"]["train"]["shards"][0]["file"] = "../../etc/passwd"
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="shard 0 of split train is not a record"):
        verify_shards(out)


def test_cli_prepare_and_verify(folder, tmp_path, cli, one_line_error, monkeypatch):
    out = tmp_path / "prepared"
    args = ["data", "prepare", f"folder:{folder}", "--to", out, "--max-side", MAX_SIDE, "--shard-size", 3,
            "--no-progress"]
    code, stdout, stderr = cli(args)
    manifest = read_manifest(out)
    train, test = (manifest["splits"][s]["samples"] for s in ("train", "test"))
    size = sum((out / s["file"]).stat().st_size for sp in manifest["splits"].values() for s in sp["shards"])
    assert code == 0 and (train, test) == (7, 3)
    assert stdout == (f"{out}: 7 training and 3 test images of 3 classes in 4 shards, {size} bytes "
                      f"({size / 2**20:.1f} MiB); 1 unreadable image(s) listed in manifest.json\n")
    assert stderr.startswith(f"unreadable image, not prepared: {BROKEN}: not a readable image")
    assert len(stderr.splitlines()) == 1
    code, stdout, _ = cli(["data", "verify", out, "--deep"])
    assert code == 0 and stdout.startswith(f"{out}: 4 shards match the manifest (sizes, indexes and sha256")
    one_line_error(*cli(args)[::2], "already holds a complete prepared data set")
    one_line_error(*cli(["data", "prepare", str(folder), "--to", tmp_path / "x"])[::2], "must be folder:PATH")
    one_line_error(*cli(["data", "prepare", f"folder:{tmp_path / 'none'}", "--to", tmp_path / "x"])[::2],
                   "no such directory")
    one_line_error(*cli(["data", "verify", folder])[::2], "manifest.json: no such file")
    (out / "test-000000.tar").write_bytes(b"\0" * (out / "test-000000.tar").stat().st_size)
    one_line_error(*cli(["data", "verify", out, "--deep"])[::2], "test-000000.tar: its sha256 does not match")
    assert not (tmp_path / "x").exists()


def test_cli_lists_many_bad_images_by_count(folder, tmp_path, cli, monkeypatch):
    monkeypatch.setattr("vggnet.cli.data.SHOWN_BAD", 0)
    code, _, stderr = cli(["data", "prepare", f"folder:{folder}", "--to", tmp_path / "p", "--no-progress"])
    assert code == 0
    assert stderr == f'... and 1 more unreadable images, all listed under "bad" in {tmp_path / "p" / "manifest.json"}\n'


def test_temporary_files_of_a_killed_run_are_cleared(folder, tmp_path, monkeypatch):
    part = tmp_path / "part"
    with monkeypatch.context() as m:
        interrupt_after_first_shard(m)
        with pytest.raises(KeyboardInterrupt):
            prepare_shards(folder, part, max_side=MAX_SIDE, shard_samples=3, progress=False)
    (part / ".train-000001.tar.abcd1234.tmp").write_bytes(b"half a shard")  # as a kill -9 leaves it
    assert TEMP_NAME.match(".train-000001.tar.abcd1234.tmp")
    prepare_shards(folder, part, max_side=MAX_SIDE, shard_samples=3, progress=False)
    assert not [n for n in os.listdir(part) if n.endswith(".tmp")]
    verify_shards(part, deep=True)


def test_a_write_failure_is_one_line_and_leaves_no_temporary_file(folder, tmp_path, monkeypatch):
    def full(self, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shards._ShardFile, "write", full)
    out = tmp_path / "prepared"
    with pytest.raises(OutputError, match=f"^cannot write {out / 'train-000000.tar'}: No space left on device$"):
        prepare_shards(folder, out, max_side=MAX_SIDE, shard_samples=3, progress=False)
    assert os.listdir(out) == [".prepare-progress.json"]


def test_a_second_prepare_into_the_same_folder_is_refused_while_the_first_runs(folder, tmp_path):
    """One prepare per folder: while another process holds ``TO/.lock`` (here this test, through a second open
    file), a prepare is refused in one line naming the holder, writes nothing, and leaves the holder's folder as
    it was; once the lock is let go, the same prepare runs and leaves no lock file."""
    from vggnet.base.errors import ConfigError
    from vggnet.base.lock import LOCK_NAME, hold
    to = tmp_path / "out"
    with hold(to, to / LOCK_NAME, create=True):
        with pytest.raises(ConfigError, match=rf"^{to} is being written by another vggnet process \(pid {os.getpid()}"):
            prepare_shards(folder, to, max_side=MAX_SIDE, shard_samples=3, progress=False)
        assert os.listdir(to) == [LOCK_NAME]
    assert not to.exists()  # the holder made the folder and, leaving it empty, removed it
    prepare_shards(folder, to, max_side=MAX_SIDE, shard_samples=3, progress=False)
    assert LOCK_NAME not in os.listdir(to) and (to / "manifest.json").is_file()
