"""The ``vggnet`` command: one subcommand per verb, each in its own module of this package.

Every user error leaves as one line on stderr with exit status 2; set ``VGGNET_DEBUG=1`` for tracebacks.
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib import import_module
from typing import Sequence

from ..errors import VggnetError

# Verb modules; each defines ``add_parser(subparsers)`` and ``run(args) -> int``.
VERBS = ("models", "summary", "train", "eval", "predict", "features", "weights", "data", "bench", "export",
         "compress", "explain")


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump) and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> ArgumentParser:
    from .. import __version__

    parser = ArgumentParser(prog="vggnet", description="VGG networks: build, analyse, train, evaluate, use.")
    parser.add_argument("--version", action="version", version=f"vggnet {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=ArgumentParser)
    for verb in VERBS:
        module = import_module(f".{verb}", __name__)
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verb is None:
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except VggnetError as err:
        print(f"vggnet {args.verb}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vggnet {args.verb}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as err:  # noqa: BLE001 - the CLI never shows a raw traceback unless asked
        if os.environ.get("VGGNET_DEBUG"):
            raise
        print(f"vggnet {args.verb}: internal error: {type(err).__name__}: {err} "
              "(set VGGNET_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1
