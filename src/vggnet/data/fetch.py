"""Download a dataset from its official URL, verified by checksum (``vggnet data fetch NAME``).

Each file is streamed to a hidden temp file in the destination directory (with a progress bar), its md5 compared
with the published one, and only then renamed into place with :func:`os.replace`: an interrupted, truncated or
tampered download never leaves a file under the final name. Files already present with the right checksum are not
downloaded again. Only the standard library's :mod:`urllib` is used, so ``file://`` URLs work too.

:func:`fetch_file` (keep a verified file, else :func:`download_verified`: temp file, progress bar, digest, atomic
rename) is the one download routine; ``vggnet weights fetch`` (:mod:`vggnet.store.weights.official`) uses it too, with
SHA-256 prefixes.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import pathlib
import tempfile
import urllib.error
import urllib.request

from tqdm import tqdm

from vggnet.data.catalogue import DATASETS, canonical_name, download_root
from vggnet.base.errors import DataError

CHUNK_BYTES = 1 << 20
TIMEOUT_S = 60


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest (``md5``, ``sha256``, any :func:`hashlib.new` name) of a file, read in chunks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def digest_matches(actual: str, expected: str, prefix: bool = False) -> bool:
    """``actual`` hex digest equals ``expected`` -- or, with ``prefix``, starts with it (``vgg16-397923af.pth``)."""
    return actual.startswith(expected.lower()) if prefix else actual == expected.lower()


def make_download_dir(directory: str | os.PathLike) -> pathlib.Path:
    """``mkdir -p`` for a download destination; DataError naming it (and --to) when it cannot be made."""
    directory = pathlib.Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"{directory}: cannot create the download directory ({exc.strerror or exc}); pass another "
                        "one with --to") from None
    return directory


def fetch_file(url: str, target: pathlib.Path, algorithm: str, expected: str, progress: bool = True,
               prefix: bool = False) -> None:
    """Keep ``target`` when it is already there with the expected digest, else :func:`download_verified` it."""
    if target.is_file():
        try:
            if digest_matches(file_digest(target, algorithm), expected, prefix):
                return
        except OSError as exc:
            raise DataError(f"{target} is there but cannot be read ({exc.strerror or exc}); remove it or choose "
                            "another --to") from None
    download_verified(url, target, algorithm, expected, progress=progress, prefix=prefix)


def default_destination(name: str) -> pathlib.Path:
    """``$VGGNET_DATA/NAME`` when that is set, else ``~/.cache/vggnet/data/NAME``; both are searched by the loaders."""
    root = os.environ.get("VGGNET_DATA")
    return (pathlib.Path(os.path.expanduser(root)) if root else download_root()) / name


def file_urls(name: str, url: str | None = None) -> dict[str, str]:
    """``{file name: URL}`` for dataset ``name``; ``url`` replaces the official base (or archive) URL."""
    info = DATASETS[name]
    base = url or info["url"]
    if len(info["files"]) == 1:  # one archive: the URL is the file's own
        return {next(iter(info["files"])): base}
    return {filename: base.rstrip("/") + "/" + filename for filename in info["files"]}


#: Names of the digests in messages.
_DIGEST_NAMES = {"md5": "md5", "sha256": "SHA-256"}


def download_verified(url: str, target: pathlib.Path, algorithm: str, expected: str, progress: bool = True,
                      prefix: bool = False) -> None:
    """Stream ``url`` into ``target``: a hidden temp file in ``target``'s directory, a progress bar (``progress``;
    drawn on terminals only), the ``algorithm`` digest (``md5``, ``sha256``) compared with ``expected`` -- equal, or
    with ``prefix`` its leading hex digits, as in torchvision's ``vgg16-397923af.pth`` -- and only then an atomic
    rename into place. Any failure (network, truncation, checksum) raises DataError and leaves no file behind.
    Shared by ``vggnet data fetch`` and ``vggnet weights fetch``."""
    try:
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    except OSError as err:
        raise DataError(f"cannot write into {target.parent} ({err.strerror or err}); choose another --to") from None
    tmp = pathlib.Path(tmp_name)
    try:
        digest, received, expected_size = hashlib.new(algorithm), 0, None
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            length = response.headers.get("Content-Length")
            expected_size = int(length) if length and length.isdigit() else None
            with tqdm(total=expected_size, desc=target.name, unit="B", unit_scale=True, unit_divisor=1024,
                      disable=None if progress else True, leave=False) as bar:
                while chunk := response.read(CHUNK_BYTES):
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        if expected_size is not None and received != expected_size:
            raise DataError(f"{url}: download truncated, got {received} of {expected_size} bytes; run the fetch again")
        actual, name = digest.hexdigest(), _DIGEST_NAMES.get(algorithm, algorithm)
        if not digest_matches(actual, expected, prefix):
            relation = "does not start with the published prefix" if prefix else "does not match the published"
            raise DataError(f"{url}: {name} {actual} {relation} {expected}; the file is corrupt or not the official "
                            "one, nothing was saved, run the fetch again or check --url")
        os.replace(tmp, target)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        reason = exc if isinstance(exc, urllib.error.HTTPError) else getattr(exc, "reason", None) or exc
        raise DataError(f"{url}: download failed ({reason}); check the URL and your network, or download the file "
                        f"by hand into {target.parent}") from None
    finally:
        tmp.unlink(missing_ok=True)


def fetch(name: str, to: str | os.PathLike | None = None, url: str | None = None, progress: bool = True,
          checksums: dict[str, str] | None = None) -> pathlib.Path:
    """Download dataset ``name`` (``fashion-mnist``, ``cifar10``, ``cifar100``) and return its directory.

    ``to`` is the destination directory (default :func:`default_destination`); the returned directory can be passed
    as ``data_dir`` to :func:`vggnet.data.load_dataset`, and the default one is found without it. ``url`` overrides
    the official location: a directory URL for Fashion-MNIST's four files, the archive URL for CIFAR; ``file://``
    works. ``checksums`` maps file names to md5s, replacing the published ones (for mirrors and tests).
    """
    name = canonical_name(name)
    expected = {**DATASETS[name]["files"], **(checksums or {})}
    destination = make_download_dir(pathlib.Path(os.path.expanduser(to)) if to else default_destination(name))
    for filename, file_url in file_urls(name, url).items():
        fetch_file(file_url, destination / filename, "md5", expected[filename], progress=progress)
    return destination
