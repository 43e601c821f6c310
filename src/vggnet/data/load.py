"""``load_dataset``: one entry point for every dataset spec (catalogue names and ``folder:PATH``)."""

from __future__ import annotations

import os

from vggnet.data.catalogue import canonical_name
from vggnet.data.cifar import load_cifar
from vggnet.data.dataset import ImageDataset
from vggnet.data.folder import load_folder
from vggnet.data.idx import load_fashion_mnist
from vggnet.base.errors import DataError


def load_dataset(spec: str, data_dir: str | os.PathLike | None = None,
                 image_size: int | None = None, channels: int = 3) -> tuple[ImageDataset, ImageDataset]:
    """Load ``(train, test)`` for ``spec``: ``fashion-mnist``, ``cifar10``, ``cifar100`` or ``folder:PATH``.

    ``data_dir``, when given, is the only place searched -- a missing one is a DataError naming it, never a fallback
    to ``$VGGNET_DATA`` or the default places (see :mod:`vggnet.data.catalogue`). ``image_size`` only matters
    for ``folder:``, whose images are decoded by :func:`vggnet.data.images.decode_image` (resized on the shorter side
    and centre-cropped to ``image_size`` squared, default 64); the other datasets keep their native size and
    :class:`vggnet.data.Preprocess` adapts them to the model. ``channels`` too only matters for ``folder:`` (3: RGB,
    1: grey); the other datasets have their own.
    """
    spec = spec.strip()
    if spec.lower().startswith("folder:"):
        path = spec[len("folder:"):]
        if not path:
            raise DataError("dataset spec 'folder:' has no path; use folder:PATH with one subfolder per class")
        return load_folder(path, image_size=64 if image_size is None else image_size, channels=channels)
    key = canonical_name(spec)
    if key == "fashion-mnist":
        return load_fashion_mnist(data_dir)
    return load_cifar(key, data_dir)
