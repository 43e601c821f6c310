"""Prediction on image files: top-k equal to the model's softmax on the shared decoder's pixels, errors.

The decoder itself (modes, transparency, resizing, errors) is tested in tests/data/test_images.py."""

import json
import shutil

import pytest
import torch
from PIL import Image

from vggnet.base.files import load_tensors, safetensors_bytes
from vggnet.store.card import CARD_KEY
from vggnet.store.rundir import load
from vggnet.data import decode_image
from vggnet.use.predict import predict_files
from vggnet.runtime import resolve_runtime

ORANGE, BLUE = (200, 100, 50), (10, 20, 250)


def fp32():
    """The CPU in fp32: the predictions are compared with the model's own fp32 softmax (on a CPU with native bf16,
    predict's default precision would be bf16)."""
    return resolve_runtime("cpu", "fp32", threads=torch.get_num_threads())


def halves(left, right, mode="RGB", size=(28, 28)):
    """An image whose left half is ``left`` and right half ``right``."""
    image = Image.new(mode, size, left)
    image.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return image


@pytest.fixture(scope="module")
def loaded(train_run_one_epoch):
    return load(train_run_one_epoch["dir"])


@pytest.fixture
def images(image_files):
    return image_files


# ------------------------------------------------------------------------------------------------ predicting
def by_hand(loaded, path, flip=False):
    """Softmax of the model on the file, computed step by step: decode and fit to 28, preprocess, forward."""
    x = loaded.preprocess(torch.from_numpy(decode_image(path, 28, 1)).permute(2, 0, 1)[None])
    with torch.no_grad():
        probs = loaded.model(x).softmax(1)[0]
        if flip:
            probs = (probs + loaded.model(x.flip(3)).softmax(1)[0]) / 2
    return probs


def test_predict_files_equals_the_models_softmax(loaded, images):
    paths = [images[k] for k in ("rgb", "rgba", "palette", "large", "tiny", "jpeg")]
    results = predict_files(loaded, [str(p) for p in paths], top_k=5, runtime=fp32())
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
    (result,) = predict_files(loaded, [str(tmp_path / "test3.png")], top_k=10, runtime=fp32())
    with torch.no_grad():
        probs = train_run_one_epoch["model"](train_run_one_epoch["preprocess"](dataset.images[3:4])).softmax(1)[0]
    assert sorted(t["index"] for t in result.top) == list(range(10))
    assert sum(t["prob"] for t in result.top) == pytest.approx(1.0, abs=1e-6)
    for t in result.top:
        assert t["prob"] == pytest.approx(probs[t["index"]].item(), abs=1e-6)


def test_top_k_is_capped_at_the_number_of_classes_and_flip_tta_averages(loaded, images):
    (result,) = predict_files(loaded, [str(images["large"])], top_k=50, runtime=fp32(), tta="flip")
    expected = by_hand(loaded, images["large"], flip=True)
    assert len(result.top) == 10
    assert [t["prob"] for t in result.top] == pytest.approx(expected.sort(descending=True).values.tolist(), abs=1e-6)


def test_class_names_come_from_model_json(train_run_one_epoch, tmp_path, images):
    run_dir = tmp_path / "run"
    shutil.copytree(train_run_one_epoch["dir"], run_dir)
    meta = json.loads((run_dir / "model.json").read_text())
    meta["classes"] = [f"kind-{i}" for i in range(10)]
    weights = run_dir / "model.safetensors"  # the card loading reads is the one inside the weights file
    weights.write_bytes(safetensors_bytes(load_tensors(weights), {CARD_KEY: json.dumps(meta)}))
    (run_dir / "model.json").write_text(json.dumps(meta))
    (result,) = predict_files(load(run_dir), [str(images["rgb"])], top_k=3, runtime=fp32())
    assert [t["class"] for t in result.top] == [f"kind-{t['index']}" for t in result.top]


def test_unreadable_files_get_their_own_error(loaded, images, tmp_path):
    (tmp_path / "text.png").write_text("not an image")
    files = [str(images["rgb"]), str(tmp_path / "text.png"), str(tmp_path / "missing.png"), str(tmp_path),
             str(images["tiny"])]
    results = predict_files(loaded, files, top_k=2, runtime=fp32())
    assert [r.file for r in results] == files
    assert [r.error is None for r in results] == [True, False, False, False, True]
    assert "not a readable image" in results[1].error and "no such file" in results[2].error
    assert "is a directory" in results[3].error
    assert results[1].to_dict() == {"file": files[1], "error": results[1].error}
    assert [t["index"] for t in results[4].top] == by_hand(loaded, images["tiny"]).topk(2).indices.tolist()


def test_cli_predict_json_with_a_bad_file(train_run_one_epoch, images, tmp_path, train_cli):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    code, out, err = train_cli(["predict", train_run_one_epoch["dir"], images["rgb"], bad, "--json", "--top-k", "3",
                                   "--precision", "fp32"])
    assert code == 2
    records = json.loads(out)
    assert [set(r) for r in records] == [{"file", "top"}, {"file", "error"}]
    assert records[0]["file"] == str(images["rgb"]) and len(records[0]["top"]) == 3
    assert records[1]["file"] == str(bad) and "bad.png" in records[1]["error"]
    assert len(err.strip().splitlines()) == 1 and "bad.png" in err and "Traceback" not in err
    expected = by_hand(load(train_run_one_epoch["dir"]), images["rgb"]).topk(3)
    assert [t["index"] for t in records[0]["top"]] == expected.indices.tolist()
    assert [t["prob"] for t in records[0]["top"]] == pytest.approx(expected.values.tolist(), abs=1e-6)
