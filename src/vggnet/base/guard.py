"""Where a verb may write: the one owner of the checks on an output location (``--out``), run before the work.

Every verb that writes follows the same rules:

- it never replaces a file it did not write itself: an existing file is replaced only when the verb's ``owned``
  test recognises it as its own earlier output (its card or metadata beside it or inside it, its listing);
- it never writes over one of its inputs: the same file (device and inode, as :func:`os.path.samefile` compares
  them, where both exist: hard links, symbolic links and case-insensitive file systems included) or the same
  resolved path is refused, even when it looks owned;
- a file's folder must exist and be writable, a file must not be a folder, and a folder must not be a file.

Three shapes of output:

- :func:`output_file`: one file (``export``, ``features``, ``bench --out``), plus its sidecar by a second call;
- :func:`output_folder`: named files in a folder that may hold other things too (``explain``);
- :func:`new_folder`: a folder that is the verb's alone: new, empty, or reusable by the verb's own rule
  (``train``, ``compress``).

Each refusal is one :class:`~vggnet.base.errors.OutputError` line saying what is in the way and what to do. An
``owned`` test that fails in any way counts as "not owned": a file vggnet cannot read is never replaced.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from vggnet.base.errors import OutputError
from vggnet.base.files import make_dirs

#: ``owned(path)``: whether the existing file at ``path`` is one the verb wrote earlier (so it may replace it).
Owned = Callable[[Path], bool]
#: The largest JSON file :func:`json_of` reads to recognise a verb's own output (cards, metadata, listings).
MAX_MARK_BYTES = 256 * 2**20
#: Names a refusal lists before ``...``.
SHOWN = 3


# ------------------------------------------------------------------------------------------------ helpers
def json_of(path: str | os.PathLike, limit: int = MAX_MARK_BYTES) -> Any:
    """The JSON in the regular file ``path``, or None when it is missing, larger than ``limit``, unreadable or not
    JSON: for ``owned`` tests, which must never fail."""
    try:
        if not os.path.isfile(path) or os.path.getsize(path) > limit:
            return None
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError, RecursionError):
        return None


def _owns(owned: Owned | None, path: Path) -> bool:
    if owned is None:
        return False
    try:
        return bool(owned(path))
    except Exception:  # noqa: BLE001 - a file the test cannot read is not the verb's
        return False


def _resolved(path: Path) -> Path:
    try:
        return Path(os.path.abspath(path)).resolve()
    except (OSError, RuntimeError):  # a symbolic-link loop
        return Path(os.path.abspath(path))


class _Inputs:
    """The verb's inputs, by file identity (device and inode, for those that exist) and by resolved path: a target
    is looked up in constant time, however many inputs and targets there are."""

    def __init__(self, inputs: Iterable[str | os.PathLike]) -> None:
        self.by_id: dict[tuple[int, int], str] = {}
        self.by_path: dict[Path, str] = {}
        for item in inputs:
            try:
                st = os.stat(item)
                self.by_id.setdefault((st.st_dev, st.st_ino), str(item))
            except (OSError, ValueError):
                pass
            self.by_path.setdefault(_resolved(Path(item)), str(item))

    def check(self, path: Path) -> None:
        """:class:`OutputError` when ``path`` is one of the inputs."""
        try:
            st = os.stat(path)
            found = self.by_id.get((st.st_dev, st.st_ino))
        except (OSError, ValueError):
            found = None
        found = found or self.by_path.get(_resolved(path))
        if found is not None:
            raise OutputError(f"cannot write {path}: it is the input {found}, which vggnet never writes over; "
                              "choose another --out")


def _check_parent(path: Path) -> None:
    """The folder ``path`` goes into exists and may be written."""
    folder = path.parent
    if not folder.is_dir():
        why = "is a file, not a folder" if os.path.lexists(folder) else "does not exist (create it first)"
        raise OutputError(f"cannot write {path}: the folder {folder} {why}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {path}: the folder {folder} is not writable")


def _check_creatable(folder: Path) -> None:
    """The folder ``folder``, which does not exist, can be made: its nearest existing ancestor is a writable
    folder."""
    above = folder.parent
    while not os.path.lexists(above) and above != above.parent:
        above = above.parent
    if not above.is_dir():
        raise OutputError(f"cannot create the folder {folder}: {above} is a file, not a folder")
    if not os.access(above, os.W_OK | os.X_OK):
        raise OutputError(f"cannot create the folder {folder}: {above} is not writable")


def _check_writable_folder(folder: Path) -> None:
    if folder.is_dir():
        if not os.access(folder, os.W_OK | os.X_OK):
            raise OutputError(f"cannot write into {folder}: the folder is not writable")
    else:
        _check_creatable(folder)


def _listed(names: Sequence[str]) -> str:
    return ", ".join(names[:SHOWN]) + (", ..." if len(names) > SHOWN else "")


# ------------------------------------------------------------------------------------------------ the checks
def output_file(path: str | os.PathLike, *, inputs: Iterable[str | os.PathLike] = (), owned: Owned | None = None,
                example: str = "out.json", writer: str = "vggnet") -> Path:
    """``path`` when the verb ``writer`` may write the file there: not a folder (``example``: the file name the
    message suggests inside it), in a folder that exists and is writable, not one of ``inputs``, and either new or
    a file ``owned`` recognises as the verb's own earlier output."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"cannot write {path}: it is a folder; give a file name, e.g. {path / example}")
    _check_parent(path)
    _Inputs(inputs).check(path)
    if os.path.lexists(path) and not _owns(owned, path):
        raise OutputError(f"cannot write {path}: a file is there that {writer} did not write; choose another name, "
                          "or move that file away first")
    return path


def output_folder(path: str | os.PathLike, *, names: Iterable[str] = (), inputs: Iterable[str | os.PathLike] = (),
                  owned: Owned | None = None, create: bool = True, writer: str = "vggnet") -> Path:
    """The folder ``path`` when the verb ``writer`` may write the files ``names`` into it: not a file, writable (or
    creatable), and each name new or a file ``owned`` recognises, never a folder nor one of ``inputs``. Other files
    in the folder are left alone. Created (with its parents) unless ``create`` is false."""
    path = Path(path)
    if os.path.lexists(path) and not path.is_dir():
        raise OutputError(f"cannot write into {path}: it is an existing file, not a folder; name a folder (it is "
                          "created if missing)")
    _check_writable_folder(path)
    known = _Inputs(inputs)
    for name in names:
        target = path / name
        if target.is_dir():
            raise OutputError(f"cannot write {target}: a folder of that name is in the way; move it, or choose "
                              "another --out")
        known.check(target)
        if os.path.lexists(target) and not _owns(owned, target):
            raise OutputError(f"cannot write {target}: a file is there that {writer} did not write; choose another "
                              "--out folder, or move that file away first")
    return make_dirs(path) if create else path


def new_folder(path: str | os.PathLike, *, hint: str, contents: Callable[[Path], list[str]] | None = None,
               blocking: Callable[[list[str]], list[str]] | None = None, check_writable: bool = True) -> Path:
    """The folder ``path`` when a verb that owns its whole folder may write it: it does not exist, or is empty, or
    ``blocking(names)`` (the names that keep the verb out; default: all of them) is empty. ``contents(path)``:
    the names that count (default: every entry). ``hint`` ends each refusal: what the verb writes and what to do.
    ``check_writable``: also check that the folder, or the one it goes into, may be written."""
    path = Path(path)
    if os.path.lexists(path) and not path.is_dir():
        raise OutputError(f"--out {path} is a file: {hint}")
    try:
        names = sorted(contents(path) if contents is not None else os.listdir(path) if path.is_dir() else [])
    except OSError as err:
        raise OutputError(f"cannot read the folder {path}: {err.strerror or err}") from None
    shown = (blocking(names) if blocking is not None else names) if names else []
    if shown:
        raise OutputError(f"--out {path} is not empty ({_listed(shown)}): {hint}")
    if check_writable:
        _check_writable_folder(path)
    return path


__all__ = ["MAX_MARK_BYTES", "Owned", "json_of", "new_folder", "output_file", "output_folder"]
