"""The ``vggnet`` command: one subcommand per verb, each in its own module of this package.

Every user error leaves as one line on stderr with exit status 2. So do the environment's: a file that cannot be
read or written (an ``OSError`` no lower layer named), memory that runs out. Only what is left, a bug, is an
"internal error" (exit status 1). With ``VGGNET_DEBUG=1`` (any non-empty value) the traceback comes first: a
user or environment error's before its one line (same exit status), a bug's instead of its line.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import sys
import traceback
from importlib import import_module
from typing import Iterator, Sequence

from vggnet.base.errors import VggnetError
from vggnet.cli.common import one_line

# Verb modules; each defines ``add_parser(subparsers)`` and ``run(args) -> int``.
VERBS = ("models", "summary", "train", "eval", "predict", "features", "weights", "data", "bench", "export",
         "compress", "explain")


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump) and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def build_parser() -> ArgumentParser:
    from vggnet.base.version import __version__

    parser = ArgumentParser(prog="vggnet", description="VGG networks: build, analyse, train, evaluate, use.")
    parser.add_argument("--version", action="version", version=f"vggnet {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=ArgumentParser)
    for verb in VERBS:
        module = import_module(f".{verb}", __name__)
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    with _printable_streams():
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.verb is None:
            parser.print_help()
            return 2
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    """``args.run(args)``, every exception but a bug turned into one line on stderr and its exit status."""
    try:
        return int(args.run(args) or 0)
    except VggnetError as err:
        return _fail(args, f"error: {err}", 2)
    except KeyboardInterrupt:
        return _fail(args, "interrupted", 130)
    except BrokenPipeError:
        return 0
    except OSError as err:  # the files.py writers name their paths themselves; this is what other code let through
        return _fail(args, f"error: {_os_error_line(err)}", 2)
    except Exception as err:  # noqa: BLE001 - the CLI never shows a raw traceback unless asked
        if debugging():
            raise
        if _out_of_memory(err):
            detail = f" ({_first_line(err)})" if str(err).strip() else ""
            return _fail(args, f"error: out of memory{detail}: use a smaller batch, image size or model", 2)
        if _undecodable_name(err):
            return _fail(args, f"error: {err.object} is not valid UTF-8 (a file or folder name with bytes that do "
                               "not decode): rename it", 2)
        return _fail(args, f"internal error: {type(err).__name__}: {_first_line(err)} (set VGGNET_DEBUG=1 for the "
                           "traceback)", 1)


def debugging() -> bool:
    """Whether ``VGGNET_DEBUG`` asks for tracebacks (set to anything but the empty string)."""
    return bool(os.environ.get("VGGNET_DEBUG"))


def _fail(args: argparse.Namespace, message: str, status: int) -> int:
    """``message`` as one line on stderr (with ``VGGNET_DEBUG``, after the traceback of the error being handled)."""
    if debugging() and sys.exc_info()[0] not in (None, KeyboardInterrupt):
        traceback.print_exc(file=sys.stderr)
    print(one_line(f"vggnet {args.verb}: {message}"), file=sys.stderr)
    return status


#: errno values that mean a write failed for want of room or of a writable place.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EFBIG}


def _os_error_line(err: OSError) -> str:
    """``cannot write PATH: No space left on device`` (or ``cannot access``), or the reason alone without a path."""
    reason = err.strerror or str(err) or type(err).__name__
    if err.filename is None:
        return reason
    path = os.fsdecode(err.filename) if isinstance(err.filename, (str, bytes, os.PathLike)) else str(err.filename)
    return f"cannot {'write' if err.errno in _WRITE_ERRNOS else 'access'} {path}: {reason}"


def _out_of_memory(err: Exception) -> bool:
    """Python's MemoryError, torch's OutOfMemoryError (CUDA) and the plain RuntimeError of torch's CPU allocator."""
    import torch

    return isinstance(err, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(err, RuntimeError) and "can't allocate memory" in str(err))


def _undecodable_name(err: Exception) -> bool:
    """A UnicodeEncodeError over the surrogates ``os.fsdecode`` gives the bytes of a file name that are not UTF-8:
    code that meant to encode text met a name from the file system (the name is ``err.object``)."""
    return isinstance(err, UnicodeEncodeError) and all(
        "\udc80" <= c <= "\udcff" for c in err.object[err.start:err.end])


def _first_line(err: Exception) -> str:
    """The first line of ``err``'s message: torch's may go on for dozens of lines of C++ stack."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else ""


@contextlib.contextmanager
def _printable_streams() -> Iterator[None]:
    """stdout and stderr that can print any path for the command's duration. A file name that is not valid UTF-8
    reaches Python as surrogates (``os.fsdecode``), which a stream with ``errors="strict"`` (stdout, usually)
    refuses with UnicodeEncodeError; such a stream writes them as backslash escapes instead, as stderr does."""
    changed = [stream for stream in (sys.stdout, sys.stderr)
               if getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure")]
    for stream in changed:
        stream.reconfigure(errors="backslashreplace")
    try:
        yield
    finally:
        for stream in changed:
            stream.reconfigure(errors="strict")
