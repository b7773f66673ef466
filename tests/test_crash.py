"""Promise 1 (issue 5): crash consistency under ``kill -9``.

The relay runs as a subprocess under load from several concurrent ``smtplib`` clients and is
killed with SIGKILL at chosen and random moments, then restarted on the same spool:

* at a random time;
* right after a client got ``250`` (the entry has just become durable);
* while a client is inside DATA (its message must not be half-accepted);
* by the upstream itself just before it answers ``250`` (the upstream has the message, the relay
  never hears the answer: the documented duplicate window);
* by the upstream a few milliseconds after its ``250`` (during the relay's unlink of the entry);
* by the upstream a few milliseconds after a ``451`` (during the move ``incoming/`` ->
  ``deferred/``), with a deferring upstream so that entries sit in ``deferred/`` during kills.

At the end the relay drains and the test checks, from the upstream's record and the clients'
replies, that no message that got ``250`` is lost.

Delivery is at-least-once.  The one duplicate window is a crash after the upstream accepted the
message and before the relay unlinked the queue entry (the unlink is deliberately not fsync'd,
like Postfix).  Every duplicate found is checked to lie in that window: the generation that
delivered the earlier copy was killed and never logged ``removed`` for that queue id.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from procs import (
    RCPT,
    SENDER,
    Delivery,
    RelayProc,
    SendResult,
    SinkProc,
    encode_v1,
    free_port,
    relay_env,
    send_one,
)

from pyrelay.queuefile import Envelope, encode_header
from pyrelay.spool import new_queue_id

STRATEGIES = (
    "random",
    "after_client_250",
    "during_data",
    "sink_before250",
    "sink_after250",
    "deferring_after451",
    "random_deferring",
)


def _spool_files(spool: Path, state: str) -> list[str]:
    d = spool / state
    return sorted(os.listdir(d)) if d.is_dir() else []


class Crasher:
    def __init__(self, tmp_path: Path, *, seed: int, kills: int) -> None:
        self.rng = random.Random(seed)
        self.max_per_client = max(400, 80 * kills)  # bounded, but load until the last kill
        self.sink = SinkProc(tmp_path, delay=(0.0, 0.03), defer_prob=0.1)
        self.port = free_port()
        self.spool = tmp_path / "spool"
        self.env = relay_env(relay_port=self.port, sink_port=self.sink.port, spool=self.spool)
        self.gens: list[RelayProc] = []
        self.results: list[SendResult] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.got250 = threading.Event()
        self.in_data = threading.Event()
        self.kills: defaultdict[str, int] = defaultdict(int)
        self.upstream_kills = 0

    def start_relay(self) -> RelayProc:
        relay = RelayProc(dict(self.env)).start()
        self.gens.append(relay)
        relay.wait_started()
        return relay

    def client(self, n: int) -> None:
        rng = random.Random(n)
        for i in range(self.max_per_client):
            if self.stop.is_set():
                return
            tid = f"c{n}-{i}"
            kind = rng.random()
            if kind < 0.15:  # large message: a longer DATA and spool write
                kw: dict[str, Any] = {"size": 300_000, "chunks": 6}
            elif kind < 0.3:  # slow client dripping DATA
                kw = {"size": 4000, "chunks": 4, "drip": 0.05}
            else:
                kw = {"size": rng.randrange(200, 3000)}
            res = send_one(self.port, tid, timeout=8, on_data=self.in_data.set, **kw)
            with self.lock:
                self.results.append(res)
            if res.accepted:
                self.got250.set()
            elif res.code is None:
                time.sleep(0.15)  # relay down: back off a little, like a web app retrying

    def kill_once(self, strategy: str) -> None:
        relay = self.gens[-1]
        rng = self.rng
        if strategy == "random":
            time.sleep(rng.uniform(0.3, 2.0))
        elif strategy == "after_client_250":
            time.sleep(rng.uniform(0.3, 1.0))
            self.got250.clear()
            self.got250.wait(3)
            time.sleep(rng.uniform(0, 0.003))
        elif strategy == "during_data":
            time.sleep(rng.uniform(0.3, 1.0))
            self.in_data.clear()
            self.in_data.wait(3)
            time.sleep(rng.uniform(0, 0.08))
        elif strategy in ("sink_before250", "sink_after250", "deferring_after451"):
            mode = strategy.rsplit("_", 1)[1]
            if strategy == "deferring_after451":
                self.sink.set_defer(True)
                time.sleep(0.8)
            self.sink.arm_kill(relay.pid, mode, rng.uniform(0, 0.004))
            relay.wait(4)
            if not self.sink.disarm_kill() and not relay.alive():
                self.upstream_kills += 1  # killed by the upstream at the armed moment
        elif strategy == "random_deferring":
            # The upstream still defers (set by the previous round): kill while entries are
            # being rewritten into deferred/ and retried from there.
            time.sleep(rng.uniform(0.3, 1.5))
        if relay.alive():
            relay.kill()
        else:
            relay.killed = True
            relay.wait(5)
        if strategy != "deferring_after451":
            self.sink.set_defer(False)
        self.kills[strategy] += 1
        time.sleep(rng.uniform(0, 0.2))
        self.start_relay()


def run_crash_test(tmp_path: Path, *, kills: int, seed: int, clients: int = 6) -> None:
    c = Crasher(tmp_path, seed=seed, kills=kills)
    threads: list[threading.Thread] = []
    try:
        c.start_relay()
        threads = [
            threading.Thread(target=c.client, args=(n,), daemon=True) for n in range(clients)
        ]
        for t in threads:
            t.start()
        for k in range(kills):
            c.kill_once(STRATEGIES[k % len(STRATEGIES)])
        time.sleep(0.5)  # the last generation takes some load too
        c.stop.set()
        for t in threads:
            t.join(20)
        assert not any(t.is_alive() for t in threads), "client threads did not finish"
        c.sink.set_defer(False)
        final = c.gens[-1]
        accepted = {r.test_id: r for r in c.results if r.accepted}

        def delivered_ids() -> set[str]:
            return {d.test_id for d in c.sink.deliveries()}

        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and not set(accepted) <= delivered_ids():
            time.sleep(0.1)
        # The queue drains completely (entries whose client never heard 250 included).
        while time.monotonic() < deadline and (
            _spool_files(c.spool, "incoming") or _spool_files(c.spool, "deferred")
        ):
            time.sleep(0.1)
        time.sleep(0.3)  # a duplicate from the last generation would show up here
        final.terminate()
        assert final.wait(15) == 0, "\n".join(final.raw[-20:])
        deliveries = c.sink.deliveries()
        report(c, accepted, deliveries)
    finally:
        c.stop.set()
        for relay in c.gens:
            if relay.alive():
                relay.kill()
        c.sink.stop()


def generation_of(gens: list[RelayProc], t: float) -> int:
    idx = 0
    for i, g in enumerate(gens):
        if g.started_at <= t:
            idx = i
    return idx


def report(c: Crasher, accepted: dict[str, SendResult], deliveries: list[Delivery]) -> None:
    by_id: defaultdict[str, list[Delivery]] = defaultdict(list)
    for d in deliveries:
        by_id[d.test_id].append(d)
    lost = sorted(set(accepted) - set(by_id))
    duplicated = {tid: ds for tid, ds in by_id.items() if len(ds) > 1}
    # Every duplicate must lie in the documented window.
    outside: list[str] = []
    for tid, ds in duplicated.items():
        ds.sort(key=lambda d: d.t)
        for earlier, later in zip(ds, ds[1:], strict=False):
            g1, g2 = generation_of(c.gens, earlier.t), generation_of(c.gens, later.t)
            gen = c.gens[g1]
            removed = any(e.get("queue_id") == earlier.queue_id for e in gen.named("removed"))
            if g1 >= g2 or not gen.killed or removed:
                outside.append(f"{tid} qid={earlier.queue_id} gens={g1}->{g2} removed={removed}")
    # A message delivered under the queue id the client was told.
    wrong_qid = [
        tid
        for tid, r in accepted.items()
        if tid in by_id and r.queue_id not in {d.queue_id for d in by_id[tid]}
    ]
    unacked = sorted(set(by_id) - set(accepted))  # delivered, but the client saw no 250
    sent = len(c.results)
    kills = sum(c.kills.values())
    corrupt = _spool_files(c.spool, "corrupt")
    leftovers = {
        s: _spool_files(c.spool, s) for s in ("tmp", "incoming", "active", "deferred", "hold")
    }
    recovered = sum(len(g.named("queue_recovered")) for g in c.gens)
    replies: defaultdict[str, int] = defaultdict(int)
    for r in c.results:
        replies[str(r.code) if r.code else "conn-error"] += 1
    print(
        f"\ncrash: sent={sent} accepted={len(accepted)} delivered={len(set(by_id))} "
        f"lost={len(lost)} duplicated={len(duplicated)} kills={kills}"
    )
    print(
        f"crash detail: kills_by_strategy={dict(c.kills)} "
        f"killed_by_upstream_at_armed_moment={c.upstream_kills} replies={dict(replies)} "
        f"delivered_without_250={len(unacked)} (client lost the reply in the crash) "
        f"restarts_with_recovery={recovered} "
        f"duplicates_in_window={len(duplicated) - len(outside)} "
        "(window: upstream accepted, relay killed before unlinking the entry)"
    )
    assert lost == [], f"lost messages that got 250: {lost[:10]}"
    assert outside == [], f"duplicates outside the documented window: {outside[:10]}"
    assert wrong_qid == [], wrong_qid[:10]
    assert corrupt == [], f"kill -9 produced corrupt entries: {corrupt}"
    assert leftovers == {s: [] for s in leftovers}, leftovers
    assert len(accepted) > 50 and kills >= 8
    # Nothing was delivered that nobody sent.
    assert set(by_id) <= {r.test_id for r in c.results}


def test_kill9_under_load_loses_nothing(tmp_path: Path) -> None:
    run_crash_test(tmp_path, kills=14, seed=5)


@pytest.mark.slow
def test_kill9_soak(tmp_path: Path) -> None:
    run_crash_test(tmp_path, kills=60, seed=int(time.time()), clients=10)


# -- corrupt and partial entries at start-up ------------------------------------------------


def _entry(state: str, **env_overrides: Any) -> tuple[str, bytes]:
    qid = new_queue_id()
    body = f"Subject: x\r\nX-Test-Id: {qid}\r\n\r\nhello\r\n".encode()
    env = Envelope(
        queue_id=qid,
        sender=SENDER,
        recipients=[RCPT],
        arrival=time.time(),
        size=len(body),
    )
    raw = encode_header(env) + body
    if env_overrides:
        data: dict[str, Any] = {
            "queue_id": qid,
            "sender": SENDER,
            "recipients": [RCPT],
            "arrival": env.arrival,
            "size": len(body),
            "client": "",
            "smtputf8": False,
            "eightbit": False,
            "attempts": 0,
            "next_attempt": 0.0,
            "last_error": "",
            "delivered": [],
        }
        data.update(env_overrides)
        raw = encode_v1(data) + body
    return qid, raw


def test_corrupt_and_partial_entries_are_quarantined_and_queue_flows(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    for d in ("tmp", "incoming", "deferred", "hold", "corrupt"):
        (spool / d).mkdir(parents=True)
    good: list[str] = []
    corrupt: list[str] = []

    def put(state: str, qid: str, raw: bytes, ok: bool) -> None:
        (spool / state / qid).write_bytes(raw)
        (good if ok else corrupt).append(qid)

    for state in ("incoming", "deferred"):
        for _ in range(2):
            qid, raw = _entry(state)
            put(state, qid, raw, True)
        qid, raw = _entry(state)
        put(state, qid, raw[: len(raw) - 3], False)  # truncated message
        qid, raw = _entry(state)
        put(state, qid, raw[:20], False)  # truncated envelope
        put(state, new_queue_id(), b"", False)  # empty file (crash before any write)
        put(state, new_queue_id(), os.urandom(300), False)  # garbage
        put(state, new_queue_id(), b"PYRELAY1 5\n{oops\nxx", False)  # bad JSON
        qid, raw = _entry(state)
        put(state, new_queue_id(), raw, False)  # queue id does not match the file name
        # Well-formed JSON of the wrong types must not crash start-up or delivery.
        for bad in (
            {"next_attempt": "soon"},
            {"arrival": None},
            {"sender": 42},
            {"recipients": "user@dest.test"},
            {"attempts": "x"},
            {"delivered": {"a": 1}},
            {"unknown_field": 1},
        ):
            qid, raw = _entry(state, **bad)
            put(state, qid, raw, False)
        qid = new_queue_id()
        put(state, qid, b"PYRELAY1 3\n[1]\n", False)  # JSON, but not an object
        deep = b"[" * 100_000
        put(state, new_queue_id(), b"PYRELAY1 %d\n%s\n" % (len(deep), deep), False)
    # Half-written files in tmp/ (their clients never got 250): removed, never delivered.
    qid, raw = _entry("incoming")
    (spool / "tmp" / f"{qid}.incoming").write_bytes(raw[: len(raw) // 2])
    (spool / "tmp" / f"{new_queue_id()}.deferred").write_bytes(b"PYRELAY1 ")

    sink = SinkProc(tmp_path)
    relay = RelayProc(relay_env(relay_port=free_port(), sink_port=sink.port, spool=spool)).start()
    try:
        relay.wait_started()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and len(sink.deliveries()) < len(good):
            time.sleep(0.05)
        time.sleep(0.3)
        delivered = sorted(d.test_id for d in sink.deliveries())
        assert delivered == sorted(good)
        assert sorted(_spool_files(spool, "corrupt")) == sorted(corrupt)
        assert _spool_files(spool, "tmp") == []
        assert _spool_files(spool, "incoming") == [] and _spool_files(spool, "deferred") == []
        logged = {e["queue_id"] for e in relay.named("corrupt_queue_file")}
        assert logged == set(corrupt), set(corrupt) ^ logged
        assert relay.named("spool_cleanup")[0]["removed_partial"] == 2
        assert not relay.named("delivery_crashed")
        relay.terminate()
        assert relay.wait(10) == 0
        print(
            f"\ncorrupt: valid={len(good)} delivered={len(delivered)} "
            f"quarantined={len(corrupt)} tmp_removed=2"
        )
    finally:
        if relay.alive():
            relay.kill()
        sink.stop()
