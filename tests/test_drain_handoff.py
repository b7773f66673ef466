"""Issue 14: ``pyrelay drain``, ``pyrelay queue handoff --to`` and ``PYRELAY_HANDOFF_TO``, with
real relays as subprocesses, and the simulated rolling restart of two relays behind a
"Service" (clients that send to whichever relay accepts)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from procs import REPO, RelayProc, SendResult, SinkProc, free_port, relay_env, send_one

PENDING = ("incoming", "active", "deferred")


def pending(spool: Path) -> list[str]:
    return [name for state in PENDING for name in os.listdir(spool / state)]


def cli(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pyrelay", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start(env: dict[str, str]) -> RelayProc:
    relay = RelayProc(env).start()
    relay.wait_started()
    return relay


def wait_for(pred: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def sink(tmp_path: Path) -> object:
    s = SinkProc(tmp_path / "sink")
    yield s
    s.stop()


def test_drain_delivers_the_queue_and_exits_0(tmp_path: Path, sink: SinkProc) -> None:
    port = free_port()
    env = relay_env(
        relay_port=port, sink_port=sink.port, spool=tmp_path / "spool", PYRELAY_DRAIN_GRACE="0.3s"
    )
    relay = start(env)
    try:
        sent = [send_one(port, f"d{i}") for i in range(10)]
        assert all(r.accepted for r in sent)
        done = cli(env, "drain", "--timeout", "20")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "empty queue" in done.stdout
        assert relay.wait(10) == 0
        assert relay.named("drain_finished")[0]["pending"] == 0
    finally:
        relay.kill()
    assert sorted(d.test_id for d in sink.deliveries()) == sorted(f"d{i}" for i in range(10))
    assert pending(tmp_path / "spool") == []


def test_drain_without_a_running_relay_fails(tmp_path: Path) -> None:
    env = relay_env(relay_port=free_port(), sink_port=free_port(), spool=tmp_path / "spool")
    (tmp_path / "spool").mkdir()
    done = cli(env, "drain", "--timeout", "1")
    assert done.returncode == 1
    assert "not running" in done.stderr


def test_drain_timeout_with_upstream_down_hands_everything_off(
    tmp_path: Path, sink: SinkProc
) -> None:
    """The first relay's upstream is down: at the drain's timeout every entry goes to the peer,
    which delivers it; nothing is left in the first spool."""
    peer_port, first_port = free_port(), free_port()
    peer_env = relay_env(relay_port=peer_port, sink_port=sink.port, spool=tmp_path / "peer")
    first_env = relay_env(
        relay_port=first_port,
        sink_port=free_port(),  # nothing listens there: connection refused
        spool=tmp_path / "first",
        PYRELAY_DRAIN_GRACE="0.2s",
        PYRELAY_HANDOFF_TO=f"127.0.0.1:{peer_port}",
    )
    peer, first = start(peer_env), start(first_env)
    try:
        sent = [send_one(first_port, f"h{i}", size=3000 * i) for i in range(12)]
        assert all(r.accepted for r in sent)
        wait_for(lambda: len(first.named("deferred")) >= 12, 15, "deferrals")
        t0 = time.monotonic()
        done = cli(first_env, "drain", "--timeout", "1.5")
        elapsed = time.monotonic() - t0
        assert done.returncode == 0, done.stdout + done.stderr
        assert first.wait(10) == 0
        assert pending(tmp_path / "first") == []
        assert elapsed < 15
        handed = first.named("handed_off")
        assert len(handed) == 12
        assert all(e["to"] == f"127.0.0.1:{peer_port}" for e in handed)
        wait_for(lambda: len(sink.deliveries()) >= 12, 15, "deliveries by the peer")
    finally:
        first.kill()
        peer.terminate()
        peer.wait(10)
    got = sink.deliveries()
    assert sorted(d.test_id for d in got) == sorted(f"h{i}" for i in range(12))
    # The first relay's Received: is kept; the peer adds its own.
    assert all(d.hops == 2 for d in got)


def test_queue_handoff_command(tmp_path: Path, sink: SinkProc) -> None:
    """``queue handoff --to`` with the relay stopped: a dead peer leaves every entry queued
    (exit 1); a live one takes them all (exit 0), leftovers in active/ included."""
    peer_port, first_port = free_port(), free_port()
    first_env = relay_env(relay_port=first_port, sink_port=free_port(), spool=tmp_path / "first")
    first = start(first_env)
    try:
        assert all(send_one(first_port, f"q{i}").accepted for i in range(6))
        wait_for(lambda: len(first.named("deferred")) >= 6, 15, "deferrals")
    finally:
        first.terminate()
        assert first.wait(10) == 0
    spool = tmp_path / "first"
    # A leftover of a crashed run in active/.
    moved = sorted(os.listdir(spool / "deferred"))[0]
    os.rename(spool / "deferred" / moved, spool / "active" / moved)

    failed = cli(first_env, "queue", "handoff", "--to", f"127.0.0.1:{free_port()}")
    assert failed.returncode == 1
    assert len(pending(spool)) == 6
    # Nothing claimed stays claimed: failed entries went back (the leftover is where it was).
    assert os.listdir(spool / "active") == [moved]

    peer = start(relay_env(relay_port=peer_port, sink_port=sink.port, spool=tmp_path / "peer"))
    try:
        done = cli(first_env, "queue", "handoff", "--to", f"127.0.0.1:{peer_port}", "--json")
        assert done.returncode == 0, done.stdout + done.stderr
        assert '"handed_off": 6' in done.stdout
        assert pending(spool) == []
        wait_for(lambda: len(sink.deliveries()) >= 6, 15, "deliveries by the peer")
    finally:
        peer.terminate()
        peer.wait(10)
    assert sorted(d.test_id for d in sink.deliveries()) == sorted(f"q{i}" for i in range(6))


def test_handoff_sends_the_envelope_as_queued(tmp_path: Path, sink: SinkProc) -> None:
    """Only the recipients still pending go to the peer; the sender as queued (masqueraded
    once, by the first relay); the message bytes as spooled."""
    import json
    import smtplib

    from procs import make_message

    first_port, peer_port = free_port(), free_port()
    first_env = relay_env(
        relay_port=first_port,
        sink_port=free_port(),
        spool=tmp_path / "first",
        MASQUERADED_DOMAINS="example.org",
    )
    first = start(first_env)
    try:
        with smtplib.SMTP("127.0.0.1", first_port, timeout=10) as smtp:
            smtp.sendmail(
                "app@mail.example.org",
                ["a@dest.test", "b@dest.test", "c@dest.test"],
                make_message("env1"),
            )
        wait_for(lambda: len(first.named("deferred")) >= 3, 15, "deferrals")
    finally:
        first.terminate()
        assert first.wait(10) == 0
    spool = tmp_path / "first"
    # Stopped between two attempts, or during one (then the entry stays in active/).
    (queue_id,) = os.listdir(spool / "deferred") + os.listdir(spool / "active")
    if (spool / "active" / queue_id).exists():
        os.rename(spool / "active" / queue_id, spool / "deferred" / queue_id)
    # As if b@ had been delivered by an earlier attempt.
    status = json.loads((spool / "status" / queue_id).read_text())
    status["recipients"] = ["a@dest.test", "c@dest.test"]
    status["delivered"] = ["b@dest.test"]
    (spool / "status" / queue_id).write_text(json.dumps(status))
    spooled = (spool / "deferred" / queue_id).read_bytes()

    peer = start(relay_env(relay_port=peer_port, sink_port=sink.port, spool=tmp_path / "peer"))
    try:
        done = cli(first_env, "queue", "handoff", "--to", f"127.0.0.1:{peer_port}")
        assert done.returncode == 0, done.stdout + done.stderr
        wait_for(lambda: len(sink.deliveries()) >= 1, 15, "delivery by the peer")
    finally:
        peer.terminate()
        peer.wait(10)
    (got,) = sink.deliveries()
    assert got.sender == "app@example.org"
    assert sorted(got.rcpts) == ["a@dest.test", "c@dest.test"]
    assert got.hops == 2
    # What the peer passed on is the bytes the first relay spooled plus its own Received:
    # header (nothing rewritten a second time: same length otherwise).
    body = spooled.split(b"\n", 2)[2]
    assert body.startswith(b"Received: from ")
    assert 50 < got.size - len(body) < 400
    assert first.named("queued")[0]["queue_id"] == queue_id


# -- the simulated rolling restart ---------------------------------------------------------------


@dataclass
class LoadGen:
    """Clients behind a "Service": each message goes to a random relay; a refused connection,
    a ``421`` or a dropped session before the final reply makes the client retry on another."""

    ports: list[int]
    clients: int = 6
    stop: threading.Event = field(default_factory=threading.Event)
    accepted: dict[str, SendResult] = field(default_factory=dict)
    tries: Counter[str] = field(default_factory=Counter)
    sent: int = 0
    gaps: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self) -> list[threading.Thread]:
        threads = [
            threading.Thread(target=self._client, args=(i,), daemon=True)
            for i in range(self.clients)
        ]
        for t in threads:
            t.start()
        return threads

    def _client(self, index: int) -> None:
        rng = random.Random(index)
        n = 0
        while not self.stop.is_set():
            test_id = f"c{index}-{n}"
            n += 1
            with self.lock:
                self.sent += 1
            first_try = time.monotonic()
            while True:
                port = rng.choice(self.ports)
                res = send_one(port, test_id, timeout=10)
                with self.lock:
                    self.tries[test_id] += 1
                if res.accepted:
                    with self.lock:
                        self.accepted[test_id] = res
                        self.gaps.append(time.monotonic() - first_try)
                    break
                if res.code is not None and res.code != 421 and res.stage != "connect":
                    with self.lock:
                        self.failures.append(f"{test_id}: {res.code} {res.text} {res.error}")
                    break
                if time.monotonic() - first_try > 30:
                    with self.lock:
                        self.failures.append(f"{test_id}: gave up: {res.error}")
                    break
                time.sleep(0.02)
            time.sleep(0.01)


def test_rolling_restart_loses_nothing(tmp_path: Path) -> None:
    """Two relays, one upstream slower than the load: drain A mid-load with hand-off to B,
    restart A, then drain B with hand-off to A.  Every accepted message reaches the upstream;
    duplicates only in the documented window (counted)."""
    sink = SinkProc(tmp_path / "sink", delay=(0.05, 0.15))
    pa, pb = free_port(), free_port()
    common = {"PYRELAY_DRAIN_GRACE": "0.5s", "PYRELAY_CONCURRENCY": "2"}
    env_a = relay_env(
        relay_port=pa,
        sink_port=sink.port,
        spool=tmp_path / "a",
        PYRELAY_HANDOFF_TO=f"127.0.0.1:{pb}",
        **common,
    )
    env_b = relay_env(
        relay_port=pb,
        sink_port=sink.port,
        spool=tmp_path / "b",
        PYRELAY_HANDOFF_TO=f"127.0.0.1:{pa}",
        **common,
    )
    a, b = start(env_a), start(env_b)
    relays = [a, b]
    load = LoadGen([pa, pb])
    threads = load.run()
    handed = 0
    try:
        time.sleep(2.0)
        t0 = time.monotonic()
        done = cli(env_a, "drain", "--timeout", "1")
        assert done.returncode == 0, done.stdout + done.stderr
        assert a.wait(10) == 0
        drain_a = time.monotonic() - t0
        assert pending(tmp_path / "a") == []
        handed += len(a.named("handed_off"))
        a = start(env_a)  # the new pod, same volume
        relays.append(a)
        time.sleep(1.5)
        done = cli(env_b, "drain", "--timeout", "1")
        assert done.returncode == 0, done.stdout + done.stderr
        assert b.wait(10) == 0
        assert pending(tmp_path / "b") == []
        handed += len(b.named("handed_off"))
        b = start(env_b)
        relays.append(b)
        time.sleep(1.0)
        load.stop.set()
        for t in threads:
            t.join(40)
        # The rest drains normally.
        for relay, env, spool in ((a, env_a, "a"), (b, env_b, "b")):
            done = cli(env, "drain", "--timeout", "20")
            assert done.returncode == 0, done.stdout + done.stderr
            assert relay.wait(10) == 0
            assert pending(tmp_path / spool) == []
    finally:
        load.stop.set()
        for relay in relays:
            relay.kill()
        sink.stop()
    delivered = Counter(d.test_id for d in sink.deliveries())
    accepted = set(load.accepted)
    lost = sorted(accepted - set(delivered))
    duplicated = sum(c - 1 for c in delivered.values() if c > 1)
    rates = [e.get("rate", 0) for r in relays for e in r.named("handoff_finished")]
    figures = {
        "sent": load.sent,
        "accepted": len(accepted),
        "delivered": len(delivered),
        "lost": len(lost),
        "duplicated": duplicated,
        "longest_client_gap_s": round(max(load.gaps), 3),
        "handed_off": handed,
        "handoff_rate_per_s": max(rates, default=0),
        "first_drain_s": round(drain_a, 2),
    }
    print("rolling restart:", figures)
    assert not load.failures, load.failures[:5]
    assert lost == [], lost[:10]
    assert len(accepted) > 100
    assert handed > 0, "the test must exercise the hand-off"
    # Duplicates only in the window the issue allows (peer/upstream 250, entry not yet unlinked):
    # none happen without a crash.
    assert duplicated == 0
    assert max(load.gaps) < 5
