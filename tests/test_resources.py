"""Promise 3 (issue 5): resource faults.

* Spool disk full (a 1 MiB tmpfs the test mounts): ``452 4.3.1 Insufficient system storage``,
  nothing accepted before is lost, new mail is accepted again once space returns.
* Spool not writable at start: exit code 2 and one line naming ``PYRELAY_SPOOL_DIR``.
* Spool becomes read-only at run time (``mount -o remount,ro``): ``451 4.3.0``, and a delivered
  message whose entry cannot be unlinked is not delivered again and again.
* Clock jumps: entries whose stored ``next_attempt`` lies far in the future (a wall clock that
  was ahead and jumped back) are retried within ``PYRELAY_MAX_BACKOFF``.
"""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from procs import RCPT, REPO, SENDER, RelayProc, SinkProc, free_port, relay_env, send_one

from pyrelay.queuefile import Envelope, encode_header
from pyrelay.spool import new_queue_id

FULL = (452, "4.3.1 Insufficient system storage")
WRITE_ERROR = (451, "4.3.0 Error: queue file write error")


@contextmanager
def tmpfs(path: Path, size: str = "1m") -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs for the spool needs root (CAP_SYS_ADMIN)")
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
        capture_output=True,
        timeout=10,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=10)


def remount(path: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], check=True, timeout=10)


def fill(path: Path) -> Path:
    """Write a filler file until the file system says ENOSPC (down to the last page)."""
    filler = path / "filler"
    with open(filler, "wb", buffering=0) as f:
        for chunk in (64 * 1024, 4096, 512, 1):
            for _ in range(100_000):
                try:
                    f.write(b"\0" * chunk)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    break
    return filler


def queued(spool: Path) -> list[str]:
    return sorted(
        name for state in ("incoming", "active", "deferred") for name in os.listdir(spool / state)
    )


def wait_for(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[SinkProc]:
    s = SinkProc(tmp_path)
    yield s
    s.stop()


@contextmanager
def relay_on(spool: Path, sink: SinkProc, **extra: str) -> Iterator[tuple[RelayProc, int]]:
    port = free_port()
    relay = RelayProc(relay_env(relay_port=port, sink_port=sink.port, spool=spool, **extra))
    relay.start()
    try:
        relay.wait_started()
        yield relay, port
        relay.terminate()
        assert relay.wait(10) == 0, "\n".join(relay.raw[-20:])
    finally:
        if relay.alive():
            relay.kill()


def test_disk_full_gets_452_loses_nothing_and_recovers(tmp_path: Path, sink: SinkProc) -> None:
    with tmpfs(tmp_path / "fs") as fs:
        spool = fs / "spool"
        sink.set_defer(True)  # keep accepted mail in the spool while the disk fills up
        with relay_on(spool, sink) as (relay, port):
            before = [send_one(port, f"before-{i}", size=2000) for i in range(5)]
            assert all(r.accepted for r in before), before
            wait_for(lambda: len(relay.named("deferred")) >= 5, 10, "deferrals")
            filler = fill(fs)
            full = [send_one(port, f"full-{i}", size=size) for i, size in enumerate((10, 5000))]
            assert [(r.code, r.text) for r in full] == [FULL, FULL]
            # Log lines trail the replies (written at the end of the relay's loop pass).
            wait_for(lambda: len(relay.named("queue_write_failed")) >= 2, 5, "both logged")
            failed = relay.named("queue_write_failed")
            assert len(failed) == 2 and all(e["reply"].startswith("452 4.3.1") for e in failed)
            # Retries while full cannot rewrite their entries; the entries must stay.
            time.sleep(1.5)
            ids = {r.queue_id for r in before}
            assert set(queued(spool)) == ids
            assert os.listdir(spool / "corrupt") == []
            filler.unlink()  # the operator frees space
            after = [send_one(port, f"after-{i}", size=2000) for i in range(3)]
            assert all(r.accepted for r in after), after
            sink.set_defer(False)
            wait_for(lambda: len(sink.deliveries()) >= 8, 15, "all deliveries")
            time.sleep(0.5)
            got = sorted(d.test_id for d in sink.deliveries())
            assert got == sorted(r.test_id for r in before + after)  # exactly once each
            wait_for(lambda: queued(spool) == [], 5, "empty queue")
            print(
                f"\ndisk-full: accepted_before={len(before)} refused_452={len(full)} "
                f"accepted_after={len(after)} delivered={len(got)} lost=0"
            )


def test_spool_under_a_regular_file_exits_2_naming_the_variable(
    tmp_path: Path, sink: SinkProc
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    _assert_exit_2(relay_env(relay_port=free_port(), sink_port=sink.port, spool=blocker / "q"))


def test_read_only_spool_exits_2_naming_the_variable(tmp_path: Path, sink: SinkProc) -> None:
    with tmpfs(tmp_path / "fs") as fs:
        for sub in ("fresh", "existing"):
            spool = fs / sub
            if sub == "existing":  # the directories exist, only writing fails
                for d in ("tmp", "incoming", "deferred", "hold", "corrupt"):
                    (spool / d).mkdir(parents=True)
        remount(fs, "ro")
        for sub in ("fresh", "existing"):
            env = relay_env(relay_port=free_port(), sink_port=sink.port, spool=fs / sub)
            _assert_exit_2(env)


def _assert_exit_2(env: dict[str, str]) -> None:
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pyrelay"], cwd=REPO, env=env, capture_output=True, timeout=20
    )
    took = time.monotonic() - start
    err = proc.stderr.decode()
    assert proc.returncode == 2, err
    naming = [line for line in err.splitlines() if "PYRELAY_SPOOL_DIR" in line]
    assert len(naming) == 1, err
    assert env["PYRELAY_SPOOL_DIR"] in naming[0] and "not writable" in naming[0]
    assert "Traceback" not in err
    assert took < 15
    print(f"\nspool-not-writable: exit=2 line={naming[0]!r}")


def test_spool_turning_read_only_gets_451_and_no_repeat_deliveries(
    tmp_path: Path, sink: SinkProc
) -> None:
    with tmpfs(tmp_path / "fs", size="4m") as fs:
        spool = fs / "spool"
        sink.set_defer(True)
        with relay_on(spool, sink) as (relay, port):
            before = [send_one(port, f"before-{i}") for i in range(3)]
            assert all(r.accepted for r in before), before
            wait_for(lambda: len(relay.named("deferred")) >= 3, 10, "deferrals")
            remount(fs, "ro")
            try:
                res = send_one(port, "ro-0")
                assert (res.code, res.text) == WRITE_ERROR
                wait_for(lambda: bool(relay.named("queue_write_failed")), 5, "logged")
                assert relay.named("queue_write_failed")[-1]["reply"].startswith("451 4.3.0")
                # The upstream now accepts, but a retry cannot even claim its entry (a rename
                # into active/): nothing may be sent, let alone sent again every retry.
                sink.set_defer(False)
                time.sleep(2.5)  # > 2 retry periods at PYRELAY_MAX_BACKOFF=1s
                during = [d.test_id for d in sink.deliveries()]
                assert len(during) == len(set(during)), during
                assert relay.named("queue_file_move_failed"), "the failed claim is logged"
            finally:
                remount(fs, "rw")
            again = send_one(port, "rw-0")
            assert again.accepted, again
            wait_for(lambda: len(sink.deliveries()) >= 4, 10, "delivery after rw")
            wait_for(lambda: queued(spool) == [], 10, "entries unlinked once writable")
            time.sleep(0.3)
            got = sorted(d.test_id for d in sink.deliveries())
            assert got == sorted([*(r.test_id for r in before), "rw-0"])
            print(
                f"\nread-only spool: accepted={len(before) + 1} refused_451=1 "
                f"delivered={len(got)} duplicated=0"
            )


def _write_entry(spool: Path, state: str, **fields: Any) -> str:
    qid = new_queue_id()
    body = f"Subject: clock\r\nX-Test-Id: {qid}\r\n\r\nhi\r\n".encode()
    env = Envelope(
        queue_id=qid, sender=SENDER, recipients=[RCPT], arrival=time.time(), size=len(body)
    )
    for k, v in fields.items():
        setattr(env, k, v)
    path = spool / state / qid
    path.write_bytes(encode_header(env) + body)
    if env.next_attempt:
        # A deferred entry's next attempt is its mtime (as in Postfix).
        os.utime(path, (env.next_attempt, env.next_attempt))
    return qid


def test_clock_jump_does_not_stall_retries(tmp_path: Path, sink: SinkProc) -> None:
    spool = tmp_path / "spool"
    for d in ("tmp", "incoming", "deferred", "hold", "corrupt"):
        (spool / d).mkdir(parents=True)
    now = time.time()
    ids = [
        # Deferred while the wall clock was 10 days ahead; it has since jumped back.
        _write_entry(spool, "deferred", next_attempt=now + 10 * 86400, attempts=3),
        _write_entry(spool, "deferred", next_attempt=now + 1e9, attempts=9),
        # Accepted while the clock was ahead: arrival in the future.
        _write_entry(spool, "deferred", arrival=now + 10 * 86400, next_attempt=now + 10 * 86400),
        _write_entry(spool, "incoming", arrival=now + 10 * 86400),
    ]
    max_backoff = 1.0
    with relay_on(spool, sink, PYRELAY_MAX_BACKOFF=f"{max_backoff}s") as (relay, _):
        started = time.time()
        wait_for(lambda: len(sink.deliveries()) >= len(ids), max_backoff + 5, "retries")
        late = max(d.t for d in sink.deliveries()) - started
        assert sorted(d.test_id for d in sink.deliveries()) == sorted(ids)
        assert late <= max_backoff + 1.0, late
        print(f"\nclock-jump: entries={len(ids)} all_retried_within={late:.2f}s")


async def test_no_per_connection_objects_outlive_their_connections(
    upstream: Any, make_relay: Any
) -> None:
    """Issue 10, memory at rest: after sessions of every kind are over (a full transaction, a
    message refused at the end of DATA, a client gone in the middle of DATA, one that only said
    EHLO, one refused at RCPT), the listener keeps no per-connection state and no session
    object is left alive (a refusal raised as a module-level exception kept the last session
    that raised it, with its buffers, until the next one)."""
    import gc
    import socket

    from conftest import MESSAGE, wait_until
    from pyrelay.server import RelaySMTP

    def sessions_alive(listener: Any) -> list[RelaySMTP]:
        # Only this relay's: an earlier test's relay in the same process is not measured here.
        gc.collect()
        return [o for o in gc.get_objects() if isinstance(o, RelaySMTP) and o.listener is listener]

    async with make_relay(upstream, message_size_limit=4096) as relay:
        listener = relay.relay.listener
        for i in range(5):
            assert await relay.asend("app@example.org", [f"r{i}@dest.test"], MESSAGE) == {}
        # Refused at the end of DATA (no SIZE= declared): too big, too many hops.
        hop = b"Received: from x by y; Tue, 1 Dec 2026 00:00:00 +0000\r\n"
        refusals = ((MESSAGE + b"x" * 5000 + b"\r\n", b"552 5.3.4"), (hop * 51 + MESSAGE, b"554"))

        def hostile() -> None:
            for body, reply in refusals:
                with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as s:
                    s.recv(1024)
                    s.sendall(b"EHLO x\r\nMAIL FROM:<app@example.org>\r\nRCPT TO:<a@dest.test>\r\n")
                    s.sendall(b"DATA\r\n")
                    got = b""
                    while got.count(b"\r\n") < 4 or b"354" not in got:
                        got += s.recv(4096)
                    s.sendall(body + b".\r\n")
                    assert s.recv(4096).startswith(reply)
            for _ in range(5):
                with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as s:
                    s.recv(1024)
                    s.sendall(b"EHLO x\r\nMAIL FROM:<app@example.org>\r\nRCPT TO:<a@dest.test>\r\n")
                    s.sendall(b"DATA\r\n")
                    s.recv(4096)
                    s.sendall(b"Subject: cut\r\n\r\npart of a body")  # and gone
                with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as s:
                    s.recv(1024)
                    s.sendall(b"EHLO x\r\n")
                    s.recv(1024)
                with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as s:
                    s.recv(1024)
                    s.sendall(b"EHLO x\r\nMAIL FROM:<spam@elsewhere.test>\r\nQUIT\r\n")
                    s.recv(4096)

        await asyncio.to_thread(hostile)
        await wait_until(
            lambda: not listener.sessions and not listener.per_client, what="sessions closed"
        )
        assert listener._client_of == {}
        # Only the listener's template (built at the first connection) may remain.
        await wait_until(lambda: len(sessions_alive(listener)) <= 1, what="session objects freed")
        assert sessions_alive(listener) == [listener.template]
