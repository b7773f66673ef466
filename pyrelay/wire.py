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
_INNER_DOT_LINE = re.compile(rb"(?<=\n)\.(?=\r\n)")


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


class WireNormalizer:
    """Streaming form of ``normalize_wire`` for DATA arriving in chunks, plus one rule for the
    header section: there a bare CR becomes a space, never a line break, so that it cannot
    start a header line of its own (``Subject: x<CR>X-Evil: 1``).

    Clean input (CRLF only, the common case) passes through untouched chunk by chunk.  After
    the first bare CR or LF the rest of the message is processed a complete line at a time; a
    line longer than ``LONG`` is flushed in pieces (it cannot be a lone ".", so no stuffing
    decision depends on the cut).
    """

    LONG = 64 * 1024

    def __init__(self) -> None:
        self.dirty = False
        self.in_headers = True
        self._carry = b""
        self._line_start = True
        self._tail = b""  # last bytes emitted, to find the blank line ending the headers

    def feed(self, data: bytes) -> bytes:
        data = self._carry + data if self._carry else data
        self._carry = b""
        if not self.dirty:
            # A trailing CR may be the first half of a CRLF split between two chunks.
            clean, tail = (data[:-1], b"\r") if data.endswith(b"\r") else (data, b"")
            if not has_bare_eol(clean):
                # A last line of just "." could still become a lone "." line if a bare CR
                # follows in the next chunk: hold it back until its line end is known.
                start = clean.rfind(b"\n") + 1
                if clean[start:] == b"." and (start or self._line_start):
                    clean, tail = clean[:start], b"." + tail
                self._carry = tail
                self._passed(clean)
                return clean
            self.dirty = True
        nl = data.rfind(b"\n")
        if nl < 0 and len(data) <= self.LONG:
            self._carry = data
            return b""
        if nl < 0:
            cut = len(data) - 2
            while cut > 0 and data[cut - 1 : cut] == b"\r":
                cut -= 1
            part, self._carry = data[:cut], data[cut:]
        else:
            part, self._carry = data[: nl + 1], data[nl + 1 :]
        return self._process(part)

    def end(self) -> bytes:
        """The held-back rest, as the message's last line (CRLF-terminated)."""
        data, self._carry = self._carry, b""
        if not data:
            return b""
        if not self.dirty and data == b"\r":
            self.dirty = True
        if not data.endswith(b"\n"):
            data += b"\n"
        return self._process(data)

    def _passed(self, out: bytes) -> None:
        if not out:
            return
        if self.in_headers:
            window = self._tail + out
            if (self._line_start and out.startswith(b"\r\n")) or b"\r\n\r\n" in window:
                self.in_headers = False
            self._tail = window[-3:]
        self._line_start = out.endswith(b"\n")

    def _process(self, part: bytes) -> bytes:
        out: list[bytes] = []
        pos = 0
        while self.in_headers and pos < len(part):
            nl = part.find(b"\n", pos)
            if nl < 0:
                break
            line = part[pos:nl]
            if line.endswith(b"\r"):
                line = line[:-1]
            line = line.replace(b"\r", b" ")
            if self._line_start:
                if not line:
                    self.in_headers = False
                elif line == b".":
                    line = b".."
            out.append(line + b"\r\n")
            self._line_start = True
            pos = nl + 1
        rest = part[pos:]
        if rest:
            body = _ANY_EOL.sub(b"\r\n", rest)
            if self._line_start and body.startswith(b".\r\n"):
                body = b"." + body
            out.append(_INNER_DOT_LINE.sub(b"..", body))
            self._line_start = body.endswith(b"\n")
        result = b"".join(out)
        if self.in_headers:
            self._passed_tail(result)
        return result

    def _passed_tail(self, out: bytes) -> None:
        self._tail = (self._tail + out)[-3:]
