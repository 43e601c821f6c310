"""The package-level Python API mirrors the CLI: vggnet.train / load / evaluate / load_dataset."""

import torch

import vggnet
from vggnet import training
from vggnet.evaluation import metrics as evaluation
from vggnet.store import card, rundir
from vggnet.store import load as source


def test_package_level_names_are_the_module_functions():
    assert vggnet.train is training.train
    assert vggnet.resume is training.resume
    assert vggnet.TrainConfig is training.TrainConfig
    assert vggnet.evaluate is evaluation.evaluate
    assert vggnet.load is source.load
    assert vggnet.ModelCard is card.ModelCard
    assert vggnet.RunDir is rundir.RunDir
    # The modules stay reachable under their own names.
    assert vggnet.training.build_run is training.build_run


def test_train_load_evaluate_round_trip(tmp_path, train_data_dir):
    result = vggnet.train(model="custom", arch=[8, "M", 16, "M"], dataset="fashion-mnist", data_dir=str(train_data_dir),
                          image_size=32, epochs=1, batch_size=32, schedule="constant", lr=0.05, threads=1,
                          precision="fp32", progress=False, out=str(tmp_path / "run"))
    loaded = vggnet.load(tmp_path / "run")
    _, test_set = vggnet.load_dataset("fashion-mnist", str(train_data_dir))
    metrics = vggnet.evaluate(loaded.model, test_set, loaded.preprocess)
    assert metrics.n == len(test_set)
    assert metrics.top1 == result["test_acc"]  # the same whole-test-set number training recorded
    assert isinstance(loaded.model, vggnet.VGG) and loaded.classes == test_set.classes
    assert torch.isfinite(torch.tensor(metrics.loss))
