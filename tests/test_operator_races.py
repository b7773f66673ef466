"""Races and surprises during an in-flight delivery: the operator wins, bugs do not loop."""

from __future__ import annotations

import asyncio
from typing import Any

from conftest import MESSAGE, Upstream, wait_until


async def _held_during_attempt(upstream: Upstream, make_relay: Any, reply: str | None) -> Any:
    upstream.state.data_gate = asyncio.Event()
    upstream.state.data_reply = reply
    relay_cm = make_relay(upstream)
    relay = await relay_cm.__aenter__()
    try:
        await relay.asend("a@example.org", ["b@dest.test"], MESSAGE)
        await asyncio.wait_for(upstream.state.at_data_end.wait(), 10)
        spool = relay.relay.spool
        (queue_id,) = list(spool.ids("incoming"))
        assert spool.move(queue_id, "incoming", "hold")  # `pyrelay queue hold ID`
        upstream.state.data_gate.set()
        await wait_until(lambda: relay.relay.scheduler.arrivals == {}, what="attempt recorded")
        await asyncio.sleep(0.3)
        return spool, queue_id
    finally:
        await relay_cm.__aexit__(None, None, None)


async def test_hold_during_a_deferred_attempt_keeps_only_the_held_copy(
    upstream: Upstream, make_relay: Any
) -> None:
    spool, queue_id = await _held_during_attempt(upstream, make_relay, "451 4.3.0 try later")
    assert list(spool.ids("deferred")) == [] and list(spool.ids("incoming")) == []
    env, _ = spool.read("hold", queue_id)
    assert env.attempts == 1 and "451" in env.last_error


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
