"""The ``torchtn`` command line. Bad input prints one line on stderr and exits with status 2, writing nothing."""
from __future__ import annotations

import sys
from collections.abc import Sequence

from .commands import cmd_compress, cmd_reproduce, cmd_train
from .inspect_file import cmd_inspect
from .options import build_parser
from .resume import given_options

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    command = parser.commands.get(args.command)
    if command is not None:
        args.given, args.actions = given_options(command, argv), {a.dest: a for a in command._actions}
    if args.version:
        from .. import __version__

        print(f"torchtn {__version__}")
        return 0
    if args.command == "compress":
        return cmd_compress(args)
    if args.command == "train":
        return cmd_train(args)
    if args.command == "reproduce":
        return cmd_reproduce(args)
    if args.command == "inspect":
        return cmd_inspect(args)
    parser.print_usage(sys.stderr)
    return 2
