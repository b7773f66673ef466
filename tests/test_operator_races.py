"""Races and surprises during an in-flight delivery: the operator wins, bugs do not loop."""

from __future__ import annotations

import asyncio
from typing import Any

from conftest import MESSAGE, Upstream, wait_until
from pyrelay.queue_commands import _delete, _hold, _release


async def _during_attempt(
    upstream: Upstream, make_relay: Any, reply: str | None, action: Any = _hold
) -> Any:
    upstream.state.data_gate = asyncio.Event()
    upstream.state.data_reply = reply
    relay_cm = make_relay(upstream)
    relay = await relay_cm.__aenter__()
    try:
        await relay.asend("a@example.org", ["b@dest.test"], MESSAGE)
        await asyncio.wait_for(upstream.state.at_data_end.wait(), 10)
        spool = relay.relay.spool
        # What is being delivered is visible on disk.
        (queue_id,) = list(spool.ids("active"))
        assert list(spool.ids("incoming")) == []
        assert action(spool, queue_id, "active")  # `pyrelay queue hold|delete ID`
        upstream.state.data_gate.set()
        await wait_until(lambda: not list(spool.ids("active")), what="attempt recorded")
        await asyncio.sleep(0.3)
        return spool, queue_id
    finally:
        await relay_cm.__aexit__(None, None, None)


_held_during_attempt = _during_attempt


async def test_hold_during_a_deferred_attempt_keeps_only_the_held_copy(
    upstream: Upstream, make_relay: Any
) -> None:
    spool, queue_id = await _held_during_attempt(upstream, make_relay, "451 4.3.0 try later")
    assert list(spool.ids("deferred")) == [] and list(spool.ids("incoming")) == []
    env = spool.read_envelope("hold", queue_id)
    assert env.attempts == 1 and "451" in env.last_error
    assert not (spool.root / "requests" / queue_id).exists()


async def test_delete_during_a_deferred_attempt_removes_it_when_the_attempt_ends(
    upstream: Upstream, make_relay: Any
) -> None:
    spool, queue_id = await _during_attempt(upstream, make_relay, "451 4.3.0 later", _delete)
    assert spool.find(queue_id) is None
    assert not (spool.root / "status" / queue_id).exists()
    assert not (spool.root / "requests" / queue_id).exists()


async def test_delete_before_the_attempt_begins_is_never_delivered(
    upstream: Upstream, make_relay: Any
) -> None:
    """A delete that returned success before the attempt claimed the entry wins: the claim
    (a rename) fails, or the pending request is honoured right after it."""
    upstream.state.data_reply = "451 4.3.0 later"
    async with make_relay(upstream, min_backoff="0.5s", max_backoff="0.5s") as relay:
        await relay.asend("a@example.org", ["b@dest.test"], MESSAGE)
        spool = relay.relay.spool
        await wait_until(lambda: bool(list(spool.ids("deferred"))), what="deferral")
        (queue_id,) = list(spool.ids("deferred"))
        upstream.state.data_reply = None
        state = spool.find(queue_id)
        assert state is not None and _delete(spool, queue_id, state)
        await asyncio.sleep(1.5)  # well past its retry time
        assert upstream.state.messages == []
        assert spool.find(queue_id) is None


async def test_release_schedules_the_held_message(upstream: Upstream, make_relay: Any) -> None:
    upstream.state.data_reply = "451 4.3.0 later"
    async with make_relay(upstream, min_backoff="60s", max_backoff="60s") as relay:
        await relay.asend("a@example.org", ["b@dest.test"], MESSAGE)
        spool = relay.relay.spool
        await wait_until(lambda: bool(list(spool.ids("deferred"))), what="deferral")
        (queue_id,) = list(spool.ids("deferred"))
        assert _hold(spool, queue_id, "deferred")
        upstream.state.data_reply = None
        assert _release(spool, queue_id, "hold")
        relay.relay.scheduler.scan_now()  # what SIGUSR2 from `pyrelay queue release` does
        await wait_until(lambda: len(upstream.state.messages) == 1, what="released delivery")


async def test_hold_during_a_successful_attempt_leaves_nothing_to_release(
    upstream: Upstream, make_relay: Any
) -> None:
    spool, queue_id = await _held_during_attempt(upstream, make_relay, None)
    assert len(upstream.state.messages) == 1
    assert spool.find(queue_id) is None


async def test_an_internal_error_is_a_counted_deferral_not_a_retry_loop(
    upstream: Upstream, make_relay: Any, logs: Any
) -> None:
    async with make_relay(upstream) as relay:
        upstream_client = relay.relay.scheduler.upstream
        real = upstream_client.transaction
        calls = 0

        async def crash_once(*args: Any, **kwargs: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise RuntimeError("injected bug")
            return await real(*args, **kwargs)

        upstream_client.transaction = crash_once
        await relay.asend("a@example.org", ["b@dest.test"], MESSAGE)
        await wait_until(lambda: len(upstream.state.messages) == 1, what="delivery after the bug")
    assert logs.has("event=delivery_crashed")
    assert logs.has("event=deferred", "internal error during delivery (RuntimeError)")
    assert calls == 2


async def test_flush_retries_the_whole_queue_even_beyond_the_active_set(
    upstream: Upstream, make_relay: Any, monkeypatch: Any
) -> None:
    """A flush makes every deferred entry due, also those that do not fit in the active set of
    the first scan (Postfix's qmgr takes them in as room frees up)."""
    from pyrelay import scheduler

    monkeypatch.setattr(scheduler, "ACTIVE_LIMIT", 4)
    upstream.state.data_reply = "451 4.3.0 later"
    async with make_relay(upstream, min_backoff="60s", max_backoff="60s") as relay:
        for i in range(12):
            await relay.asend("a@example.org", [f"r{i}@dest.test"], MESSAGE)
        spool = relay.relay.spool
        await wait_until(lambda: len(list(spool.ids("deferred"))) == 12, what="12 deferred")
        upstream.state.data_reply = None
        relay.relay.scheduler.flush()
        await wait_until(lambda: len(upstream.state.messages) == 12, 10, "every one delivered")


async def test_a_flush_during_a_queue_scan_is_not_lost(
    upstream: Upstream, make_relay: Any, monkeypatch: Any
) -> None:
    """`queue flush` while the queue runner is scanning (a scan of 100 000 entries takes a
    second): the scan in progress did not see the flush, and must not end it either."""
    import threading

    upstream.state.data_reply = "451 4.3.0 later"
    async with make_relay(upstream, min_backoff="600s", max_backoff="600s") as relay:
        for i in range(3):
            await relay.asend("a@example.org", [f"r{i}@dest.test"], MESSAGE)
        spool = relay.relay.spool
        scheduler = relay.relay.scheduler
        await wait_until(lambda: len(list(spool.ids("deferred"))) == 3, what="3 deferred")
        upstream.state.data_reply = None
        in_scan, release = threading.Event(), threading.Event()
        real_due = spool.due

        def slow_due(*args: Any, **kwargs: Any) -> Any:
            if not in_scan.is_set():
                in_scan.set()
                release.wait(10)  # the scan is under way, the flush lands now
            return real_due(*args, **kwargs)

        monkeypatch.setattr(spool, "due", slow_due)
        scheduler.scan_now()
        await asyncio.to_thread(in_scan.wait, 10)
        scheduler.flush()
        release.set()
        await wait_until(lambda: len(upstream.state.messages) == 3, 10, "flushed and delivered")
