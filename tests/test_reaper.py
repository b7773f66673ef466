"""Finished entries leave the queue off the event loop, in batches (pyrelay.reaper), and log
lines of one loop pass go out in one write (pyrelay.logging.CoalescedStream)."""

from __future__ import annotations

import asyncio
import errno
import io
import threading
from pathlib import Path
from typing import Any

import pytest

from conftest import LogCapture, wait_until
from pyrelay.logging import CoalescedStream
from pyrelay.reaper import Reaper
from pyrelay.spool import Envelope, Spool


async def _queued(spool: Spool, count: int) -> list[str]:
    ids = []
    for n in range(count):
        queue_id = f"{n + 1:015X}0"
        env = Envelope(
            queue_id=queue_id,
            sender="a@example.org",
            recipients=["b@dest.test"],
            arrival=1_800_000_000.0,
            client="127.0.0.1",
        )
        await spool.store(env, [b"Subject: x\r\n\r\nhi\r\n"])
        assert spool.claim(queue_id, "incoming")
        spool.write_status(env, sync_dir=False)
        ids.append(queue_id)
    return ids


def _counting(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the reaper's thread jobs and check none of its unlinks runs on the loop's thread."""
    jobs: list[int] = []
    loop_thread = threading.get_ident()
    real_submit = spool.executor.submit

    def submit(fn: Any, *args: Any, **kwargs: Any) -> Any:
        jobs.append(len(args[0]) if args and isinstance(args[0], list) else 0)
        return real_submit(fn, *args, **kwargs)

    real_remove = spool.remove

    def remove(queue_id: str, state: str) -> None:
        assert threading.get_ident() != loop_thread, "an unlink on the event loop"
        real_remove(queue_id, state)

    monkeypatch.setattr(spool.executor, "submit", submit)
    monkeypatch.setattr(spool, "remove", remove)
    return jobs


async def test_finished_entries_are_removed_in_batches_off_the_loop(
    tmp_path: Path, logs: LogCapture, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path / "spool")
    spool.prepare()
    ids = await _queued(spool, 50)
    jobs = _counting(spool, monkeypatch)
    reaper = Reaper(spool, max_wait=lambda: 60.0)
    for queue_id in ids:
        reaper.remove(queue_id)  # what 50 agents finishing in one loop pass do
    await reaper.wait()
    assert list(spool.ids("active")) == []
    assert not any((spool.root / "status" / q).exists() for q in ids)
    # One job for the first entry, one for the 49 that came while it ran: not 50.
    assert len(jobs) <= 2, jobs
    await asyncio.sleep(0)
    assert sum(1 for line in logs.lines() if "event=removed" in line) == 50
    spool.close()


async def test_finishing_waits_when_the_unlinks_fall_behind(
    tmp_path: Path, logs: LogCapture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk slower than the upstream must not grow the backlog of delivered entries still in
    active/ (each one re-delivered after a crash; 0.1 of this change ran out of descriptors at
    17 000): past BACKLOG, room() waits until a batch has removed some."""
    monkeypatch.setattr("pyrelay.reaper.BACKLOG", 8)
    spool = Spool(tmp_path / "spool")
    spool.prepare()
    ids = await _queued(spool, 30)
    gate = threading.Event()
    real_remove = spool.remove

    def slow(queue_id: str, state: str) -> None:
        gate.wait(10)
        real_remove(queue_id, state)

    monkeypatch.setattr(spool, "remove", slow)
    reaper = Reaper(spool, max_wait=lambda: 60.0)
    for queue_id in ids[:8]:
        reaper.remove(queue_id)
    assert reaper.backlog == 8
    room = asyncio.ensure_future(reaper.room())
    await asyncio.sleep(0.1)
    assert not room.done()  # the ninth delivery to finish waits
    gate.set()
    await asyncio.wait_for(room, 5)
    await reaper.wait()
    assert sorted(spool.ids("active")) == sorted(ids[8:])
    spool.close()


async def test_a_refused_unlink_is_retried_and_reported_once(
    tmp_path: Path, logs: LogCapture, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path / "spool")
    spool.prepare()
    (queue_id,) = await _queued(spool, 1)
    real_remove = spool.remove
    failures = [3]

    def flaky(qid: str, state: str) -> None:
        if failures[0]:
            failures[0] -= 1
            raise OSError(errno.EROFS, "Read-only file system")
        real_remove(qid, state)

    monkeypatch.setattr(spool, "remove", flaky)
    monkeypatch.setattr("pyrelay.reaper.FIRST_RETRY", 0.05)
    reaper = Reaper(spool, max_wait=lambda: 0.2)
    reaper.remove(queue_id)
    await wait_until(lambda: not spool.path("active", queue_id).exists(), 5, "unlinked at last")
    await wait_until(lambda: logs.has("event=removed", queue_id), 5, "removed logged")
    errors = [line for line in logs.lines() if "queue_file_remove_failed" in line]
    assert len(errors) == 1 and "Read-only file system" in errors[0]
    spool.close()


async def test_shutdown_waits_for_the_last_batch(tmp_path: Path, logs: LogCapture) -> None:
    spool = Spool(tmp_path / "spool")
    spool.prepare()
    ids = await _queued(spool, 20)
    reaper = Reaper(spool, max_wait=lambda: 60.0)
    for queue_id in ids:
        reaper.remove(queue_id, "deleted by the operator during its delivery")
    await reaper.wait()
    spool.close()  # what the relay does next at shutdown
    assert list(spool.ids("active")) == []
    assert logs.has("event=removed", "reason=", "deleted by the operator")


async def test_log_lines_of_one_loop_pass_go_out_in_one_write() -> None:
    writes: list[str] = []

    class Sink(io.StringIO):
        def write(self, text: str) -> int:
            writes.append(text)
            return len(text)

    stream = CoalescedStream(Sink())
    for i in range(100):
        print(f"line {i}", file=stream, flush=True)  # what a print(..., flush=True) logger does
    assert writes == []  # nothing until the pass ends
    await asyncio.sleep(0)
    assert len(writes) == 1 and writes[0].count("\n") == 100
    assert writes[0].startswith("line 0\n") and writes[0].endswith("line 99\n")


def test_log_lines_outside_a_loop_are_written_at_once() -> None:
    out = io.StringIO()
    stream = CoalescedStream(out)
    print("starting", file=stream, flush=True)
    assert out.getvalue() == "starting\n"


async def test_a_line_from_another_thread_follows_the_buffered_ones() -> None:
    out = io.StringIO()
    stream = CoalescedStream(out)
    print("first", file=stream, flush=True)
    await asyncio.to_thread(lambda: print("second", file=stream, flush=True))
    await asyncio.sleep(0)
    assert out.getvalue() == "first\nsecond\n"


async def test_no_line_is_lost_when_other_threads_write_at_the_same_time() -> None:
    out = io.StringIO()
    stream = CoalescedStream(out)

    def other(n: int) -> None:
        for i in range(2000):
            stream.write(f"thread {n} {i}\n")

    writers = [asyncio.to_thread(other, n) for n in range(3)]
    pending = asyncio.gather(*writers)
    for i in range(6000):
        stream.write(f"loop {i}\n")
        if i % 100 == 0:
            await asyncio.sleep(0)
    await pending
    await asyncio.sleep(0)
    assert len(out.getvalue().splitlines()) == 6000 + 3 * 2000
