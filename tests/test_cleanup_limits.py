"""cleanup(8) limits against hostile messages, through a real listener and the recording
upstream: header_size_limit, header_address_token_limit, hopcount_limit, the event loop never
stalled by a header bomb, bare CR in a header, SMTPUTF8 downgrade, and streaming big messages."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import pytest

from conftest import MESSAGE, LogCapture, Upstream, wait_until
from pyrelay.cleanup import HEADER_SIZE_LIMIT, HOPCOUNT_LIMIT


def _send_raw(port: int, payload: bytes, *, mail: str = "MAIL FROM:<a@example.org>") -> bytes:
    """One transaction over a raw socket; returns the reply to the end of DATA."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        f = s.makefile("rb")
        f.readline()
        for cmd in (b"EHLO app.test", mail.encode(), b"RCPT TO:<b@dest.test>", b"DATA"):
            s.sendall(cmd + b"\r\n")
            while True:
                line = f.readline()
                if line[3:4] != b"-":
                    break
        s.sendall(payload + b"\r\n.\r\n")
        reply = f.readline()
        s.sendall(b"QUIT\r\n")
        return reply


async def _noop_round_trips(port: int, stop: asyncio.Event) -> list[float]:
    """Another client's NOOP round trips while the relay works on something else."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await reader.readline()
    writer.write(b"EHLO other.test\r\n")
    while (await reader.readline())[3:4] == b"-":
        pass
    times: list[float] = []
    while not stop.is_set():
        start = time.perf_counter()
        writer.write(b"NOOP\r\n")
        await writer.drain()
        await reader.readline()
        times.append(time.perf_counter() - start)
        await asyncio.sleep(0.005)
        if len(times) >= 90:  # stay under the junk-command limit
            break
    writer.write(b"QUIT\r\n")
    writer.close()
    return times


async def test_header_bomb_does_not_stall_the_event_loop(
    upstream: Upstream, make_relay: Any, logs: LogCapture
) -> None:
    """A 9.9 MB To: with ~400 000 masqueraded addresses (0.1 spent 12.9 s on it in the loop)."""
    # Folded one address a line, as a client library writes it (lines stay under 998 octets).
    addresses = b",\r\n ".join(b"u%d@sub.example.org" % i for i in range(400_000))
    bomb = (
        b"From: <a@example.org>\r\nTo: " + addresses[:9_900_000] + b"\r\nSubject: bomb\r\n\r\nx\r\n"
    )
    async with make_relay(upstream, message_size_limit=12_000_000) as relay:
        stop = asyncio.Event()
        watcher = asyncio.create_task(_noop_round_trips(relay.port, stop))
        await asyncio.sleep(0.05)
        started = time.perf_counter()
        reply = await asyncio.to_thread(_send_raw, relay.port, bomb)
        took = time.perf_counter() - started
        stop.set()
        times = await watcher
        assert reply.startswith(b"250 "), reply
        await wait_until(lambda: len(upstream.state.messages) == 1, 20, "delivery")
    got = upstream.state.messages[0].content
    head = got.split(b"\r\n\r\n", 1)[0]
    # header_size_limit: the header block is kept up to the limit, the excess discarded.
    assert len(head) <= HEADER_SIZE_LIMIT + 2048
    assert got.rstrip(b"\r\n").endswith(b"\r\n\r\nx")  # the body survives
    worst = max(times)
    print(f"\nheader bomb: DATA->250 {took:.2f}s NOOPs={len(times)} worst={worst * 1000:.1f}ms")
    # 50 ms is the goal (the closing note reports the figure); the bound here leaves room for
    # a loaded CI machine without letting a real stall (seconds) through.
    assert worst < 0.25, worst


async def test_address_token_limit_leaves_a_huge_field_unrewritten(
    upstream: Upstream, make_relay: Any
) -> None:
    many = ", ".join(f"u{i}@sub.example.org" for i in range(3000))  # > 10240 tokens
    few = ", ".join(f"u{i}@sub.example.org" for i in range(10))
    message = f"From: <a@example.org>\r\nTo: {many}\r\nCc: {few}\r\n\r\nhi\r\n".encode()
    async with make_relay(upstream) as relay:
        await relay.asend("a@example.org", ["b@dest.test"], message)
        await wait_until(lambda: len(upstream.state.messages) == 1, what="delivery")
    got = upstream.state.messages[0].content
    assert b"u2999@sub.example.org" in got  # not rewritten: over the token limit
    assert b"Cc: u0@example.org, u1@example.org" in got  # rewritten: within it


@pytest.mark.parametrize(
    ("hops", "accepted"), [(HOPCOUNT_LIMIT, True), (HOPCOUNT_LIMIT + 1, False)]
)
async def test_hopcount_limit(
    upstream: Upstream, make_relay: Any, logs: LogCapture, hops: int, accepted: bool
) -> None:
    received = b"".join(
        b"Received: from hop%d by x; Mon, 1 Jan 2024 00:00:00 +0000\r\n" % i for i in range(hops)
    )
    payload = received + b"Subject: loop\r\n\r\nbody"
    async with make_relay(upstream) as relay:
        reply = await asyncio.to_thread(_send_raw, relay.port, payload)
        if accepted:
            assert reply.startswith(b"250 "), reply
        else:
            assert reply == b"554 5.4.6 Too many hops\r\n"
            assert logs.has("event=rejected", "Too many hops")
            await asyncio.sleep(0.3)
            assert upstream.state.messages == []
            assert list(relay.relay.spool.ids("incoming")) == []


async def test_bare_cr_in_a_header_never_creates_a_header(
    upstream: Upstream, make_relay: Any
) -> None:
    payload = b"From: <a@example.org>\r\nSubject: hi\rX-Evil: 1\r\n\r\nbody\r\n"
    async with make_relay(upstream) as relay:
        reply = await asyncio.to_thread(_send_raw, relay.port, payload)
        assert reply.startswith(b"250 "), reply
        await wait_until(lambda: len(upstream.state.messages) == 1, what="delivery")
    got = upstream.state.messages[0].content
    assert b"\r\nX-Evil:" not in got and b"\nX-Evil:" not in got
    assert b"Subject: hi X-Evil: 1\r\n" in got


async def test_all_ascii_message_sent_with_smtputf8_is_downgraded(
    make_upstream: Any, make_relay: Any
) -> None:
    """RFC 6531 3.4: an all-ASCII envelope and header need no SMTPUTF8 upstream."""
    up: Upstream = await make_upstream(smtputf8=False)
    async with make_relay(up) as relay:

        def send() -> None:
            with relay.client() as smtp:
                smtp.ehlo()
                smtp.sendmail("a@example.org", ["b@dest.test"], MESSAGE, mail_options=["SMTPUTF8"])

        await asyncio.to_thread(send)
        await wait_until(lambda: len(up.state.messages) == 1, what="delivery without SMTPUTF8")


async def test_utf8_header_still_needs_smtputf8(
    make_upstream: Any, make_relay: Any, logs: LogCapture
) -> None:
    up: Upstream = await make_upstream(smtputf8=False)
    message = "From: <a@example.org>\r\nSubject: Grüße\r\n\r\nhi\r\n".encode()
    async with make_relay(up) as relay:

        def send() -> None:
            with relay.client() as smtp:
                smtp.ehlo()
                smtp.sendmail("a@example.org", ["b@dest.test"], message, mail_options=["SMTPUTF8"])

        await asyncio.to_thread(send)
        await wait_until(lambda: logs.has("event=bounced", "5.6.7"), what="SMTPUTF8 bounce")
    assert all(m.mail_from == "" for m in up.state.messages)  # only the bounce went out


async def test_large_message_streams_through_intact(upstream: Upstream, make_relay: Any) -> None:
    """5 MB with lines that straddle every read boundary, a dot line, and 8-bit bytes."""
    line = b"x" * 997 + b"\r\n"
    body = line * 2500 + b".dot line\r\n" + "é\r\n".encode() + line * 2500
    message = b"From: <a@sub.example.org>\r\nSubject: big\r\n\r\n" + body
    async with make_relay(upstream, message_size_limit=10_000_000) as relay:
        await relay.asend("a@example.org", ["b@dest.test"], message)
        await wait_until(lambda: len(upstream.state.messages) == 1, 20, "delivery")
        spool = relay.relay.spool
        await wait_until(
            lambda: list(spool.ids("incoming")) == list(spool.ids("active")) == [], what="removal"
        )
    got = upstream.state.messages[0].content
    assert got.endswith(body)
    assert b"From: <a@example.org>" in got  # masqueraded in a streamed message too


async def test_oversize_data_without_declared_size_is_refused_and_not_kept(
    upstream: Upstream, make_relay: Any
) -> None:
    payload = b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * 300
    async with make_relay(upstream, message_size_limit=100_000) as relay:
        reply = await asyncio.to_thread(_send_raw, relay.port, payload)
        assert reply == b"552 5.3.4 Message size exceeds fixed limit\r\n"
        spool = relay.relay.spool
        assert list(spool.ids("incoming")) == []
        assert list((spool.root / "tmp").iterdir()) == []
