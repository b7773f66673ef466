"""Pure logic of the queue: the entry format, queue IDs, and the retry schedule."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyrelay.scheduler import retry_delay
from pyrelay.spool import (
    CorruptEntry,
    Envelope,
    Spool,
    _DirSync,
    encode_header,
    new_queue_id,
    parse_entry,
    worker_of,
)


def _env(queue_id: str = "0123456789ABCDE0", size: int = 0) -> Envelope:
    return Envelope(
        queue_id=queue_id,
        sender="a@example.org",
        recipients=["b@dest.test", "c@dest.test"],
        arrival=1_800_000_000.5,
        size=size,
        client="172.18.0.5",
        attempts=2,
        next_attempt=1_800_000_600.0,
        last_error="451 4.3.0 later",
        delivered=["d@dest.test"],
    )


@given(st.binary(max_size=2000))
@settings(max_examples=200, deadline=None)
def test_entry_round_trips_any_message_bytes(message: bytes) -> None:
    env = _env(size=len(message))
    raw = encode_header(env) + message
    parsed, offset = parse_entry(raw, "deferred", env.queue_id)
    assert raw[offset:] == message
    assert parsed.recipients == env.recipients and parsed.delivered == env.delivered
    assert (parsed.arrival, parsed.next_attempt, parsed.attempts) == (
        env.arrival,
        env.next_attempt,
        env.attempts,
    )
    assert parsed.state == "deferred"


@pytest.mark.parametrize(
    "damage",
    [
        lambda raw: raw[:-1],  # truncated message
        lambda raw: raw + b"x",  # trailing garbage
        lambda raw: raw[:20],  # truncated envelope
        lambda raw: b"XXXX" + raw[4:],  # bad magic
        lambda raw: raw.replace(b'"attempts":2', b'"attempts":"2"'),  # wrong type
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


async def test_store_read_move_remove(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", worker=1)
    spool.prepare()
    env = Envelope(queue_id=spool.new_id(), sender="", recipients=["x@dest.test"], arrival=1.0)
    await spool.store(env, [b"Subject: a\r\n\r\n", memoryview(b"body\r\n")])
    assert worker_of(env.queue_id) == 1
    got, message = spool.read("incoming", env.queue_id)
    assert message == b"Subject: a\r\n\r\nbody\r\n" and got.size == len(message)
    assert spool.move(env.queue_id, "incoming", "hold")
    assert spool.find(env.queue_id) == "hold"
    assert not spool.move(env.queue_id, "incoming", "hold")
    env.state = "hold"
    spool.remove(env)
    assert spool.find(env.queue_id) is None
    assert list((tmp_path / "spool" / "tmp").iterdir()) == []
    spool.close()


async def test_store_never_overwrites_a_queued_entry(tmp_path: Path) -> None:
    from pyrelay.errors import SpoolWriteError

    spool = Spool(tmp_path / "spool")
    spool.prepare()
    first = Envelope(queue_id=spool.new_id(), sender="", recipients=["x@dest.test"], arrival=1.0)
    await spool.store(first, [b"first\r\n"])
    clash = Envelope(queue_id=first.queue_id, sender="", recipients=["y@dest.test"], arrival=2.0)
    with pytest.raises(SpoolWriteError):
        await spool.store(clash, [b"second\r\n"])
    env, message = spool.read("incoming", first.queue_id)
    assert message == b"first\r\n" and env.recipients == ["x@dest.test"]
    assert list((tmp_path / "spool" / "tmp").iterdir()) == []
    spool.close()
