"""One SMTP mail transaction (MAIL, RCPT…, DATA, the message) on an open upstream connection,
pipelined (RFC 2920) when the server offers PIPELINING.

aiosmtplib opens the connection (greeting, EHLO, STARTTLS, AUTH) but reads one reply per command
and takes the message as a whole; a pipelined transaction needs several replies read in order
and a message streamed from the spool with flow control.  So for the duration of a transaction
this module puts its own small protocol on the transport with ``transport.set_protocol`` (public
asyncio API, on plain and TLS transports, asyncio's and uvloop's alike) and gives the
connection back to aiosmtplib afterwards.  No aiosmtplib internals are touched.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

# A reply line longer than this, or a reply with more lines, is not SMTP: bounded memory even
# if a server streams garbage (aiosmtplib uses the same 8 KB line limit).
MAX_LINE = 8192
MAX_REPLY = 4 * MAX_LINE
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")


class MessageBody(Protocol):
    """A queued message in wire form, sent after ``DATA`` without holding all of it."""

    @property
    def size(self) -> int: ...

    def chunks(self) -> AsyncIterator[bytes]: ...


@dataclass(frozen=True, slots=True)
class Reply:
    code: int  # -1 when the line was not an SMTP reply
    text: str

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


class ConnectionLost(ConnectionError):
    """The upstream closed the connection (or it broke) during the transaction."""


class ReplyTimeout(TimeoutError):
    """The upstream did not answer (or did not read the message) in time."""


class Garbled(Exception):
    """A reply that is not SMTP: the conversation is out of step and must be dropped."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


class BadCommand(ValueError):
    """An address cannot be put on a command line (control characters, wrong encoding)."""


def command_arg(address: str, encoding: str) -> bytes:
    """``<address>`` for MAIL/RCPT; ``BadCommand`` if it cannot be sent safely."""
    try:
        raw = f"<{address}>".encode(encoding)
    except UnicodeEncodeError:
        raise BadCommand(f"address not encodable as {encoding}") from None
    if _CONTROL.search(raw):
        raise BadCommand("address contains a control character")
    return raw


class _Channel(asyncio.Protocol):
    """Reads replies and applies write flow control while it owns the transport."""

    def __init__(self, previous: asyncio.BaseProtocol) -> None:
        self.previous = previous
        self.buffer = bytearray()
        self.data = asyncio.Event()
        self.lost: Exception | None = None
        self.closed = False
        self.writable = asyncio.Event()
        self.writable.set()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self.data.set()

    def eof_received(self) -> bool:
        self.closed = True
        self.data.set()
        self.writable.set()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.lost = exc
        self.data.set()
        self.writable.set()
        # aiosmtplib must learn that its connection is gone.
        self.previous.connection_lost(exc)

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()


class Transaction:
    """Owns the transport of an aiosmtplib client for one transaction (``async with``)."""

    def __init__(
        self, transport: asyncio.Transport, timeout: float, *, data_timeout: float | None = None
    ) -> None:
        self.transport = transport
        self.timeout = timeout
        self.data_timeout = data_timeout or timeout
        self.stage = "MAIL FROM"  # for the error text when the connection fails
        previous = transport.get_protocol()
        self._previous = previous
        self._channel = _Channel(previous)

    async def __aenter__(self) -> Transaction:
        self.transport.set_protocol(self._channel)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if not self._channel.closed:
            self.transport.set_protocol(self._previous)

    def send(self, data: bytes) -> None:
        if self._channel.closed or self.transport.is_closing():
            raise ConnectionLost("connection lost")
        self.transport.write(data)

    async def drain(self) -> None:
        """Wait while the transport's write buffer is over its high-water mark."""
        channel = self._channel
        if channel.writable.is_set():
            return
        try:
            await asyncio.wait_for(channel.writable.wait(), self.timeout)
        except TimeoutError:
            raise ReplyTimeout("timed out sending the message") from None
        if channel.closed:
            raise ConnectionLost("connection lost")

    async def reply(self) -> Reply:
        """The next complete reply, in order."""
        channel = self._channel
        while True:
            reply = self._parse()
            if reply is not None:
                if reply.code < 0:
                    raise Garbled(reply.text)
                return reply
            if channel.closed:
                raise ConnectionLost("connection lost")
            channel.data.clear()
            try:
                await asyncio.wait_for(channel.data.wait(), self.timeout)
            except TimeoutError:
                raise ReplyTimeout("timed out waiting for a reply") from None

    def _parse(self) -> Reply | None:
        buf = self._channel.buffer
        lines: list[bytes] = []
        pos = 0
        while True:
            end = buf.find(b"\n", pos)
            if end < 0:
                if len(buf) - pos > MAX_LINE or len(buf) > MAX_REPLY:
                    return self._garbage()
                return None
            line = bytes(buf[pos : end + 1]).rstrip(b"\r\n")
            pos = end + 1
            if len(line) > MAX_LINE or len(lines) * MAX_LINE > MAX_REPLY:
                return self._garbage()
            if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in (b"", b" ", b"-"):
                del buf[:pos]
                return Reply(-1, line.decode("utf-8", "replace"))
            lines.append(line[4:])
            if line[3:4] != b"-":
                del buf[:pos]
                text = b"\n".join(lines).decode("utf-8", "surrogateescape")
                return Reply(int(line[:3]), text)

    def _garbage(self) -> Reply:
        self._channel.buffer.clear()
        return Reply(-1, "Response too long")


@dataclass(frozen=True, slots=True)
class Replies:
    """The server's answers to one transaction, mapped to the commands that caused them."""

    mail: Reply
    rcpts: dict[str, Reply]
    data: Reply | None  # the reply to DATA (354), None when DATA was not sent
    final: Reply | None  # the reply after the message, None when it was not sent


async def run_transaction(
    tx: Transaction,
    mail_command: bytes,
    recipients: Sequence[tuple[str, bytes]],
    body: MessageBody,
    *,
    pipelining: bool,
    reset_first: bool,
) -> Replies:
    """MAIL, RCPT for each ``(recipient, command argument)``, DATA, the message.

    With ``pipelining`` everything up to DATA goes out in one write and the replies are read in
    order (RFC 2920); otherwise one command at a time, stopping early as a classic client does.
    """
    head: list[bytes] = []
    if reset_first:
        head.append(b"RSET\r\n")
    head.append(mail_command + b"\r\n")
    rcpt_lines = [b"RCPT TO:" + arg + b"\r\n" for _, arg in recipients]
    if pipelining:
        tx.send(b"".join((*head, *rcpt_lines, b"DATA\r\n")))
        if reset_first:
            await tx.reply()  # RSET's 250; a failure shows up in MAIL's reply
        mail = await tx.reply()
        tx.stage = "RCPT TO"
        rcpts = {rcpt: await tx.reply() for rcpt, _ in recipients}
        tx.stage = "DATA"
        data = await tx.reply()
        accepted = any(r.ok for r in rcpts.values())
        if data.code == 354 and not accepted:
            # RFC 2920 3.1: no recipient, yet the server is waiting for the message.
            tx.send(b".\r\n")
            await tx.reply()
            return Replies(mail, rcpts, data, None)
    else:
        for line in head:
            tx.send(line)
            mail = await tx.reply()
        if not mail.ok:
            return Replies(mail, {}, None, None)
        rcpts = {}
        tx.stage = "RCPT TO"
        for (rcpt, _), line in zip(recipients, rcpt_lines, strict=True):
            tx.send(line)
            rcpts[rcpt] = await tx.reply()
        if not any(r.ok for r in rcpts.values()):
            return Replies(mail, rcpts, None, None)
        tx.stage = "DATA"
        tx.send(b"DATA\r\n")
        data = await tx.reply()
    if data.code != 354 or not mail.ok:
        return Replies(mail, rcpts, data, None)
    # Postfix's words, which operators know: the second one warns of the duplicate window.
    tx.stage = "message body"
    tx.timeout = tx.data_timeout
    async for chunk in body.chunks():
        tx.send(chunk)
        await tx.drain()
    tx.send(b".\r\n")
    tx.stage = "end of data -- message may be sent more than once"
    return Replies(mail, rcpts, data, await tx.reply())
