"""The ``vars-deq`` command line: one module per subcommand.

Each subcommand module declares ``NAME``, ``HELP``, ``DESCRIPTION``, ``add_arguments(parser)``
and ``run(args) -> int``; adding a subcommand means adding its module to ``COMMANDS``. A
subcommand's options are declared when that subcommand is parsed (or its help shown), so
``vars-deq --help`` imports none of torch, timm or matplotlib, and no subcommand imports what
only another one needs. Errors a user can fix (bad option, missing data, unusable checkpoint)
end with one line on stderr and exit status 2; a diverged training run exits with status 1.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, Sequence

from . import compare, evaluate, maps, study, train
from .common import EXIT_USER_ERROR

__all__ = ["COMMANDS", "build_parser", "main"]

COMMANDS = (compare, train, evaluate, maps, study)


class _Subcommand(argparse.ArgumentParser):
    """A subcommand's parser whose options are added by ``declare`` on first use."""

    def __init__(self, *args: Any, declare: Callable[[argparse.ArgumentParser], None] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._declare = declare

    def declared(self) -> _Subcommand:
        """This parser with its options added (once)."""
        if self._declare is not None:
            declare, self._declare = self._declare, None
            declare(self)
        return self

    def parse_known_args(self, args=None, namespace=None):
        self.declared()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self.declared()
        return super().format_help()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vars-deq", description="VARS attention as a deep-equilibrium layer.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Subcommand)
    for command in COMMANDS:
        p = sub.add_parser(command.NAME, help=command.HELP, description=command.DESCRIPTION,
                           declare=command.add_arguments)
        p.set_defaults(run=command.run)
    return parser


def _is_user_error(e: Exception) -> bool:
    from ..data import DataError
    from ..train.checkpoint import CheckpointError

    return isinstance(e, (ValueError, DataError, CheckpointError))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except Exception as e:
        if not _is_user_error(e):
            raise
        print(f"vars-deq {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
