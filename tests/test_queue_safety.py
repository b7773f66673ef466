"""The queue trusts nothing it finds on disk and keeps Postfix's ordering guarantees: planted
links and odd files are never delivered, 0.1's spool is recovered, a failed bounce write never
re-sends to delivered recipients, and the queue's files are private whatever the umask."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

from procs import RelayProc, SinkProc, encode_v1, free_port, relay_env, send_one
from test_resources import fill, tmpfs

from conftest import MESSAGE, LogCapture, Upstream, wait_until
from pyrelay.queuefile import Envelope, encode_header
from pyrelay.spool import new_queue_id


def _entry_bytes(queue_id: str, rcpt: str = "victim@dest.test") -> bytes:
    body = b"Subject: planted\r\n\r\nsecret\r\n"
    env = Envelope(queue_id=queue_id, sender="a@example.org", recipients=[rcpt], arrival=1.0)
    env.size = len(body)
    return encode_header(env) + body


async def test_planted_links_fifos_and_odd_names_are_never_delivered(
    upstream: Upstream, make_relay: Any, logs: LogCapture, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    link_id, fifo_id = new_queue_id(), new_queue_id()
    target = outside / link_id
    target.write_bytes(_entry_bytes(link_id))
    async with make_relay(upstream, min_backoff="1s", max_backoff="1s") as relay:
        spool = relay.relay.spool
        (spool.root / "deferred" / link_id).symlink_to(target)
        os.mkfifo(spool.root / "deferred" / fifo_id)
        odd = spool.root / "deferred" / "not-a-queue-id"
        odd.write_bytes(_entry_bytes("not-a-queue-id"))
        relay.relay.scheduler.flush()
        await wait_until(lambda: logs.has("event=corrupt_queue_file", link_id), what="link")
        await wait_until(lambda: logs.has("event=corrupt_queue_file", fifo_id), what="fifo")
        # The relay goes on working.
        await relay.asend("a@example.org", ["alice@dest.test"], MESSAGE)
        await wait_until(lambda: len(upstream.state.messages) == 1, what="normal delivery")
    assert [m.rcpt_tos for m in upstream.state.messages] == [["alice@dest.test"]]
    assert target.read_bytes() == _entry_bytes(link_id)  # the file outside is untouched
    assert (spool.root / "corrupt" / link_id).is_symlink()
    assert odd.exists()  # not a queue ID: never read, never removed


def test_no_hand_off_socket_and_private_files_whatever_the_umask(tmp_path: Path) -> None:
    """Secondary workers need no socket to reach the primary (0.1's datagram socket delivered
    any file it was told about); spool root and pid file are private even under umask 000."""
    sink = SinkProc(tmp_path)
    spool = tmp_path / "spool"
    port = free_port()
    env = relay_env(relay_port=port, sink_port=sink.port, spool=spool, PYRELAY_WORKERS="2")
    old = os.umask(0)
    try:
        relay = RelayProc(env).start()
    finally:
        os.umask(old)
    try:
        relay.wait_started()
        assert all(send_one(port, f"w{i}").accepted for i in range(6))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(sink.deliveries()) < 6:
            time.sleep(0.05)
        assert len(sink.deliveries()) == 6
        sockets = [p for p in spool.rglob("*") if p.is_socket()]
        assert sockets == []
        assert (spool.stat().st_mode & 0o777) == 0o700
        assert (os.stat(spool / "pyrelay.pid").st_mode & 0o777) == 0o600
    finally:
        relay.terminate()
        relay.wait(10)
        sink.stop()


def test_spool_of_the_previous_format_is_delivered(tmp_path: Path) -> None:
    """pyrelay 0.1 entries (PYRELAY1, mutable state inside) in incoming/ and deferred/: each is
    delivered once, to its remaining recipients only."""
    sink = SinkProc(tmp_path)
    spool = tmp_path / "spool"
    for d in ("tmp", "incoming", "deferred", "hold", "corrupt"):
        (spool / d).mkdir(parents=True)
    ids = []
    for state in ("incoming", "deferred"):
        qid = new_queue_id()
        body = f"Subject: old\r\nX-Test-Id: {qid}\r\n\r\nhi\r\n".encode()
        fields = {
            "queue_id": qid,
            "sender": "app@example.org",
            "recipients": ["later@dest.test"],
            "arrival": time.time(),
            "size": len(body),
            "client": "10.0.0.1",
            "smtputf8": False,
            "eightbit": False,
            "attempts": 2,
            "next_attempt": time.time(),
            "last_error": "451 later",
            "delivered": ["done@dest.test"],
        }
        (spool / state / qid).write_bytes(encode_v1(fields) + body)
        ids.append(qid)
    port = free_port()
    relay = RelayProc(relay_env(relay_port=port, sink_port=sink.port, spool=spool)).start()
    try:
        relay.wait_started()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(sink.deliveries()) < 2:
            time.sleep(0.05)
        time.sleep(0.5)
        assert sorted(d.test_id for d in sink.deliveries()) == sorted(ids)
        assert os.listdir(spool / "deferred") == [] and os.listdir(spool / "incoming") == []
    finally:
        relay.terminate()
        relay.wait(10)
        sink.stop()


async def test_failed_bounce_write_never_resends_to_delivered_recipients(
    upstream: Upstream, make_relay: Any, logs: LogCapture, tmp_path: Path
) -> None:
    """alice is delivered and nobody bounces, while the disk has room for the status file but
    not for the bounce.  0.1 re-sent to alice on every retry; now alice gets one copy and the
    bounce goes out once the disk has room."""
    upstream.state.rcpt_replies["nobody@dest.test"] = "550 5.1.1 <nobody@dest.test>: unknown"
    upstream.state.data_gate = asyncio.Event()
    with tmpfs(tmp_path / "fs", size="2m") as fs:
        async with make_relay(upstream, spool_dir=fs / "spool") as relay:
            await relay.asend("a@example.org", ["alice@dest.test", "nobody@dest.test"], MESSAGE)
            await asyncio.wait_for(upstream.state.at_data_end.wait(), 10)
            filler = await asyncio.to_thread(fill, fs)
            # Leave one page: enough for a status file, not for the bounce.
            os.truncate(filler, filler.stat().st_size - 4096)
            upstream.state.data_gate.set()
            await wait_until(lambda: logs.has("event=bounce_write_failed"), what="bounce failure")
            await asyncio.sleep(1.5)  # several retries at PYRELAY_MAX_BACKOFF=1s
            alice = [m for m in upstream.state.messages if "alice@dest.test" in m.rcpt_tos]
            assert len(alice) == 1
            filler.unlink()
            await wait_until(
                lambda: any(m.mail_from == "" for m in upstream.state.messages), what="bounce"
            )
            spool = relay.relay.spool
            await wait_until(lambda: spool.find(relay_id(logs)) is None, what="entry removed")
    alice = [m for m in upstream.state.messages if "alice@dest.test" in m.rcpt_tos]
    bounces = [m for m in upstream.state.messages if m.mail_from == ""]
    assert len(alice) == 1 and len(bounces) == 1
    assert b"nobody@dest.test" in bounces[0].content


def relay_id(logs: LogCapture) -> str:
    for line in logs.lines():
        if "event=queued" in line:
            return line.split("queue_id=", 1)[1].split()[0]
    raise AssertionError("no queued line")
