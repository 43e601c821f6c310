"""The architecture read from keys and shapes: all twelve registry models (full size on the meta device, reduced width
through real files), every head, custom architectures, and the one-line errors of files that are no VGG."""

import random

import pytest
import torch

import vggnet
from vggnet.base.errors import CheckpointError
from vggnet.base.files import save_tensors
from vggnet.store.weights import load_file, read_file
from vggnet.store.weights.layout import detect

NAMES = vggnet.list_models()


def test_the_registry_has_twelve_models():
    assert len(NAMES) == 12


@pytest.mark.parametrize("name", NAMES)
def test_full_size_registry_models_are_recognised(name):
    with torch.device("meta"):
        state = vggnet.create_model(name).state_dict()
    arch = detect(state, "meta")
    assert arch.name == name and not arch.features_only
    assert arch.kwargs == {"in_channels": 3, "head": "classic", "num_classes": 1000, "hidden": 4096}


@pytest.mark.parametrize("name", NAMES)
def test_saved_reduced_models_are_rebuilt_exactly(tmp_path, name):
    """Saved with torch.save (keys shuffled), read back: the same registry name and the same model config."""
    model = vggnet.create_model(name, width=1 / 16, hidden=32, num_classes=10, in_channels=1).eval()
    items = list(model.state_dict().items())
    random.Random(0).shuffle(items)
    torch.save(dict(items), tmp_path / "w.pth")
    loaded = load_file(tmp_path / "w.pth")
    assert loaded.card.model.to_dict() == model.config
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), model(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kwargs", [
    dict(head="gap", num_classes=10, in_channels=1),
    dict(head="fitted", input_size=64, hidden=24, num_classes=5),
    dict(head="dense", input_size=(64, 32), hidden=24, num_classes=5),
    dict(head="classic", batch_norm=True, hidden=24, num_classes=5, in_channels=4),
], ids=["gap", "fitted", "dense", "classic-bn"])
def test_every_head_and_a_custom_architecture_from_vggnet_safetensors(tmp_path, kwargs):
    """vggnet's own weights file (model.safetensors of a run) read bare: head, sizes and a custom arch with a 1x1
    convolution and an LRN are all recovered."""
    model = vggnet.create_model("custom", arch=[8, "LRN", "M", 16, (16, 1), "M", 24, "M"], **kwargs).eval()
    save_tensors(tmp_path / "model.safetensors", model.state_dict())
    wf = read_file(tmp_path / "model.safetensors")
    assert wf.container == "safetensors" and wf.format == "torchvision" and wf.arch.name == "custom"
    assert wf.config == model.config
    loaded = load_file(tmp_path / "model.safetensors")
    h, w = model.input_size
    x = torch.randn(2, model.in_channels, h, w)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), model(x), rtol=0, atol=1e-5)


def test_registry_models_at_other_widths_keep_their_name():
    with torch.device("meta"):
        model = vggnet.create_model("vgg16_c_bn", width=0.75, num_classes=3)
    arch = detect(model.state_dict(), "meta")
    assert arch.name == "vgg16_c_bn" and arch.kwargs["width"] == 0.75 and arch.describe() == "vgg16_c_bn at width 0.75"
    with torch.device("meta"):
        odd = vggnet.create_model("vgg16", width=0.3)  # 19 channels: 0.3 is not recoverable from 19 / 64
    arch = detect(odd.state_dict(), "meta")
    with torch.device("meta"):
        assert arch.name == "custom" and vggnet.create_model("custom", **arch.kwargs).config["arch"][:2] == [19, 19]


def state_of(name, **kwargs):
    with torch.device("meta"):
        return dict(vggnet.create_model(name, **kwargs).state_dict())


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("features.0.weight"), r"features\.0 should be a convolution .* \['bias'\]"),
    (lambda s: s.update({"features.3.weight": torch.zeros(8, 8, 3, 3, device="meta")}),
     r"features\.3\.weight \(8, 8, 3, 3\) takes 8 channels, the layer before gives 64"),
    (lambda s: [s.pop(k) for k in list(s) if k.startswith("features.1.")],
     "7 of 8 convolutions are followed by batch norm"),
    (lambda s: s.update({"features.40.weight": torch.zeros(8, 512, 3, 3, device="meta"),
                         "features.40.bias": torch.zeros(8, device="meta")}),
     r"parameterless layers between features\.27 and features\.40"),
    (lambda s: s.update({"classifier.9.weight": torch.zeros(3, 3, device="meta")}),
     r"classifier layers \[0, 3, 6, 9\] match none of vggnet's heads"),
    (lambda s: s.update({"classifier.0.weight": torch.zeros(4096, 1000, device="meta")}),
     r"classifier\.0\.weight \(4096, 1000\) takes 1000 features, which is not 512 channels times a square"),
])
def test_states_that_are_no_vgg_fail_in_one_line(edit, message):
    state = state_of("vgg11_bn")
    edit(state)
    with pytest.raises(CheckpointError, match=message) as info:
        detect(state, "w.pth")
    assert "\n" not in str(info.value) and str(info.value).startswith("w.pth")


def test_missing_conv_key_is_caught_when_loading(tmp_path):
    model = vggnet.create_model("vgg11", width=1 / 16, hidden=16, num_classes=3)
    state = model.state_dict()
    state.pop("classifier.3.bias")
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(CheckpointError, match=r"does not fit vgg11: vgg11 has classifier\.3\.bias \(16,\) where the "
                                              r"file has classifier\.6\.weight \(3, 16\)"):
        load_file(tmp_path / "w.pth")
