"""Grad-CAM (:mod:`vggnet.use.explain`) and ``vggnet explain``.

Oracles: hand-built models whose evidence sits in a known place (a quadrant that only the head reads; a bar that
only one channel detects), so the map's peak and mass must land there; Grad-CAM of a one-conv BN model computed by
hand (alpha = the fc weight / hw, times the BN scale and the ReLU's open fraction below the ReLU) equals the raw map;
the PNGs read back to the model's input image (alpha 0) and the colour map (alpha 1) exactly."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from PIL import Image

from vggnet import VGG
from vggnet.data import Preprocess, decode_image
from vggnet.base.errors import ConfigError, OutputError
from vggnet.use.explain import (CMAP, default_layer, grad_cam, model_input_images, normalise, overlay, peak, png_names,
                            raw_grad_cam, resolve_class, write_overlay)
from vggnet.use.predict import predict_files
from vggnet.runtime import resolve_runtime
from vggnet.store.rundir import load


def fp32():
    """The CPU in fp32: the predictions are compared with the model's own fp32 softmax (on a CPU with native bf16,
    predict's default precision would be bf16)."""
    return resolve_runtime("cpu", "fp32", threads=torch.get_num_threads())


# ------------------------------------------------------------------------------------------- hand-built models


def quadrant_model(quadrant: str, sign: float = 1.0) -> VGG:
    """16x16 grey input; two 1-channel identity convs (centre tap 1), two pools -> a 4x4 map; the fitted head's fc6
    sums only the ``quadrant``'s 2x2 cells of that map, fc7 passes it on, and class 1's logit is ``sign`` times it
    (class 0: a constant 0.5). Class 1's score therefore depends only on that quadrant's brightness."""
    model = VGG([1, "M", 1, "M"], in_channels=1, num_classes=2, head="fitted", input_size=16, hidden=2, dropout=0.0)
    mask = torch.zeros(4, 4)
    rows, cols = {"tl": (slice(0, 2), slice(0, 2)), "br": (slice(2, 4), slice(2, 4))}[quadrant]
    mask[rows, cols] = 1.0
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for name in ("conv1_1", "conv2_1"):
            model.features[model.layer_names[name]].weight[0, 0, 1, 1] = 1.0
        model.classifier[0].weight[0] = mask.flatten()
        model.classifier[3].weight[0, 0] = 1.0
        model.classifier[6].weight[1, 0] = sign
        model.classifier[6].bias[0] = 0.5
    return model.eval()


def bright(quadrant: str) -> torch.Tensor:
    x = torch.zeros(1, 1, 16, 16)
    if quadrant == "tl":
        x[..., :8, :8] = 1.0
    else:
        x[..., 8:, 8:] = 1.0
    return x


def quadrant_mass(m: torch.Tensor, quadrant: str) -> float:
    part = m[:8, :8] if quadrant == "tl" else m[8:, 8:]
    return float(part.sum() / m.sum())


def in_quadrant(row: int, col: int, quadrant: str, half: int = 8) -> bool:
    return (row < half and col < half) if quadrant == "tl" else (row >= half and col >= half)


@pytest.mark.parametrize("quadrant", ["tl", "br"])
@pytest.mark.parametrize("layer", [None, "relu1_1", "conv2_1"])
def test_the_peak_and_most_of_the_mass_sit_in_the_quadrant_the_head_reads(quadrant, layer):
    model = quadrant_model(quadrant)
    maps, classes, probs = grad_cam(model, bright(quadrant), layer)
    assert classes.tolist() == [1]  # logit 4 against 0.5
    assert probs.item() == pytest.approx(torch.tensor([0.5, 4.0]).softmax(0)[1].item(), abs=1e-6)
    m = maps[0]
    assert m.shape == (16, 16) and float(m.max()) == 1.0 and float(m.min()) >= 0.0
    row, col = divmod(int(m.argmax()), 16)
    assert in_quadrant(row, col, quadrant)
    # relu2_1's 4x4 map has the quadrant's 2x2 cells at 1 and the rest 0; bilinear upsampling to 16 keeps
    # (7.5 / 8)^2 = 0.879 of the mass in the quadrant (1-D: 6 ones, then 0.875, 0.625 | 0.375, 0.125).
    assert quadrant_mass(m, quadrant) > (0.87 if layer in (None, "conv2_1") else 0.99)
    cams, _, _ = raw_grad_cam(model, bright(quadrant), layer)
    assert in_quadrant(*peak(cams[0], (16, 16)), quadrant)


def test_default_layer_is_the_last_relu():
    assert default_layer(quadrant_model("tl")) == "relu2_1"
    assert default_layer(VGG("A", num_classes=3, head="gap", width=0.0625, input_size=32)) == "relu5_2"


def test_a_class_with_only_negative_evidence_gives_an_all_zero_map_not_nan():
    model = quadrant_model("tl", sign=-1.0)
    maps, classes, probs = grad_cam(model, bright("tl"), target=1)
    assert classes.tolist() == [1] and torch.equal(maps, torch.zeros(1, 16, 16))
    cams, _, _ = raw_grad_cam(model, bright("tl"), target=1)
    assert peak(cams[0], (16, 16)) is None


def bar_model() -> VGG:
    """One conv with two fixed 3x3 detectors (channel 0: vertical lines, channel 1: horizontal lines), a pool and a
    GAP head: class 1 = mean of channel 0, class 0 = mean of channel 1. The head knows nothing about position."""
    model = VGG([2, "M"], in_channels=1, num_classes=2, head="gap", input_size=16, dropout=0.0)
    vertical = torch.tensor([[-1.0, 2.0, -1.0]] * 3)
    with torch.no_grad():
        model.features[0].weight.copy_(torch.stack([vertical, vertical.T])[:, None])
        model.features[0].bias.zero_()
        model.classifier[1].weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
        model.classifier[1].bias.zero_()
    return model.eval()


def test_grad_cam_is_class_discriminative_through_the_channel_weights():
    x = torch.zeros(1, 1, 16, 16)
    x[0, 0, 1:7, 3] = 1.0  # a vertical bar in the top-left
    x[0, 0, 12, 9:15] = 1.0  # a horizontal bar in the bottom-right
    model = bar_model()
    maps, classes, _ = grad_cam(model, x.repeat(2, 1, 1, 1), target=[1, 0])
    assert classes.tolist() == [1, 0]
    for m, quadrant in zip(maps, ("tl", "br")):
        assert in_quadrant(*divmod(int(m.argmax()), 16), quadrant)
        # the vertical detector answers 36 on its bar and 6 on the other bar's two ends: 36 / 42 of the mass
        assert quadrant_mass(m, quadrant) == pytest.approx(36 / 42, abs=1e-6)


# ------------------------------------------------------------------------------------------------ hand oracle
@pytest.fixture
def one_conv(fill_reference):
    """conv1_1 (1 -> 3 channels), bn1_1, relu1_1 (in place), GAP, fc: random weights and BN statistics."""
    return fill_reference(VGG([3], batch_norm=True, in_channels=1, num_classes=2, head="gap", input_size=6), seed=3)


def hand_grad_cam(model, x, layer):
    conv, bn, fc = model.features[0], model.features[1], model.classifier[1]
    z = F.conv2d(x, conv.weight, conv.bias, padding=1)
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    b = (z - bn.running_mean.view(1, -1, 1, 1)) * scale.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
    a = b.clamp_min(0)
    logits = a.mean((2, 3)) @ fc.weight.T + fc.bias
    c = logits.argmax(1)
    hw = x.shape[2] * x.shape[3]
    alpha = fc.weight[c] / hw  # d y_c / d A_k is W[c, k] / hw at every position
    open_fraction = (b > 0).float().mean((2, 3))  # below the ReLU, only where it lets the gradient through
    if layer == "relu1_1":
        maps = a
    elif layer == "bn1_1":
        alpha, maps = alpha * open_fraction, b
    else:
        alpha, maps = alpha * open_fraction * scale, z
    return (alpha[:, :, None, None] * maps).sum(1).clamp_min(0), logits, c


@pytest.mark.parametrize("layer", ["relu1_1", "bn1_1", "conv1_1"])
def test_raw_grad_cam_equals_the_hand_computed_oracle_and_leaves_the_model_as_it_was(one_conv, layer):
    model = one_conv.train()
    model.features[0].bias.requires_grad_(False)
    model.features[1].eval()  # a mixed state, to be restored as it was
    modes = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, logits, c = hand_grad_cam(model, x, layer)
    assert float(expected.amax((1, 2)).min()) > 0  # a non-trivial oracle
    with torch.no_grad():  # a caller's no_grad must not stop it
        cams, got_logits, classes = raw_grad_cam(model, x, layer)
    torch.testing.assert_close(cams, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_logits, logits, rtol=1e-5, atol=1e-6)
    assert torch.equal(classes, c)
    maps, _, probs = grad_cam(model, x, layer)
    torch.testing.assert_close(maps, normalise(expected, (6, 6)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(probs, logits.softmax(1).gather(1, c[:, None])[:, 0], rtol=1e-5, atol=1e-6)
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == [True, False, True, True, True, True]
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():  # no BN statistics updated (train mode would have)
        assert torch.equal(v, state[k]), k


def test_the_model_is_restored_even_when_the_target_is_bad(one_conv):
    model = one_conv.train()
    with pytest.raises(ConfigError, match="0..1"):
        grad_cam(model, torch.zeros(1, 1, 6, 6), target=2)
    assert all(m.training for m in model.modules())


def test_an_unknown_layer_lists_the_models_names(one_conv):
    with pytest.raises(ConfigError, match="unknown layer 'relu5_3'.*conv1_1, bn1_1, relu1_1"):
        grad_cam(one_conv, torch.zeros(1, 1, 6, 6), "relu5_3")


def test_resolve_class_takes_an_index_or_a_name():
    classes = ["T-shirt/top", "Trouser", "Bag"]
    assert [resolve_class(v, classes, 3) for v in (2, "2", "Trouser", "bag", " Bag ")] == [2, 2, 1, 2, 2]
    for bad in ("Banana", "3", "-1", 3):
        with pytest.raises(ConfigError):
            resolve_class(bad, classes, 3)


# ---------------------------------------------------------------------------------------------------- pictures
def test_overlay_blends_image_and_colour_map():
    image = np.array([[[0], [100]], [[200], [255]]], dtype=np.uint8)
    heat = np.array([[0.0, 1.0], [0.5, 0.25]])
    colour = colormaps[CMAP](heat)[..., :3] * 255
    assert np.array_equal(overlay(image, heat, 0.0), np.repeat(image, 3, axis=2))
    assert np.array_equal(overlay(image, heat, 1.0), np.rint(colour).astype(np.uint8))
    half = np.rint(0.5 * np.repeat(image, 3, axis=2) + 0.5 * colour).astype(np.uint8)
    assert np.array_equal(overlay(image, heat, 0.5), half)
    assert np.array_equal(overlay(np.zeros((4, 4, 3), np.uint8), np.ones((1, 1)), 1.0)[3, 2],
                          np.rint(np.asarray(colormaps[CMAP](1.0)[:3]) * 255).astype(np.uint8))
    with pytest.raises(ConfigError, match="alpha"):
        overlay(image, heat, 1.5)


def test_write_overlay_upscales_by_a_whole_factor(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (20, 28, 1), dtype=np.uint8)
    assert write_overlay(tmp_path / "a.png", image, np.zeros((20, 28)), alpha=0.0) == (240, 336)  # 12 x 20 >= 224
    back = np.asarray(Image.open(tmp_path / "a.png"))
    assert np.array_equal(back, np.repeat(np.repeat(np.repeat(image, 3, axis=2), 12, axis=0), 12, axis=1))
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]  # no temporary file left


def test_model_input_images_is_what_the_model_saw():
    prep = Preprocess(32, (0.3,), (0.4,), in_size=28)
    images = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    seen = model_input_images(prep(images), prep)
    assert seen.shape == (2, 32, 32, 1)
    assert np.array_equal(seen, F.pad(images, (2, 2, 2, 2)).permute(0, 2, 3, 1).numpy())  # padded with black


def test_png_names_never_clash():
    files = ["a/x.png", "b/x.jpg", "c/X.png", "x-2.png", "d/y.png"]
    assert png_names(files) == ["x.png", "x-2.png", "X-3.png", "x-2-2.png", "y.png"]


# --------------------------------------------------------------------------------------------------------- CLI
CPU = ["--device", "cpu", "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def run_dir(train_run_one_epoch):
    return train_run_one_epoch["dir"]


@pytest.fixture
def grey_files(tmp_path):
    """Three 28x28 grey images, two of them with the same stem in different folders."""
    rng = np.random.default_rng(0)
    paths = [tmp_path / "a" / "shoe.png", tmp_path / "b" / "shoe.png", tmp_path / "bag.png"]
    for path in paths:
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(path)
    return [str(p) for p in paths]


def test_cli_writes_one_png_per_image_and_explain_json(cli, run_dir, grey_files, tmp_path):
    out = tmp_path / "out"
    code, stdout, err = cli(["explain", run_dir, *grey_files, "--out", out, "--alpha", "0", *CPU])
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["bag.png", "explain.json", "shoe-2.png", "shoe.png"]
    report = json.loads((out / "explain.json").read_text())
    assert report["layer"] == "relu2_1" and report["map_size"] == [16, 16] and report["input_size"] == [32, 32]
    entries = report["images"]
    assert [e["file"] for e in entries] == grey_files
    assert [e["png"] for e in entries] == [str(out / n) for n in ("shoe.png", "shoe-2.png", "bag.png")]
    assert len(stdout.strip().splitlines()) == 4  # one line per image and the summary
    loaded = load(run_dir)
    predictions = predict_files(loaded, grey_files, top_k=1, runtime=fp32())
    for e, p in zip(entries, predictions):
        assert e["index"] == e["predicted"]["index"] == p.top[0]["index"]
        assert e["class"] == p.top[0]["class"] and e["prob"] == pytest.approx(p.top[0]["prob"], rel=1e-5)
        png = np.asarray(Image.open(e["png"]))
        assert png.shape == (224, 224, 3)  # 32 x 7
        # alpha 0: exactly the model's input (the 28x28 image padded to 32 with black), enlarged 7 times
        seen = F.pad(torch.from_numpy(decode_image(e["file"], 28, 1)[..., 0]), (2, 2, 2, 2)).numpy()
        assert np.array_equal(png, np.repeat(np.repeat(seen, 7, 0), 7, 1)[..., None].repeat(3, 2))
        assert in_quadrant(e["peak"]["row"], e["peak"]["col"], "tl", half=32)  # inside the input, at all


def test_cli_class_by_name_and_the_heat_map_in_the_png(cli, run_dir, grey_files, tmp_path):
    out = tmp_path / "out"
    code, stdout, err = cli(["explain", run_dir, grey_files[2], "--out", out, "--class", "bag", "--alpha", "1",
                             "--layer", "pool1", *CPU])
    assert code == 0, err
    entry = json.loads((out / "explain.json").read_text())["images"][0]
    assert entry["index"] == 8 and entry["class"] == "Bag" and entry["layer"] == "pool1"
    loaded = load(run_dir)
    x = loaded.preprocess(torch.from_numpy(decode_image(grey_files[2], 28, 1)).permute(2, 0, 1)[None])
    maps, _, probs = grad_cam(loaded.model, x, "pool1", target=8)
    assert entry["prob"] == pytest.approx(float(probs[0]), rel=1e-5)
    big = F.interpolate(maps[:1, None], size=(224, 224), mode="bilinear", align_corners=False)[0, 0]
    expected = np.rint(colormaps[CMAP](big.clamp(0, 1).numpy())[..., :3] * 255).astype(np.uint8)
    assert np.abs(np.asarray(Image.open(entry["png"])).astype(int) - expected).max() <= 1
    assert "Bag" in stdout and "pool1 (16x16)" in stdout


def test_cli_unreadable_file_is_reported_and_the_others_still_done(cli, run_dir, grey_files, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    out = tmp_path / "out"
    code, stdout, err = cli(["explain", run_dir, broken, grey_files[2], "--out", out, *CPU])
    assert code == 2
    assert err.strip().splitlines() == [err.strip()] and "broken.png" in err and "Traceback" not in err
    entries = json.loads((out / "explain.json").read_text())["images"]
    assert "error" in entries[0] and entries[1]["png"] == str(out / "bag.png")
    assert (out / "bag.png").is_file() and not (out / "broken.png").exists()
    alone = tmp_path / "alone"
    code, stdout, err = cli(["explain", run_dir, broken, "--out", alone, *CPU])
    assert code == 2 and "nothing written" in err and not (alone / "explain.json").exists()


@pytest.mark.parametrize("extra, fragments", [
    (["--layer", "conv5_3"], ["unknown layer 'conv5_3'", "conv1_1, relu1_1, pool1, conv2_1, relu2_1, pool2"]),
    (["--class", "Banana"], ["'Banana'", "0..9", "T-shirt/top"]),
    (["--class", "10"], ["0..9"]),
    (["--precision", "bf16"], ["fp32"]),
])
def test_cli_bad_options_are_one_line_errors(cli, one_line_error, run_dir, grey_files, tmp_path, extra, fragments):
    out = tmp_path / "out"
    code, _, err = cli(["explain", run_dir, grey_files[2], "--out", out, *extra, *CPU])
    one_line_error(code, err, *fragments)
    assert not (out / "bag.png").exists()


def test_cli_refuses_an_out_that_is_a_file(cli, one_line_error, run_dir, grey_files, tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("mine")
    code, _, err = cli(["explain", run_dir, grey_files[2], "--out", taken, *CPU])
    one_line_error(code, err, "existing file")
    assert taken.read_text() == "mine"
    with pytest.raises(OutputError):
        from vggnet.use.explain import check_out_dir

        check_out_dir(taken)
