"""Pure logic of the queue: the entry format (current and 0.1's), the status file, queue IDs,
the streaming writer, the state machine's renames, and the retry schedule."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyrelay.queuefile import encode_header, parse_header
from pyrelay.scheduler import retry_delay
from pyrelay.spool import (
    CorruptEntry,
    EntryWriter,
    Envelope,
    OpenEntry,
    Spool,
    _DirSync,
    new_queue_id,
    worker_of,
)


def parse_entry(raw: bytes, state: str, queue_id: str) -> tuple[Envelope, int]:
    header = parse_header(raw, queue_id, state, len(raw))
    return header.envelope, header.offset


def _env(queue_id: str = "0123456789ABCDE0", size: int = 0) -> Envelope:
    return Envelope(
        queue_id=queue_id,
        sender="a@example.org",
        recipients=["b@dest.test", "c@dest.test"],
        arrival=1_800_000_000.5,
        size=size,
        client="172.18.0.5",
        smtputf8=True,
        eightbit=True,
    )


def encode_v1(env: Envelope) -> bytes:
    """pyrelay 0.1's queue file header: every field, mutable ones included, in one JSON line."""
    data = {
        "queue_id": env.queue_id,
        "sender": env.sender,
        "recipients": env.recipients,
        "arrival": env.arrival,
        "size": env.size,
        "client": env.client,
        "smtputf8": env.smtputf8,
        "eightbit": env.eightbit,
        "attempts": env.attempts,
        "next_attempt": env.next_attempt,
        "last_error": env.last_error,
        "delivered": env.delivered,
    }
    body = json.dumps(data, separators=(",", ":")).encode()
    return b"PYRELAY1 " + str(len(body)).encode() + b"\n" + body + b"\n"


@given(st.binary(max_size=2000))
@settings(max_examples=200, deadline=None)
def test_entry_round_trips_any_message_bytes(message: bytes) -> None:
    env = _env(size=len(message))
    raw = encode_header(env) + message
    parsed, offset = parse_entry(raw, "deferred", env.queue_id)
    assert raw[offset:] == message
    assert parsed.recipients == env.recipients and parsed.sender == env.sender
    assert (parsed.arrival, parsed.size, parsed.smtputf8, parsed.eightbit) == (
        env.arrival,
        len(message),
        True,
        True,
    )
    assert parsed.state == "deferred"


def test_previous_format_is_read() -> None:
    env = _env(size=5)
    env.attempts, env.next_attempt, env.last_error = 3, 1_800_000_600.0, "451 4.3.0 later"
    env.delivered = ["d@dest.test"]
    parsed, offset = parse_entry(encode_v1(env) + b"hello", "deferred", env.queue_id)
    assert (parsed.attempts, parsed.last_error, parsed.delivered) == (
        3,
        "451 4.3.0 later",
        ["d@dest.test"],
    )
    assert parsed.size == 5


def test_status_overlays_the_mutable_fields() -> None:
    env = _env()
    env.recipients = ["c@dest.test"]
    env.attempts, env.next_attempt, env.last_error = 2, 1_800_000_900.0, "451 x"
    env.delivered = ["b@dest.test"]
    fresh = _env()
    fresh.apply_status(env.status_json())
    assert (fresh.recipients, fresh.attempts, fresh.next_attempt, fresh.delivered) == (
        ["c@dest.test"],
        2,
        1_800_000_900.0,
        ["b@dest.test"],
    )
    for bad in (b"", b"[]", b'{"v":2}', b'{"v":1,"recipients":[1],"attempts":0}'):
        with pytest.raises(CorruptEntry):
            _env().apply_status(bad)


@pytest.mark.parametrize(
    "damage",
    [
        lambda raw: raw[:-1],  # truncated message
        lambda raw: raw + b"x",  # trailing garbage
        lambda raw: raw[:20],  # truncated envelope
        lambda raw: b"XXXX" + raw[4:],  # bad magic
        lambda raw: raw.replace(b'"client":"172.18.0.5"', b'"client":5'),  # wrong type
        lambda raw: raw.replace(b"PYRELAY2 000", b"PYRELAY2 999"),  # envelope length
        lambda raw: b"",
    ],
)
def test_damaged_entries_are_corrupt_not_crashes(damage: object) -> None:
    env = _env(size=5)
    raw = encode_header(env) + b"hello"
    with pytest.raises(CorruptEntry):
        parse_entry(damage(raw), "incoming", env.queue_id)  # type: ignore[operator]


def test_entry_under_the_wrong_name_is_corrupt() -> None:
    env = _env(size=0)
    with pytest.raises(CorruptEntry):
        parse_entry(encode_header(env), "incoming", "FFFFFFFFFFFFFFF0")


def test_queue_ids_are_unique_sortable_and_name_their_worker() -> None:
    ids = [new_queue_id(3) for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    assert all(len(q) == 16 and q == q.upper() and worker_of(q) == 3 for q in ids)
    first = new_queue_id(0)
    assert first[:10] <= new_queue_id(0)[:10]  # time-ordered prefix


def test_retry_schedule_doubles_from_min_to_max_with_jitter() -> None:
    mid = [retry_delay(n, 300, 4000, rand=lambda: 0.5) for n in range(1, 8)]
    assert mid == [300, 600, 1200, 2400, 4000, 4000, 4000]
    assert retry_delay(1, 300, 4000, rand=lambda: 0.0) == pytest.approx(270)
    assert retry_delay(1, 300, 4000, rand=lambda: 1.0) == pytest.approx(330)
    assert retry_delay(9, 300, 4000, rand=lambda: 1.0) == 4000  # jitter never exceeds max


def test_directory_fsync_is_shared_and_every_writer_covered(tmp_path: Path) -> None:
    sync = _DirSync(tmp_path)
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            for _ in range(20):
                sync.sync()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert sync._completed == sync._requested  # the last writer is covered too
    assert sync._requested == 160


async def test_store_open_move_remove(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", worker=1)
    spool.prepare()
    env = Envelope(queue_id=spool.new_id(), sender="", recipients=["x@dest.test"], arrival=1.0)
    await spool.store(env, [b"Subject: a\r\n\r\n", memoryview(b"body\r\n")])
    assert worker_of(env.queue_id) == 1
    entry = spool.open_entry("incoming", env.queue_id)
    assert spool.read_message(entry, 0, 100) == b"Subject: a\r\n\r\nbody\r\n"
    entry.close()
    assert spool.claim(env.queue_id, "incoming")
    assert not spool.claim(env.queue_id, "incoming")  # the loser of a race sees ENOENT
    assert spool.find(env.queue_id) == "active"
    env.next_attempt = 12345.0
    env.recipients = []
    spool.defer(env)
    assert spool.find(env.queue_id) == "deferred"
    assert os.stat(spool.path("deferred", env.queue_id)).st_mtime == 12345.0
    assert spool.read_envelope("deferred", env.queue_id).recipients == []
    spool.remove(env.queue_id, "deferred")
    assert spool.find(env.queue_id) is None
    assert not (spool.root / "status" / env.queue_id).exists()
    spool.close()


async def test_streaming_writer_spills_and_publishes(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.prepare()
    env = Envelope(queue_id=spool.new_id(), sender="a@b.c", recipients=["x@dest.test"], arrival=1.0)
    writer = spool.writer(env)
    chunk = b"x" * 1000 + b"\r\n"
    for _ in range(200):
        await writer.write(chunk)
    assert writer._fd is not None  # spilled to tmp/ long before the end
    assert not spool.path("incoming", env.queue_id).exists()
    await writer.commit(smtputf8=False, eightbit=True)
    assert writer.payload is None
    entry = spool.open_entry("incoming", env.queue_id)
    assert entry.envelope.size == 200 * len(chunk) and entry.envelope.eightbit
    assert spool.read_message(entry, 0, len(chunk)) == chunk
    entry.close()
    assert os.listdir(spool.root / "tmp") == []
    aborted = spool.writer(Envelope(spool.new_id(), "", ["x@dest.test"], 1.0))
    for _ in range(200):
        await aborted.write(chunk)
    await aborted.abort()
    assert os.listdir(spool.root / "tmp") == []
    spool.close()
    assert EntryWriter.SPILL <= 128 * 1024  # bounded memory per session in DATA


def test_spool_root_and_dirs_are_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        spool = Spool(tmp_path / "spool")
        spool.prepare()
    finally:
        os.umask(old)
    assert (spool.root.stat().st_mode & 0o777) == 0o700
    for name in ("incoming", "active", "deferred", "status", "requests"):
        assert ((spool.root / name).stat().st_mode & 0o777) == 0o700
    spool.close()


async def test_store_never_overwrites_an_entry(tmp_path: Path) -> None:
    from pyrelay.errors import SpoolWriteError

    spool = Spool(tmp_path / "spool")
    spool.prepare()
    first = Envelope(queue_id=spool.new_id(), sender="", recipients=["x@dest.test"], arrival=1.0)
    await spool.store(first, [b"first\r\n"])
    clash = Envelope(queue_id=first.queue_id, sender="", recipients=["y@dest.test"], arrival=2.0)
    with pytest.raises(SpoolWriteError):
        await spool.store(clash, [b"second\r\n"])
    entry = spool.open_entry("incoming", first.queue_id)
    assert entry.envelope.recipients == ["x@dest.test"]
    assert spool.read_message(entry, 0, 100) == b"first\r\n"
    entry.close()
    spool.close()


async def test_small_message_is_read_with_its_envelope(tmp_path: Path) -> None:
    from pyrelay.spool import SpoolBody

    spool = Spool(tmp_path / "spool")
    spool.prepare()
    env = Envelope(queue_id=spool.new_id(), sender="", recipients=["x@dest.test"], arrival=1.0)
    await spool.store(env, [b"Subject: a\r\n\r\nbody\r\n"])
    small = spool.open_entry("incoming", env.queue_id, preload=1024)
    big = spool.open_entry("incoming", env.queue_id, preload=4)
    assert small.preload == b"Subject: a\r\n\r\nbody\r\n" and big.preload is None
    for entry in (small, big):
        body = SpoolBody(spool, entry)
        assert b"".join([c async for c in body.chunks()]) == b"Subject: a\r\n\r\nbody\r\n"
        assert await body.head(9) == b"Subject: "
        entry.close()
    spool.close()


async def test_a_claimed_commit_lands_in_active_and_is_taken_without_a_claim(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path / "spool")
    spool.prepare()
    env = Envelope(queue_id=spool.new_id(), sender="a@b.c", recipients=["x@dest.test"], arrival=1.0)
    writer = spool.writer(env)
    await writer.write(b"Subject: a\r\n\r\nbody\r\n")
    await writer.commit(smtputf8=False, eightbit=False, claimed=True)
    assert env.state == "active" and spool.find(env.queue_id) == "active"
    assert list(spool.ids("incoming")) == [] and list((spool.root / "tmp").iterdir()) == []
    entry = spool.take("active", env.queue_id)
    assert isinstance(entry, OpenEntry) and entry.envelope.recipients == ["x@dest.test"]
    entry.close()
    assert spool.find(env.queue_id) == "active"
    spool.close()


@pytest.mark.parametrize("size", [100, 60 * 1024, 200 * 1024])
async def test_commit_publishes_every_size_and_leaves_no_tmp(tmp_path: Path, size: int) -> None:
    """Two ways to the same entry: written from the event loop at the end (up to SPILL), or
    spilled while it arrived (written in spool threads)."""
    assert 100 < 60 * 1024 < EntryWriter.SPILL < 200 * 1024
    spool = Spool(tmp_path / "spool")
    spool.prepare()
    env = Envelope(queue_id=spool.new_id(), sender="a@b.c", recipients=["x@dest.test"], arrival=1.0)
    writer = spool.writer(env)
    body = (b"y" * 998 + b"\r\n") * (size // 1000) + b"z" * (size % 1000)
    for i in range(0, len(body), 7000):
        await writer.write(body[i : i + 7000])
    await writer.commit(smtputf8=False, eightbit=False)
    assert writer._fd is None
    assert list((spool.root / "tmp").iterdir()) == []
    entry = spool.open_entry("incoming", env.queue_id)
    assert entry.envelope.size == len(body)
    assert spool.read_message(entry, 0, len(body)) == body
    entry.close()
    assert (writer.payload is None) == (size > EntryWriter.SPILL)
    spool.close()


async def _commit_many(spool: Spool, count: int) -> list[BaseException | None]:
    writers = []
    for i in range(count):
        env = Envelope(spool.new_id(), "a@b.c", [f"x{i}@dest.test"], 1.0)
        writer = spool.writer(env)
        await writer.write(f"Subject: {i}\r\n\r\nbody {i}\r\n".encode())
        writers.append(writer)
    results = await asyncio.gather(
        *(w.commit(smtputf8=False, eightbit=False) for w in writers), return_exceptions=True
    )
    return [r if isinstance(r, BaseException) else None for r in results]


async def test_small_messages_committed_together_share_thread_jobs(tmp_path: Path) -> None:
    """Issue 10: messages whose DATA ends while others are on disk are published in one batch
    (one hand-off to a spool thread, one wake-up of the loop), not one thread job each."""
    spool = Spool(tmp_path / "spool")
    spool.prepare()
    jobs = 0
    submit = spool.executor.submit

    def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal jobs
        jobs += 1
        return submit(*args, **kwargs)

    spool.executor.submit = counting  # type: ignore[method-assign]
    assert await _commit_many(spool, 20) == [None] * 20
    assert len(list(spool.ids("incoming"))) == 20
    assert list((spool.root / "tmp").iterdir()) == []
    assert jobs <= 5, jobs
    spool.close()


async def test_an_id_clash_in_a_batch_fails_only_that_entry(tmp_path: Path) -> None:
    from pyrelay.errors import SpoolWriteError

    spool = Spool(tmp_path / "spool")
    spool.prepare()
    ids = iter([f"0123456789ABCD{i:02X}" for i in range(8)])
    spool.new_id = lambda: next(ids)  # type: ignore[method-assign]
    taken = spool.path("incoming", "0123456789ABCD03")
    taken.write_bytes(b"an accepted entry")
    results = await _commit_many(spool, 8)
    assert [type(r) for r in results] == [type(None)] * 3 + [SpoolWriteError] + [type(None)] * 4
    assert taken.read_bytes() == b"an accepted entry"
    assert len(list(spool.ids("incoming"))) == 8
    assert list((spool.root / "tmp").iterdir()) == []
    spool.close()


async def test_a_failed_directory_fsync_fails_the_whole_batch(tmp_path: Path) -> None:
    """Not durable, so not accepted: every entry of the batch is unlinked and reported."""
    from pyrelay.errors import SpoolWriteError

    spool = Spool(tmp_path / "spool")
    spool.prepare()

    def broken() -> None:
        raise OSError(5, "Input/output error")

    spool._dirsync["incoming"].sync = broken  # type: ignore[method-assign]
    results = await _commit_many(spool, 6)
    assert all(isinstance(r, SpoolWriteError) for r in results)
    assert list(spool.ids("incoming")) == [] and list((spool.root / "tmp").iterdir()) == []
    spool.close()


async def test_a_commit_cancelled_on_its_way_to_disk_ends_with_the_outcome(
    tmp_path: Path,
) -> None:
    """The caller cancelled while the thread has the file: the cancellation is raised once
    the entry is durable, ``published`` says so, and the file is closed only then."""
    spool = Spool(tmp_path / "spool")
    spool.prepare()
    on_disk = threading.Event()
    go_on = threading.Event()
    sync = spool._dirsync["incoming"].sync

    def slow() -> None:
        on_disk.set()
        go_on.wait(5)
        sync()

    spool._dirsync["incoming"].sync = slow  # type: ignore[method-assign]
    env = Envelope(spool.new_id(), "a@b.c", ["x@dest.test"], 1.0)
    writer = spool.writer(env)
    await writer.write(b"Subject: a\r\n\r\nbody\r\n")
    task = asyncio.create_task(writer.commit(smtputf8=False, eightbit=False))
    await asyncio.to_thread(on_disk.wait, 5)
    task.cancel()
    await asyncio.sleep(0.05)
    assert not task.done() and writer._fd is not None  # still the thread's
    go_on.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert writer.published and writer._fd is None
    assert list(spool.ids("incoming")) == [env.queue_id]
    assert list((spool.root / "tmp").iterdir()) == []
    spool.close()
