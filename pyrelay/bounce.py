"""RFC 3464 non-delivery reports in the style of Postfix bounce(8)."""

from __future__ import annotations

import datetime
import email.utils
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["FailedRecipient", "build_bounce"]


@dataclass(frozen=True, slots=True)
class FailedRecipient:
    address: str
    status: str
    diagnostic: str
    remote_mta: str | None


_CRLF = "\r\n"
_STATUS_RE = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
_NEWLINES_RE = re.compile(rb"\r\n|\r|\n")
# Room for a field name and indentation below the 998-octet SMTP line limit.
_HARD_WIDTH = 900
_SOFT_WIDTH = 76
# Upstream replies can be arbitrarily long; a report does not need more than this.
_MAX_DIAGNOSTIC = 4000
_MAX_HEADER_LINE = 998

_INTRO = """\
This is the mail system at host {hostname}.

I'm sorry to have to inform you that your message could not
be delivered to one or more recipients. It's attached below.

For further assistance, please send mail to postmaster.

If you do so, please include this problem report. You can
delete your own text from the attached returned message.

                   The mail system
"""


def _clean(text: str, *, ascii_only: bool, limit: int) -> str:
    """Turn peer-supplied text into a single line that cannot break the message structure."""
    out: list[str] = []
    for ch in text[:limit]:
        if " " <= ch <= "~":
            out.append(ch)
        elif ch.isascii() or not ch.isprintable():
            out.append(" ")  # CR, LF, TAB and other controls would end or split a line
        else:
            out.append("?" if ascii_only else ch)
    return " ".join("".join(out).split())


def _fold(text: str, first_width: int, indent: str) -> list[str]:
    """Greedy word wrap; words too long for a line are cut so no line exceeds the limit."""
    words: list[str] = []
    for word in text.split(" "):
        while len(word) > _HARD_WIDTH:
            words.append(word[:_HARD_WIDTH])
            word = word[_HARD_WIDTH:]
        if word:
            words.append(word)
    lines: list[str] = []
    line = ""
    width = first_width
    for word in words:
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = indent + word
            width = _SOFT_WIDTH
        else:
            line = f"{line} {word}" if line else word
    lines.append(line)
    return lines


def _xtext_address(address: str) -> str:
    """RFC 6533 utf-8-addr-xtext, so a non-ASCII address stays 7-bit inside the DSN."""
    out: list[str] = []
    for ch in address:
        if "!" <= ch <= "~" and ch not in "+=\\":
            out.append(ch)
        else:
            out.append(f"\\x{{{ord(ch):X}}}")
    return "".join(out)


def _dsn_address(address: str) -> str:
    cleaned = _clean(address, ascii_only=False, limit=_MAX_HEADER_LINE // 2)
    if cleaned.isascii():
        return "rfc822; " + cleaned
    return "utf-8; " + _xtext_address(cleaned)


def _dsn_field(name: str, value: str) -> list[str]:
    prefix = f"{name}: "
    lines = _fold(value, _SOFT_WIDTH - len(prefix), " ")
    lines[0] = prefix + lines[0]
    return lines


def _human_reason(rcpt: FailedRecipient) -> str:
    diagnostic = _clean(rcpt.diagnostic, ascii_only=False, limit=_MAX_DIAGNOSTIC)
    if not diagnostic:
        diagnostic = f"delivery failed (status {_status(rcpt.status)})"
    if rcpt.remote_mta:
        host = _clean(rcpt.remote_mta, ascii_only=False, limit=255)
        return f"host {host} said: {diagnostic}"
    return diagnostic


def _status(status: str) -> str:
    status = status.strip()
    return status if _STATUS_RE.fullmatch(status) else "5.0.0"


def _original_headers(raw: bytes) -> bytes:
    lines: list[bytes] = []
    for line in _NEWLINES_RE.split(raw.replace(b"\x00", b"")):
        if not line:
            break  # the header block ends at the first empty line; never leak a body
        while len(line) > _MAX_HEADER_LINE:
            lines.append(line[:_HARD_WIDTH])
            line = b"\t" + line[_HARD_WIDTH:]
        lines.append(line)
    return b"".join(line + b"\r\n" for line in lines)


def _new_boundary() -> str:
    return f"=_pyrelay_{secrets.token_hex(16)}"


def build_bounce(
    *,
    hostname: str,
    queue_id: str,
    bounce_queue_id: str,
    sender: str,
    recipients: Sequence[FailedRecipient],
    original_headers: bytes,
    arrival: datetime.datetime,
    now: datetime.datetime,
    from_address: str = "",
) -> bytes:
    """Build a complete ``multipart/report; report-type=delivery-status`` message (CRLF).

    ``from_address`` is the header sender (``PYRELAY_BOUNCE_FROM``, already masqueraded by the
    caller as Postfix cleanup would); empty means ``MAILER-DAEMON@<hostname>``.

    Raises ValueError for a null sender (a bounce must never answer a bounce) or when there
    are no failed recipients to report.
    """
    to = _clean(sender, ascii_only=False, limit=_MAX_HEADER_LINE // 2)
    if not to:
        raise ValueError("refusing to bounce a message with a null envelope sender")
    if not recipients:
        raise ValueError("a bounce needs at least one failed recipient")

    text_lines = _INTRO.format(hostname=hostname).split("\n")
    for rcpt in recipients:
        address = _clean(rcpt.address, ascii_only=False, limit=_MAX_HEADER_LINE // 2)
        reason = f"<{address}>: {_human_reason(rcpt)}"
        text_lines.extend(_fold(reason, _SOFT_WIDTH, "    "))
        text_lines.append("")
    text = _CRLF.join(text_lines).encode("utf-8", "replace")

    dsn_lines = [
        f"Reporting-MTA: dns; {hostname}",
        f"X-Pyrelay-Queue-ID: {queue_id}",
        f"Arrival-Date: {email.utils.format_datetime(arrival)}",
    ]
    for rcpt in recipients:
        address = _dsn_address(rcpt.address)
        dsn_lines.append("")
        dsn_lines.extend(_dsn_field("Final-Recipient", address))
        dsn_lines.extend(_dsn_field("Original-Recipient", address))
        dsn_lines.append("Action: failed")
        dsn_lines.append(f"Status: {_status(rcpt.status)}")
        if rcpt.remote_mta:
            mta = _clean(rcpt.remote_mta, ascii_only=True, limit=255).replace(" ", "")
            if mta:
                dsn_lines.append(f"Remote-MTA: dns; {mta}")
        diagnostic = _clean(rcpt.diagnostic, ascii_only=True, limit=_MAX_DIAGNOSTIC)
        if diagnostic:
            dsn_lines.extend(_dsn_field("Diagnostic-Code", "smtp; " + diagnostic))
    dsn = (_CRLF.join(dsn_lines) + _CRLF).encode("ascii", "replace")

    headers = _original_headers(original_headers)

    text_8bit = not text.isascii()
    headers_8bit = not headers.isascii()
    any_8bit = text_8bit or headers_8bit or not to.isascii()
    text_charset = "utf-8" if text_8bit else "us-ascii"

    content = text + dsn + headers
    boundary = _new_boundary()
    while boundary.lower().encode() in content.lower():
        boundary = _new_boundary()

    def part(header_lines: list[str], payload: bytes) -> bytes:
        return (
            f"--{boundary}\r\n" + "".join(h + _CRLF for h in header_lines) + _CRLF
        ).encode() + payload

    from_address = _clean(from_address, ascii_only=False, limit=_MAX_HEADER_LINE // 2)
    from_address = from_address.replace(" ", "") or f"MAILER-DAEMON@{hostname}"
    top = [
        f"From: {from_address} (Mail Delivery System)",
        f"To: {to}",
        "Subject: Undelivered Mail Returned to Sender",
        f"Date: {email.utils.format_datetime(now)}",
        f"Message-ID: <{bounce_queue_id}@{hostname}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f'\tboundary="{boundary}"',
    ]
    if any_8bit:
        top.append("Content-Transfer-Encoding: 8bit")
    text_headers = [
        "Content-Description: Notification",
        f"Content-Type: text/plain; charset={text_charset}",
    ]
    if text_8bit:
        text_headers.append("Content-Transfer-Encoding: 8bit")
    headers_part = [
        "Content-Description: Undelivered Message Headers",
        "Content-Type: text/rfc822-headers",
    ]
    if headers_8bit:
        headers_part.append("Content-Transfer-Encoding: 8bit")
    pieces = [
        (_CRLF.join(top) + _CRLF + _CRLF).encode("utf-8", "replace"),
        b"This is a MIME-encapsulated message.\r\n\r\n",
        part(text_headers, text),
        b"\r\n",
        part(
            ["Content-Description: Delivery report", "Content-Type: message/delivery-status"], dsn
        ),
        b"\r\n",
        part(headers_part, headers),
        b"\r\n",
        f"--{boundary}--\r\n".encode(),
    ]
    return b"".join(pieces)
