"""A deliberately misbehaving upstream SMTP server for fault-injection tests.

Speaks just enough SMTP (EHLO, STARTTLS, AUTH PLAIN/LOGIN, MAIL, RCPT, DATA, RSET, NOOP, QUIT)
on raw asyncio streams, and can be told to stall, drop, answer with chosen replies, or go up and
down.  It records every byte it receives *before* TLS, so a test can prove that no credential
ever travelled in clear, and it ends DATA the way a *vulnerable* server would (a "." line ended
by CRLF, bare LF or bare CR, CVE-2023-51764 style), so a smuggled message boundary that pyrelay
let through would show up here as an extra message.

Also ``RawClient``, a client that sends exactly the bytes it is given, for hostile-client tests.
"""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
from dataclasses import dataclass, field
from pathlib import Path

# Lax end-of-data: "<EOL>.<EOL>" with any mix of CRLF, bare LF, bare CR.  A bare CR after the dot
# only counts once the next byte is known not to be LF.
_LAX_END = re.compile(rb"(?:\r\n|\n|\r)\.(?:\r\n|\n|\r(?=[^\n]))")
_STRICT_END = re.compile(rb"\r\n\.\r\n")


@dataclass
class FaultMessage:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes  # as received on the wire: dot-stuffed, without the terminator
    tls: bool


@dataclass
class FaultUpstream:
    tls_context: ssl.SSLContext | None = None
    hostname: str = "fault.test"
    host: str = "127.0.0.1"
    # Behaviour; a test may change any of these while the server runs.
    greeting: str = "220 fault.test ESMTP"
    offer_starttls: bool = True
    starttls_reply: str = "220 2.0.0 Ready to start TLS"
    offer_auth: bool = True
    offer_smtputf8: bool = True
    offer_pipelining: bool = True
    auth_reply: str = "235 2.7.0 Authentication successful"
    replies: dict[str, str] = field(default_factory=dict)  # verb ("MAIL", "DATA", "EOD") -> reply
    rcpt_replies: dict[str, str] = field(default_factory=dict)  # lower-case address -> reply
    stall_on: set[str] = field(default_factory=set)  # "GREETING", "EHLO", "MAIL", "DATA", "EOD"
    drop_on: set[str] = field(default_factory=set)  # the same names plus "MIDDATA"
    lax_terminator: bool = True
    # Records.
    port: int = 0
    connections: int = 0
    commands: list[tuple[bool, str]] = field(default_factory=list)  # (tls, line)
    clear_bytes: bytearray = field(default_factory=bytearray)
    reads: list[bytes] = field(default_factory=list)  # every chunk as read (after TLS)
    auth_lines: list[tuple[bool, bytes]] = field(default_factory=list)
    messages: list[FaultMessage] = field(default_factory=list)
    _server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def relayhost(self) -> str:
        return f"[{self.host}]:{self.port}"

    @property
    def recipients(self) -> list[str]:
        return [r for m in self.messages for r in m.rcpt_tos]

    async def start(self) -> FaultUpstream:
        self._server = await asyncio.start_server(self._client, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        """Stop listening and cut every open connection (the host went away)."""
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        if self._server is not None:
            try:
                await asyncio.wait_for(self._server.wait_closed(), 1)
            except TimeoutError:
                pass
            self._server = None
        if self._tasks:
            _, pending = await asyncio.wait(list(self._tasks), timeout=1)
            for task in pending:
                task.cancel()

    # -- the protocol ------------------------------------------------------------------------

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        self.connections += 1
        try:
            await _Conversation(self, reader, writer).run()
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError, OSError):
            pass
        finally:
            self._writers.discard(writer)
            self._tasks.discard(task)
            writer.transport.abort()


class _Drop(Exception):
    pass


class _Conversation:
    def __init__(
        self, up: FaultUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.up = up
        self.reader = reader
        self.writer = writer
        self.buf = bytearray()
        self.tls = False
        self.mail_from: str | None = None
        self.rcpts: list[str] = []

    async def _fill(self) -> None:
        chunk = await self.reader.read(65536)
        if not chunk:
            raise _Drop
        self.up.reads.append(chunk)
        if not self.tls:
            self.up.clear_bytes += chunk
        self.buf += chunk

    async def _line(self) -> bytes:
        while True:
            idx = self.buf.find(b"\n")
            if idx >= 0:
                line = bytes(self.buf[: idx + 1])
                del self.buf[: idx + 1]
                return line.rstrip(b"\r\n")
            await self._fill()

    async def _say(self, *lines: str) -> None:
        self.writer.write("".join(f"{line}\r\n" for line in lines).encode())
        await self.writer.drain()

    async def _gate(self, stage: str) -> None:
        if stage in self.up.drop_on:
            raise _Drop
        if stage in self.up.stall_on:
            # Say nothing; swallow whatever arrives until the client gives up (or stop()).
            while await self.reader.read(65536):
                pass
            raise _Drop

    async def run(self) -> None:
        try:
            await self._gate("GREETING")
            await self._say(self.up.greeting)
            if not self.up.greeting.startswith("220"):
                return
            while True:
                raw = await self._line()
                text = raw.decode("utf-8", "replace")
                self.up.commands.append((self.tls, text))
                verb = text.split(" ", 1)[0].upper()
                if not await self._command(verb, text):
                    return
        except _Drop:
            return

    async def _command(self, verb: str, text: str) -> bool:
        up = self.up
        if verb in ("EHLO", "HELO"):
            await self._gate("EHLO")
            if "EHLO" in up.replies:
                await self._say(up.replies["EHLO"])
                return True
            lines = [up.hostname, "SIZE 10240000", "8BITMIME"]
            if up.offer_pipelining:
                lines.insert(1, "PIPELINING")
            if up.offer_smtputf8:
                lines.append("SMTPUTF8")
            if up.offer_starttls and up.tls_context is not None and not self.tls:
                lines.append("STARTTLS")
            if up.offer_auth:
                lines.append("AUTH PLAIN LOGIN")
            lines.append("ENHANCEDSTATUSCODES")
            await self._say(*[f"250-{x}" for x in lines[:-1]], f"250 {lines[-1]}")
        elif verb == "STARTTLS":
            await self._gate("STARTTLS")
            await self._say(up.starttls_reply)
            if up.starttls_reply.startswith("220") and up.tls_context is not None:
                await self.writer.start_tls(up.tls_context)
                self.tls = True
                self.buf.clear()
                self.mail_from, self.rcpts = None, []
        elif verb == "AUTH":
            await self._auth(text)
        elif verb == "MAIL":
            await self._gate("MAIL")
            reply = up.replies.get("MAIL", "250 2.1.0 Ok")
            if reply.startswith("250"):
                self.mail_from = _angle(text)
                self.rcpts = []
            await self._say(reply)
        elif verb == "RCPT":
            await self._gate("RCPT")
            addr = _angle(text)
            reply = up.rcpt_replies.get(addr.lower(), up.replies.get("RCPT", "250 2.1.5 Ok"))
            if reply.startswith("250"):
                self.rcpts.append(addr)
            await self._say(reply)
        elif verb == "DATA":
            return await self._data()
        elif verb == "RSET":
            self.mail_from, self.rcpts = None, []
            await self._say("250 2.0.0 Ok")
        elif verb == "NOOP":
            await self._say("250 2.0.0 Ok")
        elif verb == "QUIT":
            await self._say("221 2.0.0 Bye")
            return False
        elif not verb:
            pass
        else:
            await self._say("502 5.5.2 Error: command not recognized")
        return True

    async def _auth(self, text: str) -> None:
        up = self.up
        up.auth_lines.append((self.tls, text.encode()))
        parts = text.split()
        if len(parts) >= 2 and parts[1].upper() == "LOGIN" and len(parts) == 2:
            await self._say("334 VXNlcm5hbWU6")
            up.auth_lines.append((self.tls, await self._line()))
            await self._say("334 UGFzc3dvcmQ6")
            up.auth_lines.append((self.tls, await self._line()))
        elif len(parts) >= 2 and parts[1].upper() == "LOGIN":
            await self._say("334 UGFzc3dvcmQ6")
            up.auth_lines.append((self.tls, await self._line()))
        elif len(parts) == 2:
            await self._say("334 ")
            up.auth_lines.append((self.tls, await self._line()))
        await self._gate("AUTH")
        await self._say(up.auth_reply)

    async def _data(self) -> bool:
        up = self.up
        await self._gate("DATA")
        if self.mail_from is None or not self.rcpts:
            await self._say("503 5.5.1 Error: need RCPT command")
            return True
        start = up.replies.get("DATA", "354 End data with <CR><LF>.<CR><LF>")
        await self._say(start)
        if not start.startswith("354"):
            return True
        pattern = _LAX_END if up.lax_terminator else _STRICT_END
        while True:
            if "MIDDATA" in up.drop_on and len(self.buf) > 0:
                raise _Drop  # some of the message arrived; vanish without a reply
            view = b"\r\n" + bytes(self.buf)
            match = pattern.search(view)
            if match:
                break
            await self._fill()
        eol = 2 if view.startswith(b"\r\n", match.start()) else 1
        data = view[2 : match.start() + eol]
        del self.buf[: max(0, match.end() - 2)]
        await self._gate("EOD")
        reply = up.replies.get("EOD", f"250 2.0.0 Ok: queued as FAULT{len(up.messages) + 1}")
        if reply.startswith("250"):
            up.messages.append(FaultMessage(self.mail_from, list(self.rcpts), data, self.tls))
        self.mail_from, self.rcpts = None, []
        await self._say(reply)
        return True


def _angle(text: str) -> str:
    start, end = text.find("<"), text.find(">")
    if start < 0 or end < start:
        return text.split(":", 1)[-1].strip()
    return text[start + 1 : end]


class BlackHole:
    """A loopback port whose accept queue is full: further SYNs are dropped, so a client's
    ``connect()`` hangs until its own timeout (Linux, ``tcp_abort_on_overflow=0``)."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(0)
        self.port: int = self.listener.getsockname()[1]
        self.fillers: list[socket.socket] = []
        for _ in range(3):
            sock = socket.socket()
            sock.setblocking(False)
            try:
                sock.connect(("127.0.0.1", self.port))
            except BlockingIOError:
                pass
            self.fillers.append(sock)

    @property
    def relayhost(self) -> str:
        return f"[127.0.0.1]:{self.port}"

    def close(self) -> None:
        for sock in self.fillers:
            sock.close()
        self.listener.close()


# -- hostile clients -------------------------------------------------------------------------


class RawClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int, host: str = "127.0.0.1") -> RawClient:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
        return cls(reader, writer)

    async def reply(self, timeout: float = 5) -> str:
        """One complete (possibly multi-line) reply; multi-line replies are joined by ``\\n``.
        Returns ``""`` if the server closed the connection."""
        lines: list[str] = []
        while True:
            raw = await asyncio.wait_for(self.reader.readline(), timeout)
            if not raw:
                return "\n".join(lines)
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(line)
            if len(line) < 4 or line[3] != "-":
                return "\n".join(lines)

    async def replies(self, count: int, timeout: float = 5) -> list[str]:
        return [await self.reply(timeout) for _ in range(count)]

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def cmd(self, line: str, timeout: float = 5) -> str:
        await self.send(line.encode() + b"\r\n")
        return await self.reply(timeout)

    async def closed(self, timeout: float = 5) -> bool:
        """True once the server has closed the connection (EOF), reading and discarding."""
        try:
            while await asyncio.wait_for(self.reader.read(65536), timeout):
                pass
        except TimeoutError:
            return False
        except ConnectionError:
            pass
        return True

    def close(self) -> None:
        self.writer.transport.abort()


def spool_files(spool_dir: Path) -> list[Path]:
    """Every queue entry (in any state, including partial ones in tmp/)."""
    return [
        p
        for sub in ("tmp", "incoming", "deferred", "hold", "corrupt")
        if (spool_dir / sub).is_dir()
        for p in (spool_dir / sub).rglob("*")
        if p.is_file()
    ]
