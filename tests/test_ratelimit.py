"""Per-route rates: the shared token bucket with AIMD (unit), and two worker processes that
together still send at the route's rate (real subprocess relay)."""

from __future__ import annotations

import asyncio
import smtplib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from procs import RelayProc, relay_env

from conftest import MESSAGE, free_port, wait_until
from pyrelay import ratelimit
from pyrelay.ratelimit import RateLimiter, is_throttling
from pyrelay.spool import worker_of

pytestmark = pytest.mark.timeout(60)


def test_throttling_replies_are_recognised() -> None:
    yes = [
        "host x said: 454 4.7.0 Throttling failure: Maximum sending rate exceeded.",
        "host x said: 421 4.7.0 Rate limit exceeded, try again later",
        "host x said: 451 Too many messages, slow down",
        "host x said: 421 4.7.28 ratelimited",
    ]
    no = [
        "host x said: 451 4.3.0 Temporary local problem",
        "host x said: 550 5.7.1 Throttling is not the problem here",
        "connect to x: Connection refused",
    ]
    assert all(is_throttling(t) for t in yes[:3])
    assert not any(is_throttling(t) for t in no)


def test_bucket_paces_halves_and_climbs_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [1000.0]
    monkeypatch.setattr(ratelimit.time, "time", lambda: now[0])
    lim = RateLimiter(tmp_path)
    waits = [lim.reserve("r", 10.0).wait for _ in range(4)]
    assert waits == pytest.approx([0.0, 0.1, 0.2, 0.3])
    # Reservations further than MAX_WAIT are not made: the message waits in the queue.
    far = [lim.reserve("r", 10.0) for _ in range(60)]
    assert not far[-1].taken and far[-1].wait > ratelimit.MAX_WAIT
    now[0] += 10
    assert lim.throttled("r", 10.0) == pytest.approx(5.0)
    assert lim.throttled("r", 10.0) == pytest.approx(5.0)  # replies already in flight
    now[0] += ratelimit.DECREASE_GAP
    assert lim.throttled("r", 10.0) == pytest.approx(2.5)
    now[0] += ratelimit.HOLD
    assert lim.current("r", 10.0) == pytest.approx(2.5)
    now[0] += 5
    assert lim.current("r", 10.0) == pytest.approx(7.5)
    now[0] += 100
    assert lim.current("r", 10.0) == pytest.approx(10.0)
    # Another process (another open file) sees the same state.
    other = RateLimiter(tmp_path)
    lim.throttled("r", 10.0)
    assert other.current("r", 10.0) == pytest.approx(5.0)
    lim.close()
    other.close()


def _send(port: int, i: int) -> str:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        smtp.ehlo()
        smtp.mail("app@example.org")
        smtp.rcpt(f"r{i}@dest.test")
        code, reply = smtp.data(MESSAGE)
        assert code == 250, reply
        return reply.decode().rsplit(" ", 1)[1]


async def test_two_workers_together_send_at_the_route_rate(
    make_upstream: Callable[..., Any], tmp_path: Path
) -> None:
    up = await make_upstream(tls=False, auth=False)
    times: list[float] = []

    routes = tmp_path / "routes.toml"
    routes.write_text(
        f'[[route]]\nsenders = ["example.org"]\nrelayhost = "[127.0.0.1]:{up.port}"\n'
        'tls_level = "none"\nrate = "2/s"\n'
    )
    port = free_port()
    relay = RelayProc(
        relay_env(
            relay_port=port,
            sink_port=up.port,
            spool=tmp_path / "spool",
            PYRELAY_WORKERS="2",
            PYRELAY_ROUTES_FILE=str(routes),
        )
    ).start()
    try:
        # Both processes listening, or the kernel may give every connection to the first.
        await asyncio.to_thread(relay.wait_started, processes=2)

        def send_all() -> list[str]:
            with ThreadPoolExecutor(10) as pool:
                return list(pool.map(lambda i: _send(port, i), range(10)))

        ids = await asyncio.to_thread(send_all)
        start = time.monotonic()

        def record() -> bool:
            while len(times) < len(up.state.messages):
                times.append(time.monotonic())
            return len(up.state.messages) == 10

        await wait_until(record, timeout=30, what="10 deliveries")
    finally:
        relay.terminate()
        await asyncio.to_thread(relay.wait, 10)
    assert {worker_of(q) for q in ids} == {0, 1}, ids  # both processes took messages
    # One bucket for both: 10 messages at 2/s span 4.5 s (two per-process buckets: ~2 s).
    assert times[-1] - start >= 4.0, [round(t - start, 2) for t in times]
    assert (tmp_path / "spool" / "ratelimit" / "example.org.bucket").exists()  # noqa: ASYNC240
