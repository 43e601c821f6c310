"""One loader, one test-set builder: a run's weights file used on its own answers as its run does, and every verb
that scores a run scores it on the data it was trained on (issue 20's silent wrong answers)."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from vggnet.data import load_dataset
from vggnet.evaluation.testset import load_test_set
from vggnet.store.load import load
from vggnet.use.predict import predict_files


@pytest.fixture(scope="module")
def classes_run(tmp_path_factory, train_options):
    """A one-epoch run on five of the ten classes (``--classes 1,3,5,7,9``), as docs/TRANSFER.md shows."""
    from vggnet.training import resolve_config, train

    run_dir = tmp_path_factory.mktemp("classes") / "run"
    train(resolve_config(**train_options(out=str(run_dir), epochs=1, classes=[1, 3, 5, 7, 9])))
    return run_dir


def test_a_copied_model_safetensors_loads_with_its_own_card(train_run, tmp_path):
    """The card inside a run's model.safetensors is the file's: classes, preprocessing and the 1-channel 32-px
    model, not a torchvision file's RGB 224 guess (which answered '5 18.4%' where the run said 'Ankle boot')."""
    copy = tmp_path / "elsewhere.safetensors"
    shutil.copy(train_run["dir"] / "model.safetensors", copy)
    as_run, as_file = load(train_run["dir"]), load(copy)
    assert as_file.classes == as_run.classes and as_file.classes[9] == "Ankle boot"
    assert as_file.preprocess.to_dict() == as_run.preprocess.to_dict()
    assert as_file.model.config == as_run.model.config and as_file.model.in_channels == 1
    x = torch.rand(3, 1, 32, 32)
    assert torch.equal(as_file.model(x), as_run.model(x))


def test_predict_on_the_copied_file_answers_as_the_run(train_run, tmp_path):
    copy = tmp_path / "model.safetensors"
    shutil.copy(train_run["dir"] / "model.safetensors", copy)
    image = tmp_path / "boot.png"
    Image.fromarray((np.arange(28 * 28).reshape(28, 28) % 251).astype(np.uint8)).save(image)
    from vggnet.runtime import resolve_runtime

    runtime = resolve_runtime("cpu", "fp32", threads=1)
    by_run = predict_files(load(train_run["dir"]), [str(image)], 3, runtime)[0].top
    by_file = predict_files(load(copy), [str(image)], 3, runtime)[0].top
    assert by_file == by_run and by_run[0]["class"] in load(train_run["dir"]).classes


def test_a_model_override_on_a_vggnet_file_is_refused(train_run, one_line_error, cli):
    code, _, err = cli(["predict", str(train_run["dir"] / "model.safetensors"), "x.png", "--model", "vgg11"])
    one_line_error(code, err, "card fixes the architecture")


def test_the_test_set_of_a_classes_run_is_its_classes(classes_run, train_data_dir):
    """eval and compress failed on every --classes run ('has 1 channel(s) and 10 classes; the model expects 1 and
    5'): the test set is the run's five classes, relabelled 0..4 in the order trained."""
    loaded = load(classes_run)
    test = load_test_set(loaded, "fashion-mnist", str(train_data_dir))
    full = load_dataset("fashion-mnist", str(train_data_dir))[1]
    keep = [1, 3, 5, 7, 9]
    assert test.classes == [full.classes[c] for c in keep] == loaded.classes
    mask = torch.isin(full.labels, torch.tensor(keep))
    assert torch.equal(test.images, full.images[mask])
    assert torch.equal(test.labels, torch.tensor([keep.index(int(c)) for c in full.labels[mask]]))


def test_eval_and_compress_work_on_a_classes_run(classes_run, train_data_dir, cli, tmp_path):
    code, out, err = cli(["eval", str(classes_run), "--data-dir", str(train_data_dir), "--json", "--device", "cpu"])
    assert code == 0, err
    record = json.loads(out)
    assert len(record["classes"]) == 5 and record["n"] == int(sum(1 for c in range(len(
        load_dataset("fashion-mnist", str(train_data_dir))[1].labels)) if c % 10 in (1, 3, 5, 7, 9)))
    code, out, err = cli(["compress", str(classes_run), "--out", str(tmp_path / "small"), "--half",
                          "--data-dir", str(train_data_dir), "--rounds", "1"])
    assert code == 0, err


def test_a_grey_model_is_evaluated_on_a_folder_decoded_grey(train_run, tmp_path, cli):
    """Folders always decoded RGB, so a 1-channel model could not be evaluated on one."""
    loaded = load(train_run["dir"])
    root = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    names = [name.replace("/", "-") for name in loaded.classes]
    for name in names:
        (root / name).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (28, 28, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    test = load_test_set(loaded, f"folder:{root}")
    assert test.images.shape[1] == 1 and test.classes == sorted(names)
    grey = np.asarray(Image.open(root / test.classes[0] / "0.png").convert("L"))
    assert test.images.shape[2:] == (32, 32) and grey.shape == (28, 28)
    code, out, err = cli(["eval", str(train_run["dir"]), "--dataset", f"folder:{root}", "--json", "--device", "cpu",
                          "--out", str(tmp_path / "ev")])
    assert code == 0, err
