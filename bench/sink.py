"""A small streaming SMTP sink for the benchmarks: accepts every message, counts it, keeps nothing.

Unlike aiosmtpd it never holds a message in memory (DATA is scanned chunk by chunk for the end
marker), so it can take 200 concurrent 10 MB messages, and it can wait before answering the end of
DATA like a slow upstream.  It advertises PIPELINING and answers a pipelined group of commands in
one write; with ``--tls-cert`` it also offers STARTTLS (the PEM file holds the certificate chain
and its key).  Only for 127.0.0.1.

    python bench/sink.py [--port 0] [--delay SECONDS] [--count-file PATH] [--tls-cert PEM]

Prints ``READY <port>`` once listening; exits on SIGTERM or SIGINT.  Every 0.2 s while they
change it writes to ``--count-file`` one line: messages accepted, the ``time.monotonic()`` of the
last one (CLOCK_MONOTONIC, comparable between processes), connections accepted, the most open at
once, and completed TLS handshakes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import ssl
import sys
import time

END = b"\r\n.\r\n"


class Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.buf = bytearray()

    async def fill(self) -> bool:
        chunk = await self.reader.read(256 * 1024)
        self.buf += chunk
        return bool(chunk)

    async def line(self) -> bytes | None:
        while True:
            idx = self.buf.find(b"\n")
            if idx >= 0:
                out = bytes(self.buf[: idx + 1])
                del self.buf[: idx + 1]
                return out
            if len(self.buf) > 4096 or not await self.fill():
                return None

    async def data(self) -> int | None:
        """Consume DATA up to and including the end marker; its size, or None on EOF."""
        size = 0
        self.buf[:0] = b"\r\n"  # the CRLF that ended the DATA command line starts the marker
        while True:
            idx = self.buf.find(END)
            if idx >= 0:
                del self.buf[: idx + len(END)]
                return size + idx
            keep = len(END) - 1
            if len(self.buf) > keep:
                size += len(self.buf) - keep
                del self.buf[:-keep]
            if not await self.fill():
                return None


class Sink:
    def __init__(self, delay: float, tls: ssl.SSLContext | None = None) -> None:
        self.delay = delay
        self.tls = tls
        self.count = 0
        self.last_at = 0.0
        self.conns = self.open = self.peak = self.handshakes = 0

    def stats(self) -> str:
        return f"{self.count} {self.last_at:.6f} {self.conns} {self.peak} {self.handshakes}"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.conns += 1
        self.open += 1
        self.peak = max(self.peak, self.open)
        try:
            await self._session(Conn(reader, writer), writer)
        except (ConnectionError, OSError):  # ssl.SSLError included
            return
        finally:
            self.open -= 1
            writer.close()

    async def _session(self, conn: Conn, writer: asyncio.StreamWriter) -> None:
        out = [b"220 sink.test ESMTP bench sink\r\n"]
        encrypted = False
        while True:
            # Answer a pipelined group in one write: flush once no further command is buffered.
            if out and b"\n" not in conn.buf:
                writer.write(b"".join(out))
                out.clear()
                await writer.drain()
            line = await conn.line()
            if line is None:
                return
            verb = line[:4].upper()
            if verb == b"EHLO":
                tls = b"250-STARTTLS\r\n" if self.tls and not encrypted else b""
                out.append(
                    b"250-sink.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n"
                    + tls
                    + b"250 SIZE 0\r\n"
                )
            elif verb == b"DATA":
                out.append(b"354 go ahead\r\n")
                writer.write(b"".join(out))
                out.clear()
                await writer.drain()
                if await conn.data() is None:
                    return
                if self.delay > 0:
                    await asyncio.sleep(self.delay)
                out.append(b"250 2.0.0 Ok: discarded\r\n")
                self.count += 1
                self.last_at = time.monotonic()
            elif verb == b"STAR" and line[:8].upper() == b"STARTTLS" and self.tls and not encrypted:
                out.append(b"220 2.0.0 Ready to start TLS\r\n")
                writer.write(b"".join(out))
                out.clear()
                await writer.drain()
                conn.buf.clear()  # RFC 3207: nothing sent before the handshake counts
                await writer.start_tls(self.tls)
                encrypted = True
                self.handshakes += 1
            elif verb == b"QUIT":
                out.append(b"221 2.0.0 bye\r\n")
                writer.write(b"".join(out))
                await writer.drain()
                return
            elif verb in (b"HELO", b"MAIL", b"RCPT", b"RSET", b"NOOP"):
                out.append(b"250 2.0.0 Ok\r\n")
            else:
                out.append(b"502 5.5.2 not here\r\n")


def write_count(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(f"{text}\n")
    os.replace(path + ".tmp", path)


async def main(port: int, delay: float, count_file: str | None, tls_cert: str | None) -> None:
    tls = None
    if tls_cert:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(tls_cert)
    sink = Sink(delay, tls)
    server = await asyncio.start_server(sink.handle, "127.0.0.1", port, backlog=1024)
    sys.stdout.write(f"READY {server.sockets[0].getsockname()[1]}\n")
    sys.stdout.flush()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    written = ""
    while not stop.is_set():
        if count_file and sink.stats() != written:
            written = sink.stats()
            write_count(count_file, written)
        try:
            await asyncio.wait_for(stop.wait(), 0.2)
        except TimeoutError:
            pass
    server.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--delay", type=float, default=0.0, help="seconds before answering DATA's end")
    ap.add_argument("--count-file")
    ap.add_argument("--tls-cert", help="PEM with certificate chain and key: offer STARTTLS")
    args = ap.parse_args()
    try:
        import uvloop

        uvloop.run(main(args.port, args.delay, args.count_file, args.tls_cert))
    except ImportError:
        asyncio.run(main(args.port, args.delay, args.count_file, args.tls_cert))
