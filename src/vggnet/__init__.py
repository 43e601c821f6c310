"""vggnet: the VGG family of convolutional networks (Simonyan & Zisserman, arXiv:1409.1556)."""

from .errors import CheckpointError, ConfigError, DataError, InputSizeError, VggnetError
from .analysis import Summary, summarize
from .models import VGG, create_model, list_models, model_from_config, to_dense

__version__ = "0.1.0"

__all__ = [
    "VGG",
    "Summary",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "InputSizeError",
    "VggnetError",
    "create_model",
    "list_models",
    "model_from_config",
    "summarize",
    "to_dense",
    "__version__",
]
