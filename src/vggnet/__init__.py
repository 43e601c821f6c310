"""vggnet: the VGG family of convolutional networks (Simonyan & Zisserman, arXiv:1409.1556).

Build and analyse::

    model = vggnet.create_model("vgg16_bn", num_classes=10, input_size=32, head="fitted")
    summary = vggnet.summarize(model)

Train, load, evaluate (the Python side of ``vggnet train``, ``vggnet eval``)::

    result = vggnet.train(epochs=5, out="runs/quick")        # keyword options as on the command line
    loaded = vggnet.load("runs/quick")                       # model + preprocessing + class names
    train_set, test_set = vggnet.load_dataset("fashion-mnist")   # in-memory uint8 images and labels
    metrics = vggnet.evaluate(loaded.model, test_set, loaded.preprocess)
"""

from importlib import import_module
from typing import Any

from .analysis import Summary, summarize
from .errors import CheckpointError, ConfigError, DataError, InputSizeError, VggnetError
from .models import VGG, create_model, list_models, model_from_config, to_dense

__version__ = "0.1.0"

# Imported on first use, so `import vggnet` (and the CLI's start) stays light.
_LAZY = {
    "train": ".training",
    "resume": ".training",
    "TrainConfig": ".training",
    "resolve_config": ".training",
    "evaluate": ".evaluation",
    "EvalResult": ".evaluation",
    "load": ".rundir",
    "LoadedModel": ".rundir",
    "ModelCard": ".rundir",
    "RunDir": ".rundir",
    "load_dataset": ".data",
    "optimize_for_inference": ".inference",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vggnet' has no attribute {name!r}")


__all__ = [
    "VGG",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "InputSizeError",
    "Summary",
    "VggnetError",
    "create_model",
    "list_models",
    "model_from_config",
    "summarize",
    "to_dense",
    "__version__",
    *_LAZY,
]
