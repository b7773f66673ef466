"""``pyrelay`` command line.  With no command it runs the relay in the foreground.

Exit codes: 0 success, 1 failure at run time, 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pyrelay import __version__
from pyrelay.config import Settings, load_settings
from pyrelay.constants import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from pyrelay.errors import ConfigError
from pyrelay.logging import configure_logging


def _settings() -> Settings:
    return load_settings()


def cmd_run(args: argparse.Namespace) -> int:
    from pyrelay.app import run

    settings = _settings()
    configure_logging(settings.log_format, settings.log_level)
    run(settings)
    return EXIT_OK


def cmd_worker(args: argparse.Namespace) -> int:
    """A replacement secondary worker, started by the primary (PYRELAY_WORKERS > 1)."""
    from pyrelay.app import serve_worker
    from pyrelay.workers import die_with_parent

    die_with_parent(args.parent)
    settings = _settings()
    configure_logging(settings.log_format, settings.log_level)
    serve_worker(settings, args.index)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyrelay",
        description="SMTP relay: accepts mail from your apps and forwards it to RELAYHOST. "
        "Configured by environment variables (see README). With no command, runs the relay.",
        epilog="Exit codes: 0 success, 1 failure at run time, 2 usage or configuration error.",
    )
    parser.add_argument("--version", action="version", version=f"pyrelay {__version__}")
    parser.set_defaults(func=cmd_run)
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    run = sub.add_parser("run", help="run the relay in the foreground (the default)")
    run.set_defaults(func=cmd_run)
    worker = sub.add_parser("worker")  # internal: no help, so it is not listed
    worker.add_argument("index", type=int)
    worker.add_argument("--parent", type=int, required=True)
    worker.set_defaults(func=cmd_worker)
    from pyrelay import commands

    commands.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
    except ConfigError as exc:
        print(f"pyrelay: configuration error: {exc}", file=sys.stderr)
        code = EXIT_USAGE
    except KeyboardInterrupt:
        code = EXIT_FAILURE
    sys.exit(code)
