"""Feature extraction from image files, its files, FeaturesOnly, and ``vggnet features``.

Oracles: the maps equal ``VGG.forward_named`` on the batch predict's decoder and the run's Preprocess give (pooled
by hand); the files read back to the same numbers; FeaturesOnly's maps equal the pool outputs of ``forward_named``
and of the hand-sliced ``features``, with the model's ``feature_info``."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import vggnet
from vggnet.data import decode_image
from vggnet.base.errors import ConfigError, InputSizeError, OutputError
from vggnet.net.features_only import FeaturesOnly, features_only
from vggnet.use.features import check_output, extract_features, inference_copy, load_features, save_features, sidecar
from vggnet.base.files import load_tensors
from vggnet.store.rundir import load
from vggnet.runtime import resolve_runtime

FP32 = dict(device="cpu", precision="fp32", threads=1)


@pytest.fixture(scope="module")
def loaded(train_run_one_epoch):
    return load(train_run_one_epoch["dir"])


@pytest.fixture
def images(tmp_path):
    """Five readable files (grey 28x28, colour of other sizes, a JPEG) and one that is not an image."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        path = tmp_path / f"grey{i}.png"
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(path)
        paths.append(path)
    Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(tmp_path / "colour.png")
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(tmp_path / "photo.jpg")
    paths += [tmp_path / "colour.png", tmp_path / "photo.jpg"]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image at all")
    return {"good": [str(p) for p in paths], "broken": str(broken)}


def by_hand(loaded, paths, layers):
    """forward_named on the batch of ``paths``: decoded at 28 with one channel, then the run's Preprocess."""
    batch = torch.stack([torch.from_numpy(decode_image(p, 28, 1)).permute(2, 0, 1) for p in paths])
    with torch.no_grad():
        return loaded.model.forward_named(loaded.preprocess(batch), layers)


def hand_pool(x, pool):
    if pool == "none":
        return x
    flat = x.double().flatten(2)
    return flat.sum(-1) / flat.shape[-1] if pool == "avg" else flat.max(-1).values


# ------------------------------------------------------------------------------------------------ extraction
@pytest.mark.parametrize("pool", ["none", "avg", "max"])
def test_maps_equal_forward_named_on_the_same_batches(loaded, images, pool):
    layers = ["relu2_1", "conv1_1", "pool1"]
    runtime = resolve_runtime(channels_last=False, **FP32)
    result = extract_features(loaded, images["good"], layers, pool, runtime, batch_size=2)
    assert result.files == images["good"] and result.failed == [] and result.layers == layers
    for name in layers:
        # the same batches of two: exactly the same numbers
        expected = torch.cat([by_hand(loaded, images["good"][s:s + 2], layers)[name] for s in (0, 2, 4)])
        got = result.maps[name]
        assert got.dtype == torch.float32
        if pool == "none":
            assert torch.equal(got, expected)
        else:
            assert got.shape == expected.shape[:2]
            hand = hand_pool(expected, pool)
            assert torch.allclose(got.double(), hand, rtol=0, atol=1e-6) if pool == "avg" else torch.equal(got, hand)


def test_channels_last_batches_agree_with_the_plain_layout(loaded, images):
    runtime = resolve_runtime(channels_last=True, **FP32)
    result = extract_features(loaded, images["good"], ["relu2_1"], "none", runtime, batch_size=4)
    expected = by_hand(loaded, images["good"], ["relu2_1"])["relu2_1"]
    assert result.maps["relu2_1"].is_contiguous()
    assert torch.allclose(result.maps["relu2_1"], expected, rtol=1e-5, atol=1e-5)


def test_an_unreadable_file_is_listed_and_the_others_still_processed(loaded, images):
    files = images["good"][:2] + [images["broken"]] + images["good"][2:]
    runtime = resolve_runtime(channels_last=False, **FP32)
    result = extract_features(loaded, files, ["relu1_1"], "avg", runtime, batch_size=2)
    assert result.files == images["good"]
    assert [f for f, _ in result.failed] == [images["broken"]]
    assert images["broken"] in result.failed[0][1] and "not a readable image" in result.failed[0][1]
    expected = hand_pool(by_hand(loaded, images["good"], ["relu1_1"])["relu1_1"], "avg")
    assert torch.allclose(result.maps["relu1_1"].double(), expected, rtol=0, atol=1e-5)
    assert result.metadata()["failed"] == [images["broken"]]


def test_nothing_readable_gives_no_maps_and_save_refuses(loaded, images, tmp_path):
    result = extract_features(loaded, [images["broken"]], ["relu1_1"], runtime=resolve_runtime(**FP32))
    assert result.maps == {} and result.files == [] and len(result.failed) == 1
    with pytest.raises(vggnet.DataError, match="none of the 1 image file"):
        save_features(tmp_path / "x.npy", result)
    assert not (tmp_path / "x.npy").exists()


def test_a_source_path_goes_through_vggnet_load(loaded, images, train_run_one_epoch):
    result = extract_features(str(train_run_one_epoch["dir"]), images["good"][:1], ["relu1_1"],
                              runtime=resolve_runtime(**FP32))
    expected = extract_features(loaded, images["good"][:1], ["relu1_1"], runtime=resolve_runtime(**FP32))
    assert torch.equal(result.maps["relu1_1"], expected.maps["relu1_1"])
    assert result.source == str(train_run_one_epoch["dir"])


def test_unknown_layer_lists_the_valid_names_before_reading_any_file(loaded):
    with pytest.raises(ConfigError) as err:
        extract_features(loaded, ["/no/such/file.png"], ["relu5_3", "relu1_1"])
    message = str(err.value)
    assert "\n" not in message and "'relu5_3'" in message
    assert all(name in message for name in loaded.model.layer_names)


def test_bad_pool_and_repeated_layers(loaded, images):
    with pytest.raises(ConfigError, match="pool must be one of none, avg, max"):
        extract_features(loaded, images["good"], ["relu1_1"], pool="mean")
    result = extract_features(loaded, images["good"][:1], ["relu1_1", "relu1_1"], runtime=resolve_runtime(**FP32))
    assert result.layers == ["relu1_1"]


def test_model_mode_is_restored(loaded, images):
    loaded.model.train()
    try:
        extract_features(loaded, images["good"][:1], ["relu1_1"], runtime=resolve_runtime(**FP32))
        assert loaded.model.training
    finally:
        loaded.model.eval()


@pytest.mark.parametrize("layers", [["relu1_2", "pool2", "lrn3_1"], ["conv1_2", "relu2_1"], ["bn1_1", "pool1"],
                                    ["conv3_1", "bn3_1", "relu3_1"]])
def test_the_inference_copy_keeps_the_asked_layers_outputs(layers):
    """The CPU-bf16 path's folded copy, in fp32: BN folding and conv+ReLU fusion only where they keep the maps."""
    model = tiny_bn_model()
    fast = inference_copy(model, layers, "fp32", channels_last=False)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        got, expected = fast.forward_named(x, layers), model.forward_named(x, layers)
    for name in layers:
        assert torch.allclose(got[name], expected[name], rtol=1e-5, atol=1e-5), name
    folded = not any(n.startswith("conv") for n in layers)
    assert any(isinstance(m, torch.nn.Identity) for m in fast.features) == folded


@pytest.mark.cpu_bf16
@pytest.mark.parametrize("layers", [["relu2_1", "pool1"], ["conv2_1", "relu1_1"]])
def test_cpu_bf16_maps_are_close_to_fp32(loaded, images, layers):
    """The folded bf16 copy keeps the asked layers' meaning (no fusion that would hand back a ReLU for a conv)."""
    fp32 = extract_features(loaded, images["good"], layers, runtime=resolve_runtime(**FP32))
    bf16 = extract_features(loaded, images["good"], layers,
                            runtime=resolve_runtime("cpu", "bf16", threads=1))
    for name in layers:
        a, b = fp32.maps[name], bf16.maps[name]
        assert b.dtype == torch.float32
        assert (a - b).norm() / a.norm() < 3e-2, name
    assert (fp32.maps[layers[0]] < 0).any() == (bf16.maps[layers[0]] < 0).any()


# ------------------------------------------------------------------------------------------------ files
def test_npy_round_trip_with_its_sidecar(loaded, images, tmp_path):
    result = extract_features(loaded, images["good"], ["relu2_1"], "avg", resolve_runtime(**FP32))
    out = tmp_path / "feats.npy"
    written = save_features(out, result)
    assert written == [out, sidecar(out)] and sidecar(out).name == "feats.npy.json"
    array = np.load(out, allow_pickle=False)
    assert array.dtype == np.float32 and np.array_equal(array, result.maps["relu2_1"].numpy())
    meta = json.loads(sidecar(out).read_text())
    assert meta["files"] == images["good"] and meta["layers"] == ["relu2_1"] and meta["pool"] == "avg"
    assert meta["shapes"] == {"relu2_1": [5, 16]} and meta["format"] == "vggnet-features"
    tensors, meta_back = load_features(out)
    assert torch.equal(tensors["relu2_1"], result.maps["relu2_1"]) and meta_back == meta
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary files left


def test_safetensors_round_trip_one_tensor_per_layer(loaded, images, tmp_path):
    layers = ["relu1_1", "pool2", "conv2_1"]
    result = extract_features(loaded, images["good"], layers, "none", resolve_runtime(**FP32))
    out = tmp_path / "feats.safetensors"
    assert save_features(out, result) == [out]
    raw = load_tensors(out)
    assert set(raw) == set(layers)
    for name in layers:
        assert torch.equal(raw[name], result.maps[name])
    tensors, meta = load_features(out)
    assert meta["files"] == images["good"] and meta["layers"] == layers and meta["pool"] == "none"
    assert meta["shapes"] == {"relu1_1": [5, 8, 32, 32], "pool2": [5, 16, 8, 8], "conv2_1": [5, 16, 16, 16]}
    assert all(torch.equal(tensors[n], result.maps[n]) for n in layers)


@pytest.mark.parametrize("name, layers, error, fragment", [
    ("feats.txt", 1, ConfigError, "must end in .npy (one layer) or .safetensors"),
    ("feats", 1, ConfigError, "must end in .npy"),
    ("feats.npy", 2, ConfigError, "a .npy file holds one array, but 2 layers"),
    ("missing/feats.npy", 1, OutputError, "does not exist"),
])
def test_check_output_errors(tmp_path, name, layers, error, fragment):
    with pytest.raises(error, match=fragment.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        check_output(tmp_path / name, layers)


def test_check_output_formats(tmp_path):
    assert check_output(tmp_path / "a.NPY", 1) == ".npy"
    assert check_output(tmp_path / "a.safetensors", 3) == ".safetensors"


# ------------------------------------------------------------------------------------------------ FeaturesOnly
def tiny_bn_model(**overrides):
    """Three blocks, BN, with non-trivial running statistics, in eval mode."""
    kwargs = dict(arch=[4, 4, "M", 8, "M", 8, "LRN", "M"], batch_norm=True, in_channels=3, num_classes=5,
                  input_size=16, head="gap")
    torch.manual_seed(0)
    model = vggnet.create_model("custom", **{**kwargs, **overrides})
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def test_features_only_maps_are_the_pool_outputs_with_the_models_feature_info():
    model = tiny_bn_model()
    net = FeaturesOnly(model)
    assert net.feature_info == model.feature_info
    x = torch.randn(2, 3, 24, 40)
    with torch.no_grad():
        maps = net(x)
        named = model.forward_named(x, ["pool1", "pool2", "pool3"])
        for out, info, name in zip(maps, model.feature_info, ["pool1", "pool2", "pool3"]):
            assert torch.equal(out, named[name])
            index = int(info["module"].split(".")[1])
            assert torch.equal(out, model.features[:index + 1](x))  # hand-sliced forward
            assert out.shape[1] == info["num_chs"]
            assert out.shape[2:] == (24 // info["reduction"], 40 // info["reduction"])
    assert net.channels() == [4, 8, 8] and net.reductions() == [2, 4, 8]


def test_features_only_of_a_registry_model():
    model = vggnet.create_model("vgg11_bn", width=1 / 16, input_size=32, num_classes=10).eval()
    net = features_only(model)
    with torch.no_grad():
        maps = net(torch.randn(1, 3, 64, 64))
    assert [m.shape[1] for m in maps] == [4, 8, 16, 32, 32] == [i["num_chs"] for i in model.feature_info]
    assert [64 // m.shape[2] for m in maps] == [2, 4, 8, 16, 32] == [i["reduction"] for i in model.feature_info]


def test_out_indices_keep_only_what_is_needed_and_share_the_modules():
    model = tiny_bn_model()
    net = FeaturesOnly(model, out_indices=[-2, 0])
    assert net.out_indices == (0, 1) and net.feature_info == model.feature_info[:2]
    assert len(net.features) == int(model.feature_info[1]["module"].split(".")[1]) + 1
    assert net.features[0] is model.features[0]  # no copy
    own = net.state_dict()
    assert set(own) <= set(model.state_dict())
    assert all(torch.equal(own[k], model.state_dict()[k]) for k in own)
    with pytest.raises(ConfigError, match="out_indices must name stages 0..2"):
        FeaturesOnly(model, out_indices=[3])


def test_features_only_trains_every_parameter_it_holds():
    net = FeaturesOnly(tiny_bn_model().train())
    sum(m.sum() for m in net(torch.randn(2, 3, 16, 16))).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_features_only_input_errors():
    net = FeaturesOnly(tiny_bn_model())
    with pytest.raises(InputSizeError, match="at least 8x8"):
        net(torch.randn(1, 3, 8, 7))
    with pytest.raises(InputSizeError, match="3 input channels, got 1"):
        net(torch.randn(1, 1, 16, 16))
    with pytest.raises(InputSizeError, match="4-D"):
        net(torch.randn(3, 16, 16))
    assert [m.shape[-1] for m in FeaturesOnly(tiny_bn_model(), [0])(torch.randn(1, 3, 2, 2))] == [1]


# ------------------------------------------------------------------------------------------------ the CLI

def test_cli_writes_what_the_library_computes(train_cli, train_run_one_epoch, loaded, images, tmp_path):
    out = tmp_path / "f.npy"
    code, stdout, err = train_cli(["features", train_run_one_epoch["dir"], *images["good"], "--layer", "relu2_1",
                                   "--pool", "max", "--out", out, "--batch-size", "2", "--device", "cpu",
                                   "--precision", "fp32", "--threads", "1", "--no-progress"])
    assert code == 0, err
    assert "5 image(s)" in stdout and "relu2_1 (5, 16)" in stdout
    expected = extract_features(loaded, images["good"], ["relu2_1"], "max", resolve_runtime(**FP32), 2)
    assert np.array_equal(np.load(out), expected.maps["relu2_1"].numpy())
    meta = json.loads(sidecar(out).read_text())
    assert meta["files"] == images["good"] and meta["source"] == str(train_run_one_epoch["dir"])


def test_cli_several_layers_in_safetensors(train_cli, train_run_one_epoch, images, tmp_path):
    out = tmp_path / "f.safetensors"
    code, _, err = train_cli(["features", train_run_one_epoch["dir"], *images["good"][:2], "--layer", "relu1_1",
                              "--layer", "relu2_1", "--pool", "avg", "--out", out, "--precision", "fp32",
                              "--device", "cpu"])
    assert code == 0, err
    tensors, meta = load_features(out)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {"relu1_1": (2, 8), "relu2_1": (2, 16)}
    assert meta["layers"] == ["relu1_1", "relu2_1"]


def test_cli_unknown_layer(train_cli, train_run_one_epoch, images, tmp_path, one_line_error):
    code, _, err = train_cli(["features", train_run_one_epoch["dir"], images["good"][0], "--layer", "relu5_3",
                              "--out", tmp_path / "f.npy", "--precision", "fp32"])
    one_line_error(code, err, "vggnet features: error:", "'relu5_3'", "relu1_1", "pool2")
    assert not (tmp_path / "f.npy").exists()


def test_cli_unreadable_file_names_it_and_writes_the_others(train_cli, train_run_one_epoch, images, tmp_path,
                                                            one_line_error):
    out = tmp_path / "f.npy"
    code, _, err = train_cli(["features", train_run_one_epoch["dir"], images["good"][0], images["broken"],
                              images["good"][1], "--layer", "relu1_1", "--pool", "avg", "--out", out,
                              "--precision", "fp32"])
    one_line_error(code, err, "vggnet features: error:", images["broken"], "not a readable image")
    assert np.load(out).shape == (2, 8)
    meta = json.loads(sidecar(out).read_text())
    assert meta["files"] == [images["good"][0], images["good"][1]] and meta["failed"] == [images["broken"]]


def test_cli_nothing_readable(train_cli, train_run_one_epoch, images, tmp_path):
    code, _, err = train_cli(["features", train_run_one_epoch["dir"], images["broken"], "--layer", "relu1_1",
                              "--out", tmp_path / "f.npy", "--precision", "fp32"])
    assert code == 2 and images["broken"] in err and "nothing written" in err
    assert list(tmp_path.glob("f.npy*")) == []


@pytest.mark.parametrize("out, layers, fragment", [
    ("f.csv", ["relu1_1"], "must end in .npy (one layer) or .safetensors"),
    ("f.npy", ["relu1_1", "relu2_1"], "a .npy file holds one array"),
    ("nowhere/f.npy", ["relu1_1"], "does not exist"),
])
def test_cli_bad_out(train_cli, tmp_path, images, out, layers, fragment, one_line_error):
    # the source does not exist: the --out check comes first, before the model is loaded
    args = [a for layer in layers for a in ("--layer", layer)]
    code, _, err = train_cli(["features", tmp_path / "no-run", images["good"][0], *args, "--out", tmp_path / out])
    one_line_error(code, err, "vggnet features: error:", fragment)


def test_cli_needs_a_layer(train_cli, train_run_one_epoch, images, tmp_path, one_line_error):
    code, _, err = train_cli(["features", train_run_one_epoch["dir"], images["good"][0], "--out", tmp_path / "f.npy"])
    one_line_error(code, err, "--layer")


def test_create_model_features_only_is_the_wrapper_of_the_same_architecture():
    torch.manual_seed(0)
    wrapped = vggnet.create_model("vgg11_bn", width=0.125, in_channels=1, num_classes=3, input_size=32,
                                  features_only=True, out_indices=(1, 3))
    torch.manual_seed(0)
    plain = vggnet.create_model("vgg11_bn", width=0.125, in_channels=1, num_classes=3, input_size=32, head="gap")
    assert isinstance(wrapped, FeaturesOnly) and wrapped.out_indices == (1, 3)
    assert wrapped.feature_info == [plain.feature_info[1], plain.feature_info[3]]
    x = torch.randn(2, 1, 32, 32)
    expected = FeaturesOnly(plain, (1, 3)).eval()(x)
    assert all(torch.equal(a, b) for a, b in zip(wrapped.eval()(x), expected))  # same seed, same weights
    with pytest.raises(ConfigError, match="features_only=True"):
        vggnet.create_model("vgg11", out_indices=(1,))
