"""Prediction on image files: decoding any mode, fitting any size, top-k equal to the model's softmax, errors."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from vggnet.checkpoint import load
from vggnet.errors import DataError
from vggnet.predict import fit_image, predict_files, read_image

ORANGE, BLUE = (200, 100, 50), (10, 20, 250)
# Luminance by hand (ITU-R 601-2, as Pillow's "L" conversion): 0.299 R + 0.587 G + 0.114 B, rounded down.
ORANGE_L, BLUE_L = 124, 43  # 124.2 and 43.23


def halves(left, right, mode="RGB", size=(28, 28)):
    """An image whose left half is ``left`` and right half ``right``."""
    image = Image.new(mode, size, left)
    image.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return image


def expected_halves(left, right, size=(28, 28)):
    out = torch.full((1, size[1], size[0]), left, dtype=torch.uint8)
    out[:, :, size[0] // 2:] = right
    return out


@pytest.fixture(scope="module")
def loaded(train_run_one_epoch):
    return load(train_run_one_epoch["dir"])


@pytest.fixture
def images(tmp_path):
    """Files of every kind predict must read: colour, transparency, palette, large, tiny, JPEG."""
    rng = np.random.default_rng(0)
    files = {name: tmp_path / filename for name, filename in (
        ("rgb", "rgb.png"), ("rgba", "rgba.png"), ("palette", "palette.png"), ("large", "large.png"),
        ("tiny", "tiny.png"), ("jpeg", "photo.jpg"))}
    halves(ORANGE, BLUE).save(files["rgb"])
    halves(ORANGE + (255,), BLUE + (0,), "RGBA").save(files["rgba"])
    palette = Image.new("P", (28, 28), 0)
    palette.putpalette(ORANGE + BLUE + (0, 0, 0) * 254)
    palette.paste(1, (14, 0, 28, 28))
    palette.save(files["palette"], transparency=1)
    Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)).save(files["large"])  # 300 wide, 200 high
    Image.fromarray(rng.integers(0, 256, (10, 10), dtype=np.uint8)).save(files["tiny"])
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(files["jpeg"])
    return files


# ------------------------------------------------------------------------------------------------ decoding
def test_read_image_colour_into_grayscale_and_rgb(images):
    assert torch.equal(read_image(images["rgb"], 1), expected_halves(ORANGE_L, BLUE_L))
    rgb = read_image(images["rgb"], 3)
    assert rgb.shape == (3, 28, 28) and rgb.dtype == torch.uint8
    assert rgb[:, 0, 0].tolist() == list(ORANGE) and rgb[:, 0, 27].tolist() == list(BLUE)


def test_read_image_composites_transparency_onto_black(images, tmp_path):
    assert torch.equal(read_image(images["rgba"], 1), expected_halves(ORANGE_L, 0))
    assert torch.equal(read_image(images["palette"], 1), expected_halves(ORANGE_L, 0))  # palette index 1: clear
    halves((77, 255), (77, 0), "LA").save(tmp_path / "la.png")
    assert torch.equal(read_image(tmp_path / "la.png", 1), expected_halves(77, 0))
    gray = read_image(tmp_path / "la.png", 3)
    assert gray[:, 0, 0].tolist() == [77, 77, 77] and gray[:, 0, 27].tolist() == [0, 0, 0]


def test_read_image_errors_name_the_file(tmp_path):
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(DataError, match="text.png: not a readable image"):
        read_image(tmp_path / "text.png", 1)
    with pytest.raises(DataError, match="missing.png: no such file"):
        read_image(tmp_path / "missing.png", 1)
    with pytest.raises(DataError, match="is a directory"):
        read_image(tmp_path, 1)


def test_fit_image_crops_the_centre_and_keeps_native_sizes():
    image = torch.arange(28 * 42, dtype=torch.int64).remainder(256).to(torch.uint8).view(1, 28, 42)
    assert torch.equal(fit_image(image, 28), image[:, :, 7:35])  # shorter side already 28: centre crop only
    assert torch.equal(fit_image(image.transpose(1, 2), 28), image.transpose(1, 2)[:, 7:35, :])
    square = image[:, :, :28]
    assert fit_image(square, 28) is square
    for h, w in ((200, 300), (10, 10), (5, 90)):
        out = fit_image(torch.full((1, h, w), 99, dtype=torch.uint8), 28)
        assert out.shape == (1, 28, 28) and out.dtype == torch.uint8 and bool((out == 99).all())


# ------------------------------------------------------------------------------------------------ predicting
def by_hand(loaded, path, flip=False):
    """Softmax of the model on the file, computed step by step: decode, fit to 28, preprocess, forward."""
    x = loaded.preprocess(fit_image(read_image(path, 1), 28)[None])
    with torch.no_grad():
        probs = loaded.model(x).softmax(1)[0]
        if flip:
            probs = (probs + loaded.model(x.flip(3)).softmax(1)[0]) / 2
    return probs


def test_predict_files_equals_the_models_softmax(loaded, images):
    paths = [images[k] for k in ("rgb", "rgba", "palette", "large", "tiny", "jpeg")]
    results = predict_files(loaded, [str(p) for p in paths], top_k=5)
    assert [r.file for r in results] == [str(p) for p in paths]
    for path, result in zip(paths, results):
        assert result.error is None and len(result.top) == 5
        probs = [t["prob"] for t in result.top]
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
        expected = by_hand(loaded, path)
        values, indices = expected.topk(5)
        assert [t["index"] for t in result.top] == indices.tolist()
        assert probs == pytest.approx(values.tolist(), abs=1e-6)
        assert [t["class"] for t in result.top] == [loaded.classes[i] for i in indices.tolist()]


def test_predict_on_a_test_image_matches_the_training_pipeline(loaded, train_run_one_epoch, tmp_path):
    dataset = train_run_one_epoch["test_set"]
    Image.fromarray(dataset.images[3, 0].numpy()).save(tmp_path / "test3.png")
    (result,) = predict_files(loaded, [str(tmp_path / "test3.png")], top_k=10)
    with torch.no_grad():
        probs = train_run_one_epoch["model"](train_run_one_epoch["preprocess"](dataset.images[3:4])).softmax(1)[0]
    assert sorted(t["index"] for t in result.top) == list(range(10))
    assert sum(t["prob"] for t in result.top) == pytest.approx(1.0, abs=1e-6)
    for t in result.top:
        assert t["prob"] == pytest.approx(probs[t["index"]].item(), abs=1e-6)


def test_top_k_is_capped_at_the_number_of_classes_and_flip_tta_averages(loaded, images):
    (result,) = predict_files(loaded, [str(images["large"])], top_k=50, tta="flip")
    expected = by_hand(loaded, images["large"], flip=True)
    assert len(result.top) == 10
    assert [t["prob"] for t in result.top] == pytest.approx(expected.sort(descending=True).values.tolist(), abs=1e-6)


def test_class_names_come_from_model_json(train_run_one_epoch, tmp_path, images):
    run_dir = tmp_path / "run"
    shutil.copytree(train_run_one_epoch["dir"], run_dir)
    meta = json.loads((run_dir / "model.json").read_text())
    meta["classes"] = [f"kind-{i}" for i in range(10)]
    (run_dir / "model.json").write_text(json.dumps(meta))
    (result,) = predict_files(load(run_dir), [str(images["rgb"])], top_k=3)
    assert [t["class"] for t in result.top] == [f"kind-{t['index']}" for t in result.top]


def test_unreadable_files_get_their_own_error(loaded, images, tmp_path):
    (tmp_path / "text.png").write_text("not an image")
    files = [str(images["rgb"]), str(tmp_path / "text.png"), str(tmp_path / "missing.png"), str(tmp_path),
             str(images["tiny"])]
    results = predict_files(loaded, files, top_k=2)
    assert [r.file for r in results] == files
    assert [r.error is None for r in results] == [True, False, False, False, True]
    assert "not a readable image" in results[1].error and "no such file" in results[2].error
    assert "is a directory" in results[3].error
    assert results[1].to_dict() == {"file": files[1], "error": results[1].error}
    assert [t["index"] for t in results[4].top] == by_hand(loaded, images["tiny"]).topk(2).indices.tolist()


def test_cli_predict_json_with_a_bad_file(train_run_one_epoch, images, tmp_path, train_cli):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    code, out, err = train_cli(["predict", train_run_one_epoch["dir"], images["rgb"], bad, "--json", "--top-k", "3"])
    assert code == 2
    records = json.loads(out)
    assert [set(r) for r in records] == [{"file", "top"}, {"file", "error"}]
    assert records[0]["file"] == str(images["rgb"]) and len(records[0]["top"]) == 3
    assert records[1]["file"] == str(bad) and "bad.png" in records[1]["error"]
    assert len(err.strip().splitlines()) == 1 and "bad.png" in err and "Traceback" not in err
    expected = by_hand(load(train_run_one_epoch["dir"]), images["rgb"]).topk(3)
    assert [t["index"] for t in records[0]["top"]] == expected.indices.tolist()
    assert [t["prob"] for t in records[0]["top"]] == pytest.approx(expected.values.tolist(), abs=1e-6)
