"""The eight official torchvision VGG weights: where they are, how to check them, what they score.

Each file is named ``MODEL-HASH.pth``, where ``HASH`` is the first 8 hex digits of the file's SHA-256 (torchvision's
convention, checked by ``torch.hub``'s ``check_hash``); that prefix is the only checksum published, and it is what
``vggnet weights fetch`` verifies and what every load of a file so named re-checks. Accuracies are torchvision's
metadata (ImageNet-1k validation, single 224 crop after resizing to 256; docs/REFERENCE.md); sizes are its
``_file_size`` in MiB.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from vggnet.base.errors import CheckpointError
from vggnet.data.catalogue import cache_root
from vggnet.data.fetch import digest_matches, fetch_file, file_digest, make_download_dir

BASE_URL = "https://download.pytorch.org/models/"
#: A file name carrying a SHA-256 prefix: ``NAME-HEX.EXT`` with at least 8 hex digits (torchvision's pattern).
HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.[A-Za-z0-9]+$")


@dataclass(frozen=True)
class Official:
    model: str  # the vggnet (and torchvision) model name
    file: str  # the file name on download.pytorch.org, MODEL-SHA256PREFIX.pth
    size_mib: float  # file size in MiB (torchvision's _file_size)
    top1: float  # ImageNet-1k validation accuracy in %, single 224 crop
    top5: float

    @property
    def url(self) -> str:
        return BASE_URL + self.file

    @property
    def sha256_prefix(self) -> str:
        return sha256_prefix(self.file) or ""

    def to_dict(self) -> dict:
        return {"model": self.model, "file": self.file, "url": self.url, "sha256_prefix": self.sha256_prefix,
                "size_mib": self.size_mib, "top1": self.top1, "top5": self.top5}


OFFICIAL: dict[str, Official] = {o.model: o for o in (
    Official("vgg11", "vgg11-8a719046.pth", 506.840, 69.020, 88.628),
    Official("vgg11_bn", "vgg11_bn-6002323d.pth", 506.881, 70.370, 89.810),
    Official("vgg13", "vgg13-19584684.pth", 507.545, 69.928, 89.246),
    Official("vgg13_bn", "vgg13_bn-abd245e5.pth", 507.590, 71.586, 90.374),
    Official("vgg16", "vgg16-397923af.pth", 527.796, 71.592, 90.382),
    Official("vgg16_bn", "vgg16_bn-6c64b313.pth", 527.866, 73.360, 91.516),
    Official("vgg19", "vgg19-dcbb9e9d.pth", 548.051, 72.376, 90.876),
    Official("vgg19_bn", "vgg19_bn-c79401a0.pth", 548.143, 74.218, 91.842),
)}


def sha256_prefix(name: str | os.PathLike) -> str | None:
    """The SHA-256 prefix a file name carries (``vgg16-397923af.pth`` -> ``397923af``), or None."""
    match = HASH_IN_NAME.search(Path(name).name)
    return match.group(1) if match else None


def find(name: str) -> Official:
    """The official entry for a model name (``vgg16``) or file name (``vgg16-397923af.pth``)."""
    for entry in OFFICIAL.values():
        if name in (entry.model, entry.file):
            return entry
    raise CheckpointError(f"no official weights named {name!r}: choose one of {', '.join(OFFICIAL)} (vggnet weights "
                          "list)")


def by_file_name(path: str | os.PathLike) -> Official | None:
    name = Path(path).name
    return next((entry for entry in OFFICIAL.values() if entry.file == name), None)


def check_present(entry: Official, directory: str | os.PathLike) -> tuple[str, str | None]:
    """``(status, reason)`` of ``entry``'s file in ``directory``: ``ok`` (there, and its SHA-256 starts with the prefix
    its name carries), ``missing``, ``corrupt`` (its digest does not: truncated, damaged or another file under the
    official name) or ``unreadable``; ``reason`` says why for the last two. Reads the whole file."""
    path = Path(directory) / entry.file
    if not path.is_file():
        return "missing", None
    try:
        actual = file_digest(path)
    except OSError as err:
        return "unreadable", f"{path} cannot be read ({err.strerror or err})"
    if digest_matches(actual, entry.sha256_prefix, prefix=True):
        return "ok", None
    return "corrupt", (f"{path}: SHA-256 starts with {actual[:len(entry.sha256_prefix)]}, the name says "
                       f"{entry.sha256_prefix}: truncated, corrupt or not the official file; download it again "
                       f"(vggnet weights fetch {entry.model})")


def listing(directory: str | os.PathLike) -> list[dict]:
    """``vggnet weights list``: each official entry (:meth:`Official.to_dict`) with ``status`` and ``reason`` of its
    file in ``directory`` (:func:`check_present`) and ``present``: the file is there and verified."""
    records = []
    for entry in OFFICIAL.values():
        status, reason = check_present(entry, directory)
        records.append(dict(entry.to_dict(), present=status == "ok", status=status, reason=reason))
    return records


def default_dir() -> Path:
    """``$VGGNET_WEIGHTS`` when set, else ``weights`` in vggnet's cache (``~/.cache/vggnet``, ``$XDG_CACHE_HOME``
    honoured: :func:`vggnet.data.catalogue.cache_root`, where ``vggnet data fetch`` stores datasets too)."""
    root = os.environ.get("VGGNET_WEIGHTS")
    return Path(root).expanduser() if root else cache_root() / "weights"


def fetch(name: str, to: str | os.PathLike | None = None, url: str | None = None, progress: bool = True) -> Path:
    """Download the official weights ``name`` (``vgg16`` or ``vgg16-397923af.pth``) into ``to`` (default
    :func:`default_dir`) under their official file name, verified by the SHA-256 prefix, written atomically; return
    the file. A file already there whose SHA-256 starts with the prefix is kept. ``url`` replaces the official
    address (a mirror; ``file://`` works). Failures raise :class:`vggnet.base.errors.DataError` and leave no file."""
    entry = find(name)
    target = make_download_dir(Path(to).expanduser() if to is not None else default_dir()) / entry.file
    fetch_file(url or entry.url, target, "sha256", entry.sha256_prefix, progress=progress, prefix=True)
    return target
