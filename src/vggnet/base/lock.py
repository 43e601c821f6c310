"""One writing process per folder: an exclusive ``flock`` on ``FOLDER/.lock``, held by a training run in its run
directory (:meth:`vggnet.store.rundir.RunDir.lock`) and by ``vggnet data prepare`` in the folder it writes."""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from vggnet.base.errors import CheckpointError, ConfigError, OutputError
from vggnet.base.files import make_dirs

#: The lock file of the process writing a folder.
LOCK_NAME = ".lock"


def _remove_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (deepest first) while they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


@contextmanager
def hold(path: Path, lock_file: Path, create: bool = False) -> Iterator[None]:
    """Hold ``lock_file`` (an exclusive ``flock``, holding this process's pid) while the block runs: one writer
    per folder. A second one is refused in one line naming the holder's pid. The OS releases a lock when its holder
    dies, so a killed run leaves no stale lock, only the file, which the next writer takes over; the holder
    deletes it on leaving. ``create``: make the folder first, and remove the folders this made if they are
    empty again at the end (a run that fails before writing anything leaves nothing)."""
    made = [p for p in (path, *path.parents) if not p.exists()] if create else []
    try:
        fd = _acquire(path, lock_file, create)
    except BaseException:
        _remove_empty(made)
        raise
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        yield
    finally:
        lock_file.unlink(missing_ok=True)  # while held: a process waiting on this file then takes a new one
        os.close(fd)
        _remove_empty(made)

def _acquire(path: Path, lock_file: Path, create: bool) -> int:
    """The open, flocked lock file; retried when the file was deleted by its last holder between our opening
    and our lock (the lock would then guard a file no one else can see)."""
    while True:
        if create:
            make_dirs(path)
        elif not path.is_dir():
            raise CheckpointError(f"run directory {path} does not exist")
        try:
            fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:
            continue  # the folder was removed meanwhile
        except OSError as err:
            raise OutputError(f"cannot write {lock_file}: {err.strerror or err}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            raise ConfigError(f"{path} is being written by another vggnet process (pid "
                              f"{holder if holder.isdigit() else 'unknown'}, holding {lock_file}): wait for "
                              "it to finish or stop it, or use another folder") from None
        except OSError as err:
            os.close(fd)
            raise OutputError(f"cannot lock {lock_file}: {err.strerror or err}") from None
        try:
            ours = os.fstat(fd)
            current = os.stat(lock_file)
            if (ours.st_dev, ours.st_ino) == (current.st_dev, current.st_ino):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)
