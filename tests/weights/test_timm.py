"""timm's VGG layout (pre_logits ConvMlp + head.fc) in safetensors: mapped onto the classic head, equal outputs at
224x224 (the resolution where timm's 7x7 fc1 convolution sees exactly the 7x7 map)."""

import pytest
import torch
from safetensors.torch import save_file

import vggnet
from vggnet.base.errors import CheckpointError
from vggnet.store.weights import load_file, read_file, timm
from vggnet.store.weights.layout import detect


def test_timm_safetensors_gives_the_reference_outputs(tmp_path, w_ref):
    ref = w_ref.fill(w_ref.TimmVGG(w_ref.scaled("vgg16", 16), hidden=48, classes=10))
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, tmp_path / "model.safetensors")
    wf = read_file(tmp_path / "model.safetensors")
    assert (wf.format, wf.container, wf.arch.name) == ("timm", "safetensors", "vgg16")
    assert wf.config["head"] == "classic" and wf.config["hidden"] == 48 and wf.config["num_classes"] == 10
    assert wf.card.preprocess.crop_fraction == 0.875 and wf.card.preprocess.mean == (0.485, 0.456, 0.406)
    loaded = load_file(tmp_path / "model.safetensors")
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = ref(x), loaded.model(x)
    assert expected.std() > 1e-3
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_timm_layout_in_a_pth_file_too(tmp_path, w_ref):
    ref = w_ref.fill(w_ref.TimmVGG(w_ref.scaled("vgg11", 16), hidden=16, classes=4))
    torch.save({f"module.{k}": v for k, v in ref.state_dict().items()}, tmp_path / "timm.pth")
    loaded = load_file(tmp_path / "timm.pth")
    assert loaded.format == "timm" and loaded.card.model.name == "vgg11"
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), ref(x), rtol=0, atol=1e-5)


def test_full_size_timm_keys_map_to_vgg19_bn():
    """timm's vgg19_bn key set at full size (meta tensors): the classifier maps to classic FC layers."""
    with torch.device("meta"):
        ours = vggnet.create_model("vgg19_bn")
    state = {k: v for k, v in ours.state_dict().items() if k.startswith("features.")}
    state.update({"pre_logits.fc1.weight": torch.empty(4096, 512, 7, 7, device="meta"),
                  "pre_logits.fc1.bias": torch.empty(4096, device="meta"),
                  "pre_logits.fc2.weight": torch.empty(4096, 4096, 1, 1, device="meta"),
                  "pre_logits.fc2.bias": torch.empty(4096, device="meta"),
                  "head.fc.weight": torch.empty(1000, 4096, device="meta"),
                  "head.fc.bias": torch.empty(1000, device="meta")})
    mapped = timm.to_vggnet(state, "timm")
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    arch = detect(mapped, "timm")
    assert arch.name == "vgg19_bn" and arch.kwargs["head"] == "classic" and arch.kwargs["num_classes"] == 1000


def test_timm_files_without_a_head_or_with_another_kernel(tmp_path, w_ref):
    ref = w_ref.TimmVGG(w_ref.scaled("vgg11", 16), hidden=16, classes=4)
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    headless = {k: v for k, v in state.items() if not k.startswith("head.")}
    save_file(headless, tmp_path / "headless.safetensors")
    with pytest.raises(CheckpointError, match=r"headless\.safetensors has timm's head keys but lacks head\.fc\.weight"):
        load_file(tmp_path / "headless.safetensors")
    state["pre_logits.fc1.weight"] = torch.zeros(16, 32, 3, 3)
    save_file(state, tmp_path / "k3.safetensors")
    with pytest.raises(CheckpointError, match=r"pre_logits\.fc1\.weight \(16, 32, 3, 3\) is not a 7x7 convolution"):
        load_file(tmp_path / "k3.safetensors")


def test_truncated_safetensors(tmp_path, w_ref):
    ref = w_ref.TimmVGG(w_ref.scaled("vgg11", 16), hidden=16, classes=4)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, tmp_path / "full.safetensors")
    data = (tmp_path / "full.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors is not a readable safetensors file .* truncated"):
        load_file(tmp_path / "cut.safetensors")
