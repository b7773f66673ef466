"""``pyrelay user add NAME [SENDER...]``: a line for ``PYRELAY_SMTPD_USERS_FILE``.

The password is read from the terminal (asked twice, not echoed), or from the first line of
standard input when that is not a terminal or with ``--password-stdin``; it is never printed.
"""

from __future__ import annotations

import argparse
import getpass
import sys

from pyrelay.cmdutil import Subparsers, add_command, error
from pyrelay.constants import EXIT_OK, EXIT_USAGE


def register(sub: Subparsers) -> None:
    user = sub.add_parser(
        "user",
        help="manage SMTP AUTH users (PYRELAY_SMTPD_USERS_FILE)",
        description="Make lines for PYRELAY_SMTPD_USERS_FILE.",
    )
    user_sub = user.add_subparsers(title="commands", metavar="COMMAND", required=True)
    p = add_command(
        user_sub,
        "add",
        cmd_user_add,
        "print a users file line `NAME HASH [SENDER...]` for a new password",
        "Hash a password with bcrypt and print the line to append to PYRELAY_SMTPD_USERS_FILE "
        "(the relay re-reads the file when it changes). SENDERs limit the user's envelope "
        "senders: @example.org (a domain) or app@example.org (one address); without them the "
        "user may send from any ALLOWED_SENDER_DOMAINS address. The password is asked on the "
        "terminal, or read from the first line of standard input when that is not a terminal "
        "(or with --password-stdin).",
        "",
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("senders", nargs="*", metavar="SENDER")
    p.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from standard input (the default when it is not a terminal)",
    )


def cmd_user_add(args: argparse.Namespace) -> int:
    from pyrelay.users import BCRYPT_MAX_PASSWORD, hash_password, parse_sender, valid_name

    if not valid_name(args.name):
        return error(f"user add: invalid user name {args.name!r} (no spaces)", EXIT_USAGE)
    for sender in args.senders:
        try:
            parse_sender(sender)
        except ValueError as exc:
            return error(f"user add: {exc}", EXIT_USAGE)
    if args.password_stdin or not sys.stdin.isatty():
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        try:
            password = getpass.getpass(f"Password for {args.name}: ")
            if getpass.getpass("Repeat it: ") != password:
                return error("user add: the passwords differ", EXIT_USAGE)
        except EOFError:
            password = ""
    if not password:
        return error("user add: empty password", EXIT_USAGE)
    if len(password.encode()) > BCRYPT_MAX_PASSWORD:
        return error(f"user add: password longer than {BCRYPT_MAX_PASSWORD} bytes", EXIT_USAGE)
    print(" ".join([args.name, hash_password(password), *args.senders]))
    return EXIT_OK
