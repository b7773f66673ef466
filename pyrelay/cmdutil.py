"""Helpers every ``pyrelay`` command module uses to declare its parser and report results.

Kept apart from ``commands.py`` so that the command modules depend on it rather than on each
other: ``cli`` -> ``commands`` -> ``queue_commands`` -> ``cmdutil`` has no cycle.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import TypeAlias

from pyrelay.constants import EXIT_FAILURE

Handler = Callable[[argparse.Namespace], int]
# Generic only for type checkers; at run time the class is not subscriptable.
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def add_command(
    sub: Subparsers, name: str, func: Handler, help: str, description: str, failures: str
) -> argparse.ArgumentParser:
    codes = ["0 success", failures, "2 usage or configuration error"] if failures else []
    parser = sub.add_parser(
        name,
        help=help,
        description=description,
        epilog="exit codes: " + ", ".join(c for c in dict.fromkeys(codes) if c) if codes else None,
    )
    parser.set_defaults(func=func)
    return parser


def add_json_flag(parser: argparse.ArgumentParser, *, top: bool = False) -> None:
    # Sub-subparsers copy their defaults over the parent's parsed values, so only the top
    # ``queue`` parser has a default; otherwise ``queue --json list`` would lose the flag.
    parser.add_argument(
        "--json",
        action="store_true",
        default=False if top else argparse.SUPPRESS,
        help="machine-readable output",
    )


def print_json(data: object) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False))


def error(message: str, code: int = EXIT_FAILURE) -> int:
    print(f"pyrelay: {message}", file=sys.stderr)
    return code
