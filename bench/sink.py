"""A small streaming SMTP sink for the benchmarks: accepts every message, counts it, keeps nothing.

Unlike aiosmtpd it never holds a message in memory (DATA is scanned chunk by chunk for the end
marker), so it can take 200 concurrent 10 MB messages, and it can wait before answering the end of
DATA like a slow upstream.  Only for 127.0.0.1.

    python bench/sink.py [--port 0] [--delay SECONDS] [--count-file PATH]

Prints ``READY <port>`` once listening; writes the number of accepted messages to ``--count-file``
(every 0.2 s while it changes); exits on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

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
    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.count = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Conn(reader, writer)
        try:
            writer.write(b"220 sink.test ESMTP bench sink\r\n")
            while True:
                line = await conn.line()
                if line is None:
                    return
                verb = line[:4].upper()
                if verb == b"EHLO":
                    writer.write(b"250-sink.test\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250 SIZE 0\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 go ahead\r\n")
                    await writer.drain()
                    if await conn.data() is None:
                        return
                    if self.delay > 0:
                        await asyncio.sleep(self.delay)
                    writer.write(b"250 2.0.0 Ok: discarded\r\n")
                    await writer.drain()
                    self.count += 1
                    continue
                elif verb == b"QUIT":
                    writer.write(b"221 2.0.0 bye\r\n")
                    await writer.drain()
                    return
                elif verb in (b"HELO", b"MAIL", b"RCPT", b"RSET", b"NOOP"):
                    writer.write(b"250 2.0.0 Ok\r\n")
                else:
                    writer.write(b"502 5.5.2 not here\r\n")
                await writer.drain()
        except (ConnectionError, OSError):
            return
        finally:
            writer.close()


def write_count(path: str, count: int) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(f"{count}\n")
    os.replace(path + ".tmp", path)


async def main(port: int, delay: float, count_file: str | None) -> None:
    sink = Sink(delay)
    server = await asyncio.start_server(sink.handle, "127.0.0.1", port, backlog=1024)
    sys.stdout.write(f"READY {server.sockets[0].getsockname()[1]}\n")
    sys.stdout.flush()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    written = -1
    while not stop.is_set():
        if count_file and sink.count != written:
            written = sink.count
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
    args = ap.parse_args()
    try:
        import uvloop

        uvloop.run(main(args.port, args.delay, args.count_file))
    except ImportError:
        asyncio.run(main(args.port, args.delay, args.count_file))
