"""SMTP DATA wire format: terminator search, line-ending checks, dot-stuffing.

The spool keeps messages in *wire form*: CRLF line endings, dot-stuffed, without the final
``.<CRLF>``.  A message in that form never contains ``<CRLF>.<CRLF>``, so the upstream always
sees the same message boundary pyrelay saw (the defence against SMTP smuggling, CVE-2023-51764).
"""

from __future__ import annotations

import re

TERMINATOR = b"\r\n.\r\n"
_ANY_EOL = re.compile(rb"\r\n|\r|\n")
_LONE_DOT_LINE = re.compile(rb"(?:^|(?<=\n))\.(?=\r\n)")


def has_bare_eol(data: bytes | bytearray) -> bool:
    """True if ``data`` has a CR not followed by LF or an LF not preceded by CR.

    Three C-speed counts; cheaper than a regex scan on the common clean message."""
    crlf = data.count(b"\r\n")
    return data.count(b"\r") != crlf or data.count(b"\n") != crlf


def normalize_wire(data: bytes) -> bytes:
    """Turn a DATA payload with bare CR/LF into clean wire form (Postfix 3.9 ``normalize``).

    Bare CR and bare LF become CRLF.  A line that then consists of a single ``.`` would end the
    message early at the next hop, so it is stuffed to ``..``: the next hop un-stuffs it back.
    """
    data = _ANY_EOL.sub(b"\r\n", data)
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    return _LONE_DOT_LINE.sub(b"..", data)


def dot_stuff(message: bytes) -> bytes:
    """Canonical (CRLF) message -> wire form."""
    if message and not message.endswith(b"\r\n"):
        message += b"\r\n"
    stuffed = message.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    return stuffed


def dot_unstuff(wire: bytes) -> bytes:
    """Wire form -> canonical message (for bounces and ``queue show``)."""
    if wire.startswith(b"."):
        wire = wire[1:]
    return wire.replace(b"\r\n.", b"\r\n")


def header_block(wire: bytes) -> bytes:
    """The header section of a wire-form message, un-stuffed, ending in CRLF."""
    end = wire.find(b"\r\n\r\n")
    head = wire if end < 0 else wire[: end + 2]
    return dot_unstuff(head)


def is_8bit(data: bytes) -> bool:
    return not data.isascii()
