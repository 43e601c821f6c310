"""``vggnet weights list|fetch|info``, and predict/eval/vggnet.load with a weights file as SOURCE."""

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import vggnet
from vggnet.data import decode_image
from vggnet.base.errors import CheckpointError
from vggnet.base.files import load_tensors
from vggnet.store.card import read_embedded_card
from vggnet.store.weights import OFFICIAL, imagenet
from vggnet.store.weights.info import describe, info_lines
from vggnet.store.weights.official import Official, fetch


def test_official_table_is_torchvisions():
    assert list(OFFICIAL) == ["vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn"]
    vgg16 = OFFICIAL["vgg16"]
    assert vgg16.url == "https://download.pytorch.org/models/vgg16-397923af.pth"
    assert vgg16.sha256_prefix == "397923af" and (vgg16.top1, vgg16.top5) == (71.592, 90.382)
    assert OFFICIAL["vgg19_bn"].top1 == 74.218 and OFFICIAL["vgg11"].size_mib == 506.840  # docs/REFERENCE.md
    assert all(len(o.sha256_prefix) == 8 for o in OFFICIAL.values())


def test_weights_list_shows_what_is_in_the_directory(tmp_path, fake_official, w_cli):
    source, entry = fake_official  # vgg16, under its file's own SHA-256 prefix
    (tmp_path / entry.file).write_bytes(source.read_bytes())
    code, out, err = w_cli(["weights", "list", "--dir", tmp_path])
    assert code == 0 and err == ""
    rows = {line.split()[0]: line for line in out.splitlines()[2:10]}
    assert list(rows) == list(OFFICIAL)
    assert rows["vgg16"].split()[-1] == "yes" and rows["vgg19"].split()[-1] == "-"
    assert "71.592" in rows["vgg16"] and entry.file in rows["vgg16"]
    code, out, _ = w_cli(["weights", "list", "--dir", tmp_path, "--json"])
    records = json.loads(out)["weights"]
    assert [r["present"] for r in records] == [r["model"] == "vgg16" for r in records]
    assert [r["status"] for r in records] == ["ok" if r["model"] == "vgg16" else "missing" for r in records]
    assert records[0]["url"] == "https://download.pytorch.org/models/vgg11-8a719046.pth"


def test_weights_list_marks_a_file_whose_sha256_does_not_match_its_name(tmp_path, fake_official, w_cli):
    """A truncated download under the official name is not "present": the digest prefix of the name is checked."""
    source, entry = fake_official
    (tmp_path / entry.file).write_bytes(source.read_bytes()[:1000])  # truncated
    vgg19 = OFFICIAL["vgg19"]
    (tmp_path / vgg19.file).write_bytes(b"")  # an empty file under the official name
    code, out, err = w_cli(["weights", "list", "--dir", tmp_path])
    assert code == 0 and err == ""
    rows = {line.split()[0]: line for line in out.splitlines()[2:10]}
    assert rows["vgg16"].split()[-1] == "corrupt" and rows["vgg19"].split()[-1] == "corrupt"
    assert rows["vgg11"].split()[-1] == "-"
    truncated = hashlib.sha256(source.read_bytes()[:1000]).hexdigest()[:8]
    reason = (f"{tmp_path / entry.file}: SHA-256 starts with {truncated}, the name says {entry.sha256_prefix}: "
              "truncated, corrupt or not the official file; download it again (vggnet weights fetch vgg16)")
    assert reason in out.splitlines()
    code, out, _ = w_cli(["weights", "list", "--dir", tmp_path, "--json"])
    records = {r["model"]: r for r in json.loads(out)["weights"]}
    assert (records["vgg16"]["present"], records["vgg16"]["status"], records["vgg16"]["reason"]) == \
        (False, "corrupt", reason)
    assert (records["vgg19"]["present"], records["vgg19"]["status"]) == (False, "corrupt")
    assert f"the name says {vgg19.sha256_prefix}" in records["vgg19"]["reason"]
    assert (records["vgg11"]["present"], records["vgg11"]["status"], records["vgg11"]["reason"]) == \
        (False, "missing", None)


@pytest.fixture
def fake_official(tmp_path, monkeypatch):
    """A small file served from a file:// URL, registered as the official vgg16 under its own SHA-256 prefix."""
    source = tmp_path / "server" / "anything.bin"
    source.parent.mkdir()
    source.write_bytes(b"pretend weights " * 1000)
    prefix = hashlib.sha256(source.read_bytes()).hexdigest()[:8]
    entry = Official("vgg16", f"vgg16-{prefix}.pth", 0.016, 71.592, 90.382)
    monkeypatch.setitem(OFFICIAL, "vgg16", entry)
    return source, entry


def leftovers(directory):
    return sorted(p.name for p in directory.iterdir())


def test_fetch_from_a_file_url(tmp_path, fake_official, w_cli):
    source, entry = fake_official
    code, out, err = w_cli(["weights", "fetch", "vgg16", "--to", tmp_path / "dest", "--url", source.as_uri(),
                            "--no-progress"])
    assert code == 0 and err == ""
    target = tmp_path / "dest" / entry.file
    assert out.strip() == f"{target}: SHA-256 verified"
    assert target.read_bytes() == source.read_bytes() and leftovers(tmp_path / "dest") == [entry.file]
    source.unlink()  # already there and verified: not downloaded again
    assert fetch(entry.file, tmp_path / "dest", source.as_uri(), progress=False) == target


def test_fetch_with_a_mismatching_checksum_leaves_no_file(tmp_path, fake_official, monkeypatch, w_cli):
    source, entry = fake_official
    wrong = Official("vgg16", "vgg16-00000000.pth", 0.016, 71.592, 90.382)
    monkeypatch.setitem(OFFICIAL, "vgg16", wrong)
    code, out, err = w_cli(["weights", "fetch", "vgg16", "--to", tmp_path / "dest", "--url", source.as_uri(),
                            "--no-progress"])
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "SHA-256" in err and "does not start with the published prefix 00000000" in err and "nothing was saved" in err
    assert leftovers(tmp_path / "dest") == []  # neither the file nor a partial .part file
    code, _, err = w_cli(["weights", "fetch", "vgg17", "--to", tmp_path / "dest"])
    assert code == 2 and "no official weights named 'vgg17'" in err


def imagenet_file(tmp_path, name="tiny-imagenet-vgg11.pth"):
    """A 1000-class VGG-11 at 1/16 width with random weights, saved as a torchvision state dict."""
    model = vggnet.create_model("vgg11", width=1 / 16, hidden=16).eval()
    torch.save(model.state_dict(), tmp_path / name)
    return tmp_path / name, model


def test_predict_a_pth_file_prints_imagenet_classes(tmp_path, w_cli):
    path, model = imagenet_file(tmp_path)
    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(image)
    code, out, err = w_cli(["predict", path, image, "--top-k", "3", "--precision", "fp32", "--device", "cpu"])
    assert code == 0 and err == ""
    name, ranked = out.strip().split(": ", 1)
    assert name == str(image) and len(ranked.split(", ")) == 3
    assert all(entry.rsplit(" ", 1)[0] in imagenet.CLASSES for entry in ranked.split(", "))
    # the probabilities are the model's softmax on the ImageNet evaluation transform, computed here step by step
    code, out, _ = w_cli(["predict", path, image, "--top-k", "3", "--json", "--precision", "fp32", "--device", "cpu"])
    top = json.loads(out)[0]["top"]
    pixels = torch.from_numpy(decode_image(image, 256, 3)).permute(2, 0, 1)[:, 16:240, 16:240].float() / 255
    x = (pixels - torch.tensor(imagenet.MEAN).view(3, 1, 1)) / torch.tensor(imagenet.STD).view(3, 1, 1)
    with torch.no_grad():
        values, indices = model(x[None]).softmax(1)[0].topk(3)
    assert [t["index"] for t in top] == indices.tolist()
    assert [t["class"] for t in top] == [imagenet.CLASSES[i] for i in indices.tolist()]
    assert [t["prob"] for t in top] == pytest.approx(values.tolist(), abs=1e-6)


def test_predict_options_that_do_not_apply(tmp_path, w_cli, train_run_one_epoch):
    path, _ = imagenet_file(tmp_path)
    image = tmp_path / "x.png"
    Image.new("RGB", (32, 32)).save(image)
    code, _, err = w_cli(["predict", path, image, "--weights", "best"])
    assert code == 2 and "weights file, which holds one set of weights" in err and len(err.splitlines()) == 1
    code, _, err = w_cli(["predict", path, image, "--model", "vgg19"])
    assert code == 2 and len(err.splitlines()) == 1
    assert "does not fit vgg19: vgg19 has features.2.weight (4, 4, 3, 3) where the file has features.3.weight" in err
    code, _, err = w_cli(["predict", train_run_one_epoch["dir"], image, "--model", "vgg16"])
    assert code == 2 and "a model override ('vgg16') applies to weights files only" in err
    code, _, err = w_cli(["predict", tmp_path / "nothing.pth", image])
    assert code == 2 and "nothing.pth does not exist" in err


def test_vggnet_load_dispatches_on_the_source(tmp_path, train_run_one_epoch):
    path, _ = imagenet_file(tmp_path)
    from_file = vggnet.load(path)
    assert from_file.path == path and from_file.card.model.name == "vgg11" and len(from_file.classes) == 1000
    from_run = vggnet.load(train_run_one_epoch["dir"])
    assert from_run.run_dir == train_run_one_epoch["dir"] and from_run.card.dataset == "fashion-mnist"
    with pytest.raises(CheckpointError, match="weights='best' .* applies to run directories only"):
        vggnet.load(path, weights="best")
    assert vggnet.load(path, model="vgg11").card.model == from_file.card.model


def folder_dataset(root, classes=3, per_class=2):
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(root / f"class{c}" / f"{i}.png")
    return root


def test_eval_a_weights_file_needs_a_dataset(tmp_path, w_cli):
    model = vggnet.create_model("vgg11", width=1 / 16, hidden=16, num_classes=3).eval()
    torch.save(model.state_dict(), tmp_path / "three.pth")
    code, out, err = w_cli(["eval", tmp_path / "three.pth"])
    assert code == 2 and out == "" and "has no dataset of its own: name one with --dataset" in err
    data = folder_dataset(tmp_path / "data")
    code, out, err = w_cli(["eval", tmp_path / "three.pth", "--dataset", f"folder:{data}", "--json", "--device", "cpu",
                            "--out", tmp_path / "results"])
    assert code == 0, err
    record = json.loads(out)
    _, test_set = vggnet.load_dataset(f"folder:{data}", image_size=256)  # decoded as predict decodes files
    assert record["n"] == len(test_set) > 0 and record["classes"] == ["class0", "class1", "class2"]
    assert record["weights"] == str(tmp_path / "three.pth")
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["confusion.png", "eval.json"]
    code, out, err = w_cli(["eval", tmp_path / "three.pth", "--dataset", f"folder:{data}", "--device", "cpu"])
    assert code == 0 and "top-1" in out and "confusion matrix:" not in out  # no --out: nothing written


def test_weights_info(tmp_path, w_cli):
    path, _ = imagenet_file(tmp_path)
    code, out, err = w_cli(["weights", "info", path])
    assert code == 0 and "torchvision layout in a torch-zip file" in out and "vgg11 at width 0.0625" in out
    assert "decode at 256 and centre-crop 224" in out
    code, out, _ = w_cli(["weights", "info", path, "--json"])
    record = json.loads(out)
    assert record["model"] == "vgg11" and record["classes"] == 1000 and record["official"] is None


def test_weights_info_states_the_channels_the_model_takes(tmp_path, w_cli):
    """A 1-channel model takes grey images: its preprocessing line must not say RGB."""
    model = vggnet.create_model("vgg11", width=1 / 16, hidden=16, in_channels=1, num_classes=10).eval()
    torch.save(model.state_dict(), tmp_path / "grey.pth")
    code, out, err = w_cli(["weights", "info", tmp_path / "grey.pth"])
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[1] == "  model: vgg11 at width 0.0625, 1 input channel, head classic, 10 outputs"
    assert lines[2] == ("  preprocessing: grey (1 channel), decode at 256 and centre-crop 224, mean [0.449], "
                        "std [0.226] (on the [0, 1] scale)")
    assert describe(tmp_path / "grey.pth")["input"] == "grey"
    path, _ = imagenet_file(tmp_path)
    assert info_lines(describe(path))[2].startswith("  preprocessing: RGB, decode at 256 and centre-crop 224")
    code, out, _ = w_cli(["weights", "info", path, "--json"])
    assert json.loads(out) == json.loads(json.dumps(describe(path))) and json.loads(out)["input"] == "RGB"


def test_weights_info_of_a_vggnet_file_is_its_card(tmp_path, train_run_one_epoch, w_cli):
    """A run's model.safetensors carries its card: described from it, not re-detected as torchvision weights."""
    path = train_run_one_epoch["dir"] / "model.safetensors"
    card, _ = read_embedded_card(path)
    code, out, err = w_cli(["weights", "info", path, "--json"])
    assert code == 0 and err == ""
    record = json.loads(out)
    assert (record["format"], record["container"], record["model"], record["official"]) == \
        ("vggnet", "safetensors", "custom", None)
    assert record["config"] == card.model.to_dict() and record["preprocess"] == card.preprocess.to_dict()
    assert record["classes"] == len(card.classes) == 10 and record["dataset"] == "fashion-mnist"
    assert record["input"] == "grey" and record["features_only"] is False
    code, out, _ = w_cli(["weights", "info", path])
    mean, std = (round(v, 5) for v in (card.preprocess.mean[0], card.preprocess.std[0]))
    assert out.splitlines() == [
        f"{path}: vggnet's own file (its model card) in a safetensors file",
        "  model: a custom VGG, 1 input channel, head gap, 10 outputs (fashion-mnist classes)",
        f"  preprocessing: grey (1 channel), decode at 28 and pad to 32, mean [{mean}], std [{std}] (on the [0, 1] "
        "scale)"]
    # The same tensors without the card are another toolkit's file: detected from their keys and shapes.
    plain = tmp_path / "plain.safetensors"
    save_file(load_tensors(path), plain)
    assert describe(plain)["format"] == "torchvision" and describe(plain)["dataset"] is None
