"""The catalogue of known datasets -- what is known about each one -- and where datasets are looked for.

Where data is looked for (first hit wins):

* with a ``data_dir`` (the CLI's ``--data-dir``): ``data_dir``, then ``data_dir/NAME``, and nowhere else. An explicit
  directory that does not exist, or lacks the dataset, is an error naming it -- never a silent fallback to another
  copy of the data;
* without one, in order:

  1. ``$VGGNET_DATA``, then ``$VGGNET_DATA/NAME``;
  2. system directories from the catalogue (Fashion-MNIST: ``/usr/share/datasets/fashion-mnist``, installed by the
     Debian package ``dataset-fashion-mnist``);
  3. the download directory of ``vggnet data fetch NAME``: ``$XDG_CACHE_HOME/vggnet/data/NAME``
     (``~/.cache/vggnet/data/NAME`` by default).
"""

from __future__ import annotations

import os
import pathlib

from vggnet.base.files import cache_root
from vggnet.base.errors import DataError

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR100_CLASSES = [
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
    "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger",
    "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
]

#: Everything known about each downloadable dataset. ``files`` maps each file name to its md5 as published by the
#: dataset's authors (the checksums of the compressed files as distributed); ``url`` is the base directory URL
#: (Fashion-MNIST, one URL per file) or the archive URL (CIFAR, one file).
DATASETS: dict[str, dict] = {
    "fashion-mnist": {
        "title": "Fashion-MNIST",
        "format": "idx",
        "url": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "files": {
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
        "classes": FASHION_MNIST_CLASSES,
        "size": 28,
        "channels": 1,
        "num_train": 60000,
        "num_test": 10000,
        "system_dirs": ["/usr/share/datasets/fashion-mnist"],
        "debian_package": "dataset-fashion-mnist",
    },
    "cifar10": {
        "title": "CIFAR-10",
        "format": "cifar-python",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "files": {"cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a"},
        "folder": "cifar-10-batches-py",
        "train_members": [f"data_batch_{i}" for i in range(1, 6)],
        "test_members": ["test_batch"],
        "meta_member": "batches.meta",
        "label_key": "labels",
        "names_key": "label_names",
        "classes": CIFAR10_CLASSES,
        "size": 32,
        "channels": 3,
        "num_train": 50000,
        "num_test": 10000,
        "system_dirs": [],
    },
    "cifar100": {
        "title": "CIFAR-100",
        "format": "cifar-python",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "files": {"cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85"},
        "folder": "cifar-100-python",
        "train_members": ["train"],
        "test_members": ["test"],
        "meta_member": "meta",
        "label_key": "fine_labels",
        "names_key": "fine_label_names",
        "classes": CIFAR100_CLASSES,
        "size": 32,
        "channels": 3,
        "num_train": 50000,
        "num_test": 10000,
        "system_dirs": [],
    },
}

_ALIASES = {
    "fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist", "fmnist": "fashion-mnist",
    "cifar-10": "cifar10", "cifar_10": "cifar10", "cifar-100": "cifar100", "cifar_100": "cifar100",
}


def canonical_name(name: str) -> str:
    """The catalogue key for ``name`` (accepts aliases such as ``cifar-10``); DataError listing the known names."""
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)} (or folder:PATH for an image folder, "
                        "or a folder vggnet data prepare wrote)")
    return key


def download_root() -> pathlib.Path:
    """Where ``vggnet data fetch`` stores datasets by default: ``$XDG_CACHE_HOME/vggnet/data`` (``~/.cache/...``)."""
    return cache_root() / "data"


def search_dirs(name: str, data_dir: str | os.PathLike | None = None) -> list[pathlib.Path]:
    """Directories to look for dataset ``name`` in, in priority order (see the module docstring).

    An explicit ``data_dir`` is the only place searched (with its ``NAME`` subfolder); DataError naming it when it
    is not an existing directory.
    """
    key = canonical_name(name)
    if data_dir is not None:
        root = pathlib.Path(os.path.expanduser(data_dir))
        if not str(data_dir) or not root.is_dir():
            problem = "is empty" if not str(data_dir) else "is not a directory" if root.exists() else "does not exist"
            raise DataError(f"{DATASETS[key]['title']} not found: --data-dir {root} {problem} (it should hold "
                            f"{_expected_contents(key)}). {not_found_fix(key, data_dir)}")
        return [root, root / key]
    dirs: list[pathlib.Path] = []
    env = os.environ.get("VGGNET_DATA")
    if env:
        root = pathlib.Path(os.path.expanduser(env))
        dirs += [root, root / key]
    dirs += [pathlib.Path(d) for d in DATASETS[key]["system_dirs"]]
    dirs.append(download_root() / key)
    unique: list[pathlib.Path] = []
    for d in dirs:
        if d not in unique:
            unique.append(d)
    return unique


def _expected_contents(key: str) -> str:
    """What a data directory of dataset ``key`` holds, for messages."""
    info = DATASETS[key]
    if "folder" in info:
        return f"{info['folder']}/ or {next(iter(info['files']))}"
    return "the files " + ", ".join(info["files"])


def not_found_fix(name: str, data_dir: str | os.PathLike | None = None) -> str:
    """The "Fix: ..." sentence of a dataset-not-found error: with an explicit ``data_dir``, how to fill or change
    it (only it was searched); without, every way of providing the dataset."""
    key = canonical_name(name)
    if data_dir is not None:
        return (f"Fix: pass the --data-dir that holds the dataset (or its {key}/ subfolder), fill one with `vggnet "
                f"data fetch {key} --to DIR`, or omit --data-dir to search $VGGNET_DATA and the default places")
    package = DATASETS[key].get("debian_package")
    install = f"`apt-get install {package}`, " if package else ""
    return f"Fix: {install}run `vggnet data fetch {key}`, pass --data-dir DIR, or set $VGGNET_DATA"
