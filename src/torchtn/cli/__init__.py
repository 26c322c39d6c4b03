"""The ``torchtn`` command line. Bad input prints one line on stderr and exits with status 2, writing nothing."""
from __future__ import annotations

import sys
from collections.abc import Sequence

from .commands import _cmd_compress, _cmd_reproduce, _cmd_train
from .inspect_file import _cmd_inspect
from .options import _build_parser
from .resume import _given

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    command = parser.commands.get(args.command)
    if command is not None:
        args.given, args.actions = _given(command, argv), {a.dest: a for a in command._actions}
    if args.version:
        from .. import __version__

        print(f"torchtn {__version__}")
        return 0
    if args.command == "compress":
        return _cmd_compress(args)
    if args.command == "train":
        return _cmd_train(args)
    if args.command == "reproduce":
        return _cmd_reproduce(args)
    if args.command == "inspect":
        return _cmd_inspect(args)
    parser.print_usage(sys.stderr)
    return 2
