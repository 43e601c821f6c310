"""torchvision .pth files (zip and legacy torch.save formats) into vggnet: equal outputs, the file-name SHA-256 check,
payload pickles that must not run, truncated and mismatched files."""

import hashlib
import os

import pytest
import torch

import vggnet
from vggnet.base.errors import CheckpointError
from vggnet.store.weights import load_file, read_file


def save(state, path, legacy=False):
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    return path


def outputs_equal(loaded, reference, x):
    with torch.no_grad():
        expected, got = reference(x), loaded.model(x)
    assert expected.std() > 1e-3  # not a degenerate network
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("name, batch_norm", [("vgg16", False), ("vgg11", True)])
def test_torchvision_file_gives_the_reference_outputs(tmp_path, w_ref, legacy, name, batch_norm):
    ref = w_ref.fill(w_ref.TorchvisionVGG(w_ref.scaled(name, 16), batch_norm, hidden=64, classes=10))
    path = save(ref.state_dict(), tmp_path / "weights.pth", legacy)
    loaded = load_file(path)
    assert isinstance(loaded, vggnet.store.card.LoadedModel) and not loaded.model.training
    assert loaded.card.model.name == name + ("_bn" if batch_norm else "") and loaded.card.model.width == 1 / 16
    assert loaded.format == "torchvision" and loaded.run_dir is None and loaded.path == path
    assert read_file(path).container == ("torch-legacy" if legacy else "torch-zip")
    outputs_equal(loaded, ref, torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    assert loaded.classes == []  # 10 outputs: not ImageNet's; predictions are numbered


def test_full_size_vgg16_at_224(tmp_path, w_ref):
    """The real thing once: a full VGG-16 (random weights, 138M parameters) saved, read back, 224x224 input."""
    with torch.device("meta"):
        ref = w_ref.TorchvisionVGG(w_ref.CONVS["vgg16"])
    ref = w_ref.fill(ref.to_empty(device="cpu"))
    path = save(ref.state_dict(), tmp_path / "vgg16-full.pth")
    loaded = load_file(path)
    assert loaded.card.model.name == "vgg16" and loaded.card.model.head == "classic"
    assert loaded.classes[:3] == ["tench", "goldfish", "great white shark"] and len(loaded.classes) == 1000
    assert sum(p.numel() for p in loaded.model.parameters()) == 138_357_544
    outputs_equal(loaded, ref, torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0)))


def test_wrappers_and_ddp_compile_prefixes_are_removed(tmp_path, w_ref):
    ref = w_ref.fill(w_ref.TorchvisionVGG(w_ref.scaled("vgg11", 16), hidden=32, classes=5))
    state = {f"module._orig_mod.{k}": v for k, v in ref.state_dict().items()}
    path = save({"epoch": 3, "state_dict": state, "optimizer": {"lr": 0.1}}, tmp_path / "checkpoint.pt")
    outputs_equal(load_file(path), ref, torch.randn(1, 3, 32, 32))


def test_sha256_prefix_in_the_name_is_checked(tmp_path, w_ref):
    ref = w_ref.TorchvisionVGG(w_ref.scaled("vgg11", 16), hidden=32, classes=5)
    plain = save(ref.state_dict(), tmp_path / "plain.pth")
    digest = hashlib.sha256(plain.read_bytes()).hexdigest()
    right = tmp_path / f"vgg11-{digest[:8]}.pth"
    right.write_bytes(plain.read_bytes())
    assert load_file(right).card.model.name == "vgg11"
    wrong_prefix = "0" * 8 if not digest.startswith("0" * 8) else "1" * 8
    wrong = tmp_path / f"vgg11-{wrong_prefix}.pth"
    wrong.write_bytes(plain.read_bytes())
    with pytest.raises(CheckpointError) as info:
        load_file(wrong)
    message = str(info.value)
    assert "\n" not in message and str(wrong) in message and "SHA-256 mismatch" in message
    assert wrong_prefix in message and digest[:8] in message
    # A truncated download under the official name is caught by the same check, before torch reads it.
    official = tmp_path / "vgg16-397923af.pth"
    official.write_bytes(plain.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="SHA-256 mismatch.*397923af"):
        load_file(official)


class Payload:
    """Unpickling this would run a shell command that creates a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_a_payload_pickle_does_not_run(tmp_path, w_ref, legacy, w_cli):
    marker = tmp_path / "PWNED"
    ref = w_ref.TorchvisionVGG(w_ref.scaled("vgg11", 16), hidden=32, classes=5)
    path = save({**ref.state_dict(), "extra": Payload(marker)}, tmp_path / "evil.pth", legacy)
    assert not marker.exists()
    with pytest.raises(CheckpointError) as info:
        load_file(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(path)) and "weights_only" in message
    assert "posix.system" in message
    code, out, err = w_cli(["predict", path, tmp_path / "any.png"])
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err and str(path) in err
    assert not marker.exists()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_a_protocol_4_payload_is_refused_in_one_line_without_torchs_warning(tmp_path, w_ref, legacy, capsys,
                                                                             monkeypatch):
    """torch's weights-only unpickler warns about any pickle protocol but 2 ("Detected pickle protocol 4 ..." and its
    source line on stderr, before vggnet's one-line refusal). Warnings are shown here as a terminal shows them."""
    import sys
    import warnings

    from vggnet.cli import main

    marker = tmp_path / "PWNED"
    ref = w_ref.TorchvisionVGG(w_ref.scaled("vgg11", 16), hidden=32, classes=5)
    path = tmp_path / "evil.pth"
    torch.save({**ref.state_dict(), "extra": Payload(marker)}, path, pickle_protocol=4,
               _use_new_zipfile_serialization=not legacy)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        monkeypatch.setattr(warnings, "showwarning", lambda message, category, filename, lineno, file=None, line=None:
                            sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line)))
        capsys.readouterr()
        code = main(["predict", str(path), str(tmp_path / "any.png")])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and not marker.exists()
    assert len(err.splitlines()) == 1 and err.startswith(f"vggnet predict: error: {path} holds Python objects"), err


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_truncated_file(tmp_path, w_ref, legacy):
    ref = w_ref.TorchvisionVGG(w_ref.scaled("vgg11", 16), hidden=32, classes=5)
    full = save(ref.state_dict(), tmp_path / "full.pth", legacy).read_bytes()
    path = tmp_path / "cut.pth"
    path.write_bytes(full[: len(full) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pth is truncated or corrupt") as info:
        load_file(path)
    assert "\n" not in str(info.value)


def test_vgg16_weights_with_a_vgg19_override_name_the_first_mismatch(tmp_path, w_ref):
    ref = w_ref.TorchvisionVGG(w_ref.scaled("vgg16", 16), hidden=32, classes=5)
    path = save(ref.state_dict(), tmp_path / "vgg16.pth")
    with pytest.raises(CheckpointError) as info:
        load_file(path, model="vgg19")
    message = str(info.value)
    # vgg16's features.16 is its third pool; vgg19 has a fourth 256-channel conv there.
    assert message.startswith(f"{path} does not fit vgg19: vgg19 has features.16.weight (16, 16, 3, 3) where the "
                              "file has features.17.weight (32, 16, 3, 3)")
    assert "the file holds vgg16 at width 0.0625" in message and "\n" not in message


def test_bn_weights_into_a_plain_model(tmp_path, w_ref):
    ref = w_ref.TorchvisionVGG(w_ref.scaled("vgg16", 16), batch_norm=True, hidden=32, classes=5)
    path = save(ref.state_dict(), tmp_path / "vgg16_bn.pth")
    with pytest.raises(CheckpointError, match=r"does not fit vgg16: vgg16 has features\.2\.weight \(4, 4, 3, 3\) "
                                              r"where the file has features\.1\.weight \(4,\)"):
        load_file(path, model="vgg16")
    with pytest.raises(CheckpointError, match=r"does not fit vgg16: .*holds vgg16_bn"):
        vggnet.create_model("vgg16", weights=path)
    assert load_file(path, model="vgg16_bn").card.model.name == "vgg16_bn"


def test_create_model_with_weights_loads_strictly(tmp_path, w_ref):
    ref = w_ref.fill(w_ref.TorchvisionVGG(w_ref.scaled("vgg13", 16), hidden=32, classes=7, in_channels=1))
    path = save(ref.state_dict(), tmp_path / "w.pth")
    model = vggnet.create_model("vgg13", weights=path)  # classes, channels, width, hidden: from the file
    assert model.training and model.num_classes == 7 and model.in_channels == 1 and model.config["width"] == 1 / 16
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), ref(x), rtol=0, atol=1e-5)
    with pytest.raises(CheckpointError, match=r"classifier\.6\.weight is \(3, 32\) in vgg13 but \(7, 32\) in the "
                                              r"file \(for other classes: load it as it is, then call "
                                              r"model\.reset_classifier\(N\)\)"):
        vggnet.create_model("vgg13", weights=path, num_classes=3)


def test_not_a_vgg_and_not_a_weights_file(tmp_path):
    resnet = save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(1000, 512)},
                  tmp_path / "resnet18.pth")
    with pytest.raises(CheckpointError, match=r"resnet18\.pth is not a VGG state dict: it holds conv1\.weight "
                                              r"\(64, 3, 7, 7\) and 1 more keys"):
        load_file(resnet)
    text = tmp_path / "notes.pth"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match=r"notes\.pth is not a weights file vggnet reads"):
        load_file(text)
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.pth is empty"):
        load_file(tmp_path / "empty.pth")
    with pytest.raises(CheckpointError, match=r"missing\.pth does not exist"):
        vggnet.load(tmp_path / "missing.pth")
    counter = save({"step": torch.tensor(3)}, tmp_path / "counter.pth")
    with pytest.raises(CheckpointError, match=r"not a VGG state dict: it holds step"):
        load_file(counter)
