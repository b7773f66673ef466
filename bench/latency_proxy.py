"""A TCP proxy that adds latency, not a throttle: a distant upstream on 127.0.0.1.

Every chunk read from one side is written to the other ``--delay-ms`` milliseconds after it
arrived, in order, with no bandwidth limit (a line with latency, not a slow line).  A new
connection's upstream leg is opened three one-way delays after the client connected (SYN,
SYN-ACK, ACK), so a greeting reaches the client two round trips after ``connect()`` as over a
real path; the client's connect itself returns at once.  EOF and close travel with the same
delay.  Reading from one side pauses while the other side's write buffer is full.

    python bench/latency_proxy.py --upstream-port PORT [--port 0] [--delay-ms 10]

Prints ``READY <port>`` once listening; exits on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import signal
import sys
from typing import cast

import uvloop  # a dependency of pyrelay

_EOF = b""  # a queued EOF (empty chunks never come from data_received)


class Leg(asyncio.Protocol):
    """One side of a proxied connection: what it reads goes to ``peer`` after the delay."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.peer: Leg | None = None
        # chunks on their way to the peer: (due time, bytes), in arrival order
        self.wire: collections.deque[tuple[float, bytes]] = collections.deque()
        self.timer: asyncio.TimerHandle | None = None
        self.closed = False
        self.eof_done = False  # our EOF reached the peer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        self._send(data)

    def eof_received(self) -> bool:
        self._send(_EOF)
        return True  # keep our write side open until the peer's EOF comes back

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.wire or self.wire[-1][1] is not _EOF:
            self._send(_EOF)

    def _send(self, chunk: bytes) -> None:
        self.wire.append((self.loop.time() + self.delay, chunk))
        if self.timer is None and self.peer is not None and self.peer.transport is not None:
            self.timer = self.loop.call_at(self.wire[0][0], self._deliver)

    def start(self) -> None:
        """The peer is connected: deliver what waited for it."""
        if self.wire and self.timer is None:
            self.timer = self.loop.call_at(self.wire[0][0], self._deliver)

    def _deliver(self) -> None:
        self.timer = None
        assert self.peer is not None and self.peer.transport is not None
        out = self.peer.transport
        now = self.loop.time() + 0.0005  # uvloop's clock has millisecond steps
        due: list[bytes] = []
        eof = False
        while self.wire and self.wire[0][0] <= now:
            chunk = self.wire.popleft()[1]
            if chunk is _EOF:
                eof = True
                break
            due.append(chunk)
        if due and not out.is_closing():
            out.write(b"".join(due))
        if eof:
            # What follows an EOF is dropped; both ways at EOF (or one side gone): close both.
            self.wire.clear()
            self.eof_done = True
            if self.closed or self.peer.eof_done or not out.can_write_eof():
                out.close()
                if self.transport is not None:
                    self.transport.close()
            elif not out.is_closing():
                out.write_eof()
        elif self.wire:
            self.timer = self.loop.call_at(self.wire[0][0], self._deliver)

    # The peer writes into our transport: its reading pauses while our buffer is full.
    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


class Proxy:
    def __init__(self, upstream_port: int, delay: float) -> None:
        self.upstream_port = upstream_port
        self.delay = delay
        self.tasks: set[asyncio.Task[None]] = set()

    def client(self) -> Leg:
        leg = Leg(self.delay)
        task = asyncio.get_running_loop().create_task(self._connect(leg))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return leg

    async def _connect(self, client: Leg) -> None:
        await asyncio.sleep(3 * self.delay)  # the TCP handshake
        loop = asyncio.get_running_loop()
        if client.closed:
            return
        try:
            _, upstream = await loop.create_connection(
                lambda: Leg(self.delay), "127.0.0.1", self.upstream_port
            )
        except OSError:
            if client.transport is not None:
                client.transport.abort()
            return
        client.peer, upstream.peer = upstream, client
        client.start()
        upstream.start()


async def main(port: int, upstream_port: int, delay: float) -> None:
    proxy = Proxy(upstream_port, delay)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(proxy.client, "127.0.0.1", port, backlog=1024)
    sys.stdout.write(f"READY {server.sockets[0].getsockname()[1]}\n")
    sys.stdout.flush()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--upstream-port", type=int, required=True)
    ap.add_argument("--delay-ms", type=float, default=10.0, help="one-way delay")
    args = ap.parse_args()
    uvloop.run(main(args.port, args.upstream_port, args.delay_ms / 1000))
