"""kill -9 between every two steps of every queue transition (accept, claim, defer, remove).

The relay runs with ``PYRELAY_CRASH_AT=<point>``, which SIGKILLs it exactly there (see
``pyrelay.spool.crash_point``); a second relay then starts on the same spool.  Afterwards every
message the client got ``250`` for is delivered exactly once, nothing is left in any state, and
the message is never in two states at once (the recovery finds it in one directory).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from procs import RelayProc, SinkProc, free_port, relay_env, send_one

STATE_DIRS = ("tmp", "incoming", "active", "deferred", "hold", "corrupt")

# (point, defer first): with "defer first" the upstream answers 451 until the crash, so the
# deferral path runs; afterwards it accepts.
POINTS = [
    ("accept-before-link", False),
    ("accept-after-link", False),
    ("accept-after-dirsync", False),
    # move-incoming-active: gone from this path.  A message this process delivers at once is
    # accepted straight into active/ (accept-* above); the incoming -> active claim runs only
    # for a backlog past the scheduler's FRESH_LIMIT, through the same Spool.move as
    # move-deferred-active below.
    ("remove-after-unlink", False),
    ("defer-after-status", True),
    ("defer-after-utime", True),
    ("defer-after-rename", True),
    ("move-deferred-active", True),
]


def _wait(pred: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def _entries(spool: Path) -> dict[str, list[str]]:
    return {d: sorted(os.listdir(spool / d)) for d in STATE_DIRS if (spool / d).is_dir()}


@pytest.mark.parametrize(("point", "defer_first"), POINTS)
def test_crash_at_every_transition_step_loses_and_duplicates_nothing(
    tmp_path: Path, point: str, defer_first: bool
) -> None:
    sink = SinkProc(tmp_path)
    spool = tmp_path / "spool"
    port = free_port()
    env = relay_env(relay_port=port, sink_port=sink.port, spool=spool, PYRELAY_WORKERS="1")
    first = None
    try:
        sink.set_defer(defer_first)
        first = RelayProc({**env, "PYRELAY_CRASH_AT": point}).start()
        first.wait_started()
        results = []
        for i in range(3):
            if not first.alive():
                break
            results.append(send_one(port, f"{point}-{i}"))
        assert _wait(lambda: not first.alive(), 15), f"the relay never reached {point}"
        assert first.wait(5) == -9
        accepted = {r.test_id for r in results if r.accepted}
        # Exactly one state per entry at the moment of the crash.
        seen: dict[str, str] = {}
        for state, names in _entries(spool).items():
            if state == "tmp":
                continue
            for name in names:
                assert name not in seen, f"{name} in {seen[name]}/ and {state}/"
                seen[name] = state

        sink.set_defer(False)
        second = RelayProc(env).start()
        try:
            second.wait_started()
            assert _wait(lambda: accepted <= {d.test_id for d in sink.deliveries()}, 15), (
                accepted,
                sink.deliveries(),
            )
            queued = ("incoming", "active", "deferred")
            assert _wait(lambda: all(not _entries(spool)[d] for d in queued), 10), _entries(spool)
            time.sleep(0.5)  # a duplicate would show up here
        finally:
            second.terminate()
            second.wait(10)
        delivered = [d.test_id for d in sink.deliveries()]
        # Every accepted message exactly once; an unacknowledged one (the crash came before
        # the client heard 250) at most once.
        assert len(delivered) == len(set(delivered)), delivered
        assert accepted <= set(delivered)
        leftovers = _entries(spool)
        assert all(not leftovers[d] for d in ("tmp", "incoming", "active", "deferred", "hold"))
        assert leftovers["corrupt"] == []
        assert os.listdir(spool / "status") == [], "status files of finished entries remain"
        print(f"\n{point}: accepted={len(accepted)} delivered={len(delivered)} dup=0 lost=0")
    finally:
        if first is not None and first.alive():  # it never reached the point: no orphan
            first.kill()
        sink.stop()
