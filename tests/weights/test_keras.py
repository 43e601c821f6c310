"""Keras .h5 weights made here with h5py, checked against an independent channels-last (NHWC) numpy forward of the same
weights: HWIO kernels, the BGR/Caffe preprocessing and FC1's row order (Keras flattens (h, w, c), PyTorch (c, h, w)).
"""

import sys

import numpy as np
import pytest
import torch

import vggnet
from vggnet.base.errors import CheckpointError
from vggnet.store.weights import imagenet, keras, load_file, read_file
from vggnet.store.weights.layout import detect


def nchw(x_nhwc):
    return torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))).float()


@pytest.mark.parametrize("size, old_names", [(64, False), (224, True)], ids=["fitted-2x2", "classic-7x7-keras1-names"])
def test_keras_h5_gives_the_nhwc_reference_outputs(tmp_path, w_ref, size, old_names):
    """64x64 input: a 2x2 final map and a fitted head; 224x224: the 7x7 map of the real files and the classic head.
    Both maps have more than one position, so a wrong FC1 row order cannot pass."""
    side = size // 32
    layers = w_ref.keras_layers(w_ref.scaled("vgg16", 16), hidden=24, classes=10, side=side)
    w_ref.write_keras_h5(tmp_path / "vgg16_weights_tf_dim_ordering_tf_kernels.h5", layers, old_names=old_names)
    loaded = load_file(tmp_path / "vgg16_weights_tf_dim_ordering_tf_kernels.h5")
    config = loaded.card.model.to_dict()
    assert loaded.format == "keras" and config["name"] == "vgg16" and config["width"] == 1 / 16
    assert config["head"] == ("classic" if side == 7 else "fitted") and config["input_size"] == [size, size]
    x = np.random.default_rng(0).standard_normal((2, size, size, 3)).astype(np.float32)
    expected = w_ref.keras_forward(layers, x)
    with torch.no_grad():
        got = loaded.model(nchw(x)).double().numpy()
    assert expected.std() > 1e-3
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * max(1.0, np.abs(expected).max()))


def test_fc1_rows_really_are_permuted(w_ref):
    """Skipping the row permutation (a plain transpose of fc1) changes the output: the test above would catch it."""
    layers = w_ref.keras_layers(w_ref.scaled("vgg11", 16), hidden=8, classes=3, side=2)
    state = keras.to_vggnet(layers, "k.h5")
    naive = torch.from_numpy(layers["fc1"][0]).t()
    assert state["classifier.0.weight"].shape == naive.shape and not torch.equal(state["classifier.0.weight"], naive)
    # column c * 4 + h * 2 + w of ours is row (h * 2 + w) * C + c of Keras' kernel
    c_count = 32
    for c, h, w in ((0, 0, 1), (5, 1, 0), (31, 1, 1)):
        assert torch.equal(state["classifier.0.weight"][:, c * 4 + h * 2 + w],
                           torch.from_numpy(layers["fc1"][0][(h * 2 + w) * c_count + c]))


def test_caffe_preprocessing_is_bgr_minus_the_mean_pixel(tmp_path, w_ref):
    layers = w_ref.keras_layers(w_ref.scaled("vgg11", 16), hidden=8, classes=1000)
    w_ref.write_keras_h5(tmp_path / "k.h5", layers)
    prep = load_file(tmp_path / "k.h5").preprocess
    assert prep.channel_order == "bgr" and prep.image_size == 224 and prep.decode_size == 256
    rgb = torch.randint(0, 256, (2, 3, 256, 256), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = prep(rgb)
    # Keras: preprocess_input(mode="caffe") on the centre 224 crop: RGB -> BGR, minus [103.939, 116.779, 123.68]
    crop = rgb[:, :, 16:240, 16:240].double()
    expected = crop.flip(1) - torch.tensor([103.939, 116.779, 123.68], dtype=torch.float64).view(1, 3, 1, 1)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-4)


def test_notop_file_is_features_only(tmp_path, w_ref, w_cli):
    layers = w_ref.keras_layers(w_ref.scaled("vgg19", 16), top=False)
    path = tmp_path / "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5"
    w_ref.write_keras_h5(path, layers, weight_names=False)  # no weight_names attribute: datasets found by walking
    loaded = load_file(path)
    assert loaded.features_only and loaded.card.model.name == "vgg19" and loaded.classes == []
    x = np.random.default_rng(1).standard_normal((1, 64, 64, 3)).astype(np.float32)
    with torch.no_grad():
        got = loaded.model.forward_features(nchw(x)).double().numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(got, w_ref.keras_forward(layers, x, top=False), rtol=0, atol=1e-5)
    # fine-tuning: a new head of our choice around the file's convolutions
    model = vggnet.create_model("vgg19", weights=path, head="gap", num_classes=10)
    assert model.num_classes == 10 and torch.equal(model.features[0].weight, loaded.model.features[0].weight)
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (40, 30), (10, 200, 30)).save(image)
    code, out, err = w_cli(["predict", path, image])
    assert code == 2 and out == "" and "holds convolutional weights only" in err and len(err.splitlines()) == 1
    code, out, err = w_cli(["eval", path, "--dataset", "cifar10"])
    assert code == 2 and "holds convolutional weights only" in err


def test_full_size_keras_vgg16_maps_to_vgg16(w_ref):
    """The real file's layer set and shapes (meta tensors, no 528 MB of data): vgg16, classic head, 1000 classes."""
    layers = {}
    c, block, conv = 3, 1, 0
    for v in w_ref.CONVS["vgg16"]:
        if v == "M":
            block, conv = block + 1, 0
            continue
        conv += 1
        layers[f"block{block}_conv{conv}"] = (torch.empty(3, 3, c, v, device="meta"), torch.empty(v, device="meta"))
        c = v
    for name, (n_in, n_out) in (("fc1", (25088, 4096)), ("fc2", (4096, 4096)), ("predictions", (4096, 1000))):
        layers[name] = (torch.empty(n_in, n_out, device="meta"), torch.empty(n_out, device="meta"))
    arch = detect(keras.to_vggnet(layers, "vgg16.h5"), "vgg16.h5")
    assert arch.name == "vgg16" and arch.kwargs == {"in_channels": 3, "head": "classic", "num_classes": 1000,
                                                     "hidden": 4096}


def test_missing_h5py_says_how_to_install(tmp_path, w_ref, monkeypatch):
    w_ref.write_keras_h5(tmp_path / "k.h5", w_ref.keras_layers(w_ref.scaled("vgg11", 16), top=False))
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(CheckpointError, match=r"needs h5py: pip install 'vggnet\[keras\]'"):
        load_file(tmp_path / "k.h5")


def test_truncated_and_foreign_h5(tmp_path, w_ref):
    w_ref.write_keras_h5(tmp_path / "k.h5", w_ref.keras_layers(w_ref.scaled("vgg11", 16), hidden=8, classes=3))
    data = (tmp_path / "k.h5").read_bytes()
    (tmp_path / "cut.h5").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.h5 is a truncated or corrupt HDF5 file"):
        read_file(tmp_path / "cut.h5")
    import h5py

    layers = w_ref.keras_layers(w_ref.scaled("vgg11", 16), top=False)
    layers["batch_normalization_1"] = (np.ones(4, np.float32), np.zeros(4, np.float32))
    w_ref.write_keras_h5(tmp_path / "bn.h5", layers)
    with pytest.raises(CheckpointError, match=r"bn\.h5: layer batch_normalization_1 holds weights vggnet has no place"):
        read_file(tmp_path / "bn.h5")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f.create_dataset("dense_1/kernel:0", data=np.zeros((4, 4), np.float32))
    with pytest.raises(CheckpointError, match=r"other\.h5 has no blockN_convM layers"):
        read_file(tmp_path / "other.h5")


def test_imagenet_classes_come_with_1000_outputs():
    assert len(imagenet.CLASSES) == 1000 and len(set(imagenet.CLASSES)) == 1000
    assert imagenet.CLASSES[0] == "tench" and imagenet.CLASSES[281] == "tabby" and imagenet.CLASSES[999] == "toilet tissue"


def test_init_from_a_notop_file_loads_the_convolutions_only(tmp_path, w_ref):
    """The head of a features-only source is freshly initialised, not weights: it must not be copied."""
    from vggnet.training.transfer import init_from_source

    layers = w_ref.keras_layers(w_ref.scaled("vgg11", 16), top=False)
    path = tmp_path / "vgg11_notop.h5"
    w_ref.write_keras_h5(path, layers)
    target = vggnet.create_model("vgg11", width=1 / 16)  # the classic head: the very shapes of the source's new head
    record = init_from_source(target, str(path))
    assert [layer for layer in record.loaded if not layer.startswith("conv")] == []
    assert {"classifier.0", "classifier.3", "classifier.6"} <= set(record.reinitialised)
    assert torch.equal(target.features[0].weight, load_file(path).model.features[0].weight)
