"""The one test-set builder: the test split a loaded model is scored on, as that model saw its data.

Every verb that measures a model on a test set (``vggnet eval``, ``compress``, ``export``'s check) takes it from
:func:`load_test_set`, which honours what the model was trained on: the run's ``--classes`` (the same classes in the
same order, relabelled as in training), its input channels (a folder decoded grey for a 1-channel model) and its
image size; then :func:`check_fits` refuses, in one line, a test set the model cannot score.
"""

from __future__ import annotations

import os

from vggnet.base.errors import DataError
from vggnet.data import ImageDataset, load_dataset
from vggnet.data.paper import TestTransform
from vggnet.data.stream import evaluation_set, is_prepared, open_prepared
from vggnet.store.card import LoadedModel


def load_test_set(loaded: LoadedModel, dataset: str, data_dir: str | os.PathLike | None = None,
                  source: str | os.PathLike | None = None) -> ImageDataset:
    """The test split of ``dataset`` as ``loaded`` is scored on, checked to fit it (:func:`check_fits`).

    A run directory: at its training image size, from its own data directory unless ``data_dir`` is given, and on
    its own dataset restricted to the classes it was trained on (``--classes``). A weights file: at its
    preprocessing's decode size (folder images decoded as ``vggnet predict`` decodes files). A folder is decoded
    with the model's channel count."""
    card = loaded.card
    train_config = card.train_config or {}
    if loaded.run_dir is not None:
        recorded = train_config.get("data_dir")
        if data_dir is None and recorded and os.path.isdir(recorded):  # the run's own copy, while it is there
            data_dir = recorded
        image_size = card.image_size
    else:
        image_size = loaded.preprocess.decode_size
    channels = int(loaded.model.in_channels)
    streamed = is_prepared(dataset)
    test = open_prepared(dataset)[1] if streamed else load_dataset(dataset, data_dir, image_size, channels=channels)[1]
    classes = train_config.get("classes")
    if classes and dataset == card.dataset and len(test.classes) != loaded.model.num_classes:
        test = test.select_classes(classes)  # the run trained on these classes, relabelled in this order
    if streamed:  # decoded as predict decodes a file: the shorter side at the decode size, its centre square
        size = loaded.preprocess.decode_size
        test = evaluation_set(test, TestTransform(scale=size, crop=size, channels=channels), size, channels)
    check_fits(test, loaded, dataset, source if source is not None else (loaded.run_dir or "the model"))
    return test


def check_fits(test: ImageDataset, loaded: LoadedModel, dataset: str, source: str | os.PathLike) -> None:
    """DataError unless ``test``'s images and classes are what the model of ``loaded`` takes and gives."""
    model = loaded.model
    if test.images.shape[1] != model.in_channels or len(test.classes) != model.num_classes:
        raise DataError(f"{dataset} has {test.images.shape[1]} channel(s) and {len(test.classes)} classes; the model "
                        f"in {source} expects {model.in_channels} and {model.num_classes}: evaluate it on a dataset "
                        "with its channels and classes (--dataset)")
