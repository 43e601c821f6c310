"""vggnet: the VGG family of convolutional networks (Simonyan & Zisserman, arXiv:1409.1556).

Build and analyse::

    model = vggnet.create_model("vgg16_bn", num_classes=10, input_size=32, head="fitted")
    summary = vggnet.summarize(model)

Train, load, evaluate (the Python side of ``vggnet train``, ``vggnet eval``)::

    result = vggnet.train(epochs=5, out="runs/quick")        # keyword options as on the command line
    loaded = vggnet.load("runs/quick")                       # model + preprocessing + class names
    train_set, test_set = vggnet.load_dataset("fashion-mnist")   # in-memory uint8 images and labels
    metrics = vggnet.evaluate(loaded.model, test_set, loaded.preprocess)

Use what others trained (the Python side of ``vggnet features``)::

    feats = vggnet.extract_features(loaded, ["a.jpg"], ["relu4_2"], pool="avg")   # .maps["relu4_2"]: (1, C)
    stages = vggnet.FeaturesOnly(loaded.model)(x)                 # one map per max-pool, as model.feature_info
    loss = vggnet.PerceptualLoss("runs/quick", layers=["relu1_1", "relu2_1"])(output, target)   # images in [0, 1]

Ship it and read it like the paper (``vggnet export``, ``compress``, ``eval --scales``, ``explain``)::

    vggnet.export_model(loaded.model, "onnx", "model.onnx", dynamic_batch=True)   # unchecked; the CLI checks
    small = vggnet.compress_model(vggnet.load("vgg16-397923af.pth").model, svd={"fc6": 1024}, int8=True).model
    result = vggnet.evaluate_multiscale(loaded.model, test_set, loaded.preprocess,
                                        vggnet.Protocol((32, 40), dense=True, crops=(5, 5), flip=True))
    maps, classes, probs = vggnet.grad_cam(loaded.model, x, layer="relu4_2")       # (N, H, W) in [0, 1]
"""

from importlib import import_module
from typing import Any

from vggnet.base.errors import CheckpointError, ConfigError, DataError, InputSizeError, OutputError, VggnetError
from vggnet.base.version import __version__
from vggnet.net.analysis import Summary, summarize
from vggnet.net.dense import to_dense
from vggnet.net.models import VGG, list_models, model_from_config

# Imported on first use, so `import vggnet` (and the CLI's start) stays light. Nothing inside the package imports
# this module (an import-linter contract): it is the public face of every layer.
_LAZY = {
    "create_model": "vggnet.store.build",  # with weights= and features_only=
    "train": "vggnet.training",
    "resume": "vggnet.training",
    "TrainConfig": "vggnet.training",
    "resolve_config": "vggnet.training",
    "evaluate": "vggnet.evaluation.metrics",
    "EvalResult": "vggnet.evaluation.metrics",
    "load": "vggnet.store.load",  # a run directory or a weights file
    "LoadedModel": "vggnet.store.card",
    "ModelCard": "vggnet.store.card",
    "RunDir": "vggnet.store.rundir",
    "load_dataset": "vggnet.data",
    "optimize_for_inference": "vggnet.evaluation.inference",
    "extract_features": "vggnet.use.features",
    "FeaturesOnly": "vggnet.net.features_only",
    "PerceptualLoss": "vggnet.use.perceptual",
    "export_model": "vggnet.use.export",
    "compress_model": "vggnet.use.compress",
    "evaluate_multiscale": "vggnet.evaluation.multiscale",
    "evaluate_multiscale_streamed": "vggnet.evaluation.multiscale_streamed",
    "Protocol": "vggnet.evaluation.multiscale",
    "grad_cam": "vggnet.use.explain",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vggnet' has no attribute {name!r}")


__all__ = [
    "VGG",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "InputSizeError",
    "OutputError",
    "Summary",
    "VggnetError",
    "list_models",
    "model_from_config",
    "summarize",
    "to_dense",
    "__version__",
    *_LAZY,
]
