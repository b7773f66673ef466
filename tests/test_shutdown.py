"""Promise 6 (issue 5): graceful shutdown under load.

SIGTERM reaches the relay (a subprocess) while clients are at every stage of a transaction and
deliveries to a slow upstream are in flight.  Checked:

* the relay exits 0 within ``PYRELAY_SHUTDOWN_GRACE`` (plus start-up/teardown slack);
* every client that heard ``250`` has its message durably queued or delivered: after a restart
  each such message reaches the upstream;
* clients that had not reached ``250`` got ``421`` or a closed connection, nothing else;
* deliveries in flight either finished or stayed queued and were delivered after the restart,
  once, or twice only inside the documented window (the upstream accepted, the relay was stopped
  before it heard the reply and unlinked the entry).
"""

from __future__ import annotations

import asyncio
import smtplib
import socket
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from procs import (
    RCPT,
    REPO,
    SENDER,
    Delivery,
    RelayProc,
    SendResult,
    SinkProc,
    free_port,
    make_message,
    relay_env,
    send_one,
)

from conftest import LogCapture, Upstream

GRACE = 3.0
SHUTTING_DOWN = b"421 4.3.2 Service shutting down, closing transmission channel\r\n"


def idle_client(
    port: int, test_id: str, stage: str, ready: threading.Event, *, listen: bool = False
) -> SendResult:
    """Stop at ``stage`` (ehlo / rcpt) and wait for the shutdown.  Then either just read what
    the relay says unprompted (``listen``: its ``421``), or go on with the transaction (the
    connection is closed by then: a reset or the ``421``)."""
    res = SendResult(test_id, stage=stage)
    smtp: smtplib.SMTP | None = None
    try:
        smtp = smtplib.SMTP("127.0.0.1", port, local_hostname="app.test", timeout=10)
        smtp.ehlo()
        if stage == "rcpt":
            assert smtp.mail(SENDER)[0] == 250
            assert smtp.rcpt(RCPT)[0] == 250
        ready.set()
        if listen:
            assert smtp.sock is not None
            smtp.sock.settimeout(GRACE + 5)
            res.stage = "listen"
            code, text = smtp.getreply()
            res.code, res.text = code, text.decode(errors="replace")
            return res
        time.sleep(GRACE + 0.5)  # the relay was told to stop meanwhile
        if stage == "ehlo":
            code, text = smtp.mail(SENDER)
        else:
            code, text = smtp.data(make_message(test_id))
        res.code, res.text = code, text.decode(errors="replace")
        if code == 250:
            res.queue_id = res.text.rsplit(" ", 1)[-1]
    except (OSError, smtplib.SMTPException) as exc:
        res.failed(exc)
    finally:
        res.finished = time.time()
        if smtp is not None:
            smtp.close()
    ready.set()
    return res


def test_sigterm_under_load(tmp_path: Path) -> None:
    # A slow upstream: deliveries are in flight when SIGTERM arrives, some longer than the grace.
    sink = SinkProc(tmp_path, delay=(0.2, 4.5))
    port = free_port()
    spool = tmp_path / "spool"
    env = relay_env(
        relay_port=port,
        sink_port=sink.port,
        spool=spool,
        PYRELAY_SHUTDOWN_GRACE=f"{GRACE}s",
        PYRELAY_CONCURRENCY="6",
    )
    gen0 = RelayProc(dict(env)).start()
    gens = [gen0]
    results: list[SendResult] = []
    lock = threading.Lock()
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def run(fn: Callable[[], SendResult]) -> None:
        def target() -> None:
            r = fn()
            with lock:
                results.append(r)

        t = threading.Thread(target=target, daemon=True)
        threads.append(t)
        t.start()

    def loop_client(n: int) -> None:
        for i in range(200):
            if stop.is_set():
                return
            r = send_one(port, f"fast{n}-{i}", size=1000, timeout=10)
            with lock:
                results.append(r)
            if r.code is None and r.stage == "connect":
                return  # the listener is closed

    try:
        gen0.wait_started()
        for n in range(8):
            t = threading.Thread(target=loop_client, args=(n,), daemon=True)
            threads.append(t)
            t.start()
        time.sleep(1.0)  # deliveries to the slow upstream pile up
        ready: list[threading.Event] = []
        for i in range(6):  # inside DATA, finishing within the grace period
            ev = threading.Event()
            ready.append(ev)
            run(
                partial(
                    send_one, port, f"slowok-{i}", drip=0.2, chunks=6, timeout=15, on_data=ev.set
                )
            )
        for i in range(4):  # inside DATA, dripping far beyond the grace period
            ev = threading.Event()
            ready.append(ev)
            run(
                partial(
                    send_one, port, f"slowcut-{i}", drip=0.5, chunks=20, timeout=15, on_data=ev.set
                )
            )
        for i in range(6):
            ev = threading.Event()
            ready.append(ev)
            run(partial(idle_client, port, f"idle-rcpt-{i}", "rcpt", ev, listen=i % 2 == 0))
        for i in range(4):
            ev = threading.Event()
            ready.append(ev)
            run(partial(idle_client, port, f"idle-ehlo-{i}", "ehlo", ev, listen=i % 2 == 0))
        for ev in ready:
            assert ev.wait(10)
        time.sleep(0.1)
        t0 = time.monotonic()
        gen0.terminate()
        rc = gen0.wait(GRACE + 10)
        took = time.monotonic() - t0
        stop.set()
        for t in threads:
            t.join(20)
        assert not any(t.is_alive() for t in threads)
        assert rc == 0, "\n".join(gen0.raw[-30:])
        tail = "\n".join(line for line in gen0.raw if '"queued"' not in line)[-6000:]
        assert took <= GRACE + 1.5, (
            f"exit took {took:.1f}s with PYRELAY_SHUTDOWN_GRACE={GRACE}\n{tail}"
        )
        assert not [e for e in gen0.events if e.get("level") in ("error", "critical")], [
            e for e in gen0.events if e.get("level") in ("error", "critical")
        ]
        assert not any("Traceback" in line for line in gen0.raw)

        accepted = {r.test_id: r for r in results if r.accepted}
        # Not at 250: only 421 or a closed connection (the listener may also be closed already).
        others = [r for r in results if not r.accepted]
        odd = [(r.test_id, r.code, r.text, r.error) for r in others if r.code not in (None, 421)]
        assert odd == [], odd
        for r in results:
            if r.test_id.startswith("slowok-"):
                assert r.accepted, (r.test_id, r.code, r.error)
            if r.test_id.startswith("slowcut-"):
                assert not r.accepted and r.code in (None, 421), (r.test_id, r.code, r.error)
        listeners = [r for r in results if r.stage == "listen"]
        assert len(listeners) == 5, listeners
        for r in listeners:
            # Sessions idle at SIGTERM hear the shutdown reply at once (not only a reset).
            assert (r.code, r.text) == (
                421,
                "4.3.2 Service shutting down, closing transmission channel",
            ), r
        waiting = gen0.named("shutdown_waiting")
        assert waiting and waiting[0]["deliveries"] > 0, "no delivery was in flight"
        in_flight = waiting[0]["deliveries"]
        cancelled = len(gen0.named("shutdown_cancelled"))

        # Durability at the moment of exit: every 250'd message is delivered or in the spool.
        delivered_now = {d.test_id for d in sink.deliveries()}
        spooled = _spooled_test_ids(spool)
        missing = sorted(set(accepted) - delivered_now - spooled)
        assert missing == [], f"250 given but neither delivered nor queued: {missing}"

        # Restart: what stayed queued goes out (the upstream is fast again).
        sink.set_nodelay(True)
        gen1 = RelayProc(dict(env)).start()
        gens.append(gen1)
        gen1.wait_started()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not set(accepted) <= {
            d.test_id for d in sink.deliveries()
        }:
            time.sleep(0.1)
        while time.monotonic() < deadline and _spooled_test_ids(spool):
            time.sleep(0.1)
        time.sleep(0.3)
        gen1.terminate()
        assert gen1.wait(GRACE + 5) == 0

        deliveries = sink.deliveries()
        by_id: defaultdict[str, list[Delivery]] = defaultdict(list)
        for d in deliveries:
            by_id[d.test_id].append(d)
        lost = sorted(set(accepted) - set(by_id))
        dups = {tid: ds for tid, ds in by_id.items() if len(ds) > 1}
        removed0 = {e.get("queue_id") for e in gen0.named("removed")}
        outside = [
            tid
            for tid, ds in dups.items()
            if len(ds) > 2 or min(ds, key=lambda d: d.t).queue_id in removed0
        ]
        print(
            f"\nshutdown: clients={len(results)} got250={len(accepted)} "
            f"delivered={len(set(by_id) & set(accepted))} lost={len(lost)}"
        )
        print(
            f"shutdown detail: exit={rc} took={took:.2f}s grace={GRACE}s "
            f"deliveries_in_flight={in_flight} cut_at_grace={cancelled} "
            f"queued_at_exit={len(spooled)} "
            f"delivered_after_restart={len(deliveries) - len(delivered_now)} "
            f"refused_421={sum(r.code == 421 for r in others)} "
            f"closed={sum(r.code is None for r in others)} duplicated={len(dups)} "
            "(window: upstream accepted, relay stopped before it heard the reply)"
        )
        assert lost == []
        assert outside == [], outside
        assert _spooled_test_ids(spool) == set()
    finally:
        stop.set()
        for g in gens:
            if g.alive():
                g.kill()
        sink.stop()


def _spooled_test_ids(spool: Path) -> set[str]:
    ids = set()
    for state in ("incoming", "active", "deferred", "hold"):
        d = spool / state
        if not d.is_dir():
            continue
        for f in d.iterdir():
            try:
                raw = f.read_bytes()
            except FileNotFoundError:
                continue
            for line in raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
                if line.startswith(b"X-Test-Id: "):
                    ids.add(line[11:].decode())
    return ids


def test_timeouts_reply_421_on_the_production_event_loop(tmp_path: Path) -> None:
    """The relay runs on uvloop, whose transports are not ``asyncio.WriteTransport``
    instances: an ``isinstance`` check there silently skipped the 421 (and, for the session
    limit, the hang-up).  In-process tests use the stdlib loop, so check it out of process."""
    sink = SinkProc(tmp_path)
    port = free_port()
    env = relay_env(
        relay_port=port,
        sink_port=sink.port,
        spool=tmp_path / "spool",
        PYRELAY_COMMAND_TIMEOUT="1s",
        PYRELAY_SESSION_TIMEOUT="2s",
    )
    relay = RelayProc(env).start()
    try:
        relay.wait_started()
        with smtplib.SMTP("127.0.0.1", port, local_hostname="app.test", timeout=10) as idle:
            idle.ehlo()
            assert idle.sock is not None
            code, text = idle.getreply()  # says nothing: the command timeout fires
            assert code == 421 and b"4.4.2" in text and b"timeout exceeded" in text, text
        with smtplib.SMTP("127.0.0.1", port, local_hostname="app.test", timeout=10) as busy:
            busy.ehlo()
            started = time.monotonic()
            code, text = 250, b""
            while code == 250 and time.monotonic() - started < 6:
                time.sleep(0.3)  # keeps the command timer happy, not the session limit
                try:
                    code, text = busy.noop()
                except smtplib.SMTPServerDisconnected:
                    code, text = 0, b"disconnected"
            assert code == 421 and b"session time limit exceeded" in text, (code, text)
            assert time.monotonic() - started < 4
        relay.terminate()
        assert relay.wait(10) == 0
    finally:
        if relay.alive():
            relay.kill()
        sink.stop()


# -- connections that arrive while the listener closes ------------------------------------------


async def test_a_connection_accepted_as_the_listener_closes_hears_the_shutdown_421(
    upstream: Upstream, make_relay: Any, logs: LogCapture
) -> None:
    """A connection that the event loop accepted just before ``stop()`` closed the listener
    has its ``connection_made`` run after it: it must hear the shutdown reply the README
    promises, like the idle sessions, not ``421 4.7.0 too many connections from all clients``
    (which sent operators looking for a connection limit and counted in its metric)."""
    async with make_relay(upstream) as relay:
        listener = relay.relay.listener
        await listener.stop(0)
        ours, theirs = socket.socketpair()
        await asyncio.get_running_loop().connect_accepted_socket(listener.factory, ours)
        reader, writer = await asyncio.open_connection(sock=theirs)
        try:
            said = await asyncio.wait_for(reader.read(), 5)  # everything, up to the close
        finally:
            writer.close()
    assert said == SHUTTING_DOWN
    assert not logs.has("too many connections")


def _knock(port: int, stop: threading.Event, seen: list[tuple[str, float]]) -> None:
    """Connect again and again; note what each connection heard first and how long it took."""
    while not stop.is_set():
        started = time.monotonic()
        with socket.socket() as sock:
            sock.settimeout(3.0)
            try:
                sock.connect(("127.0.0.1", port))
                first = sock.recv(200).split(b"\r\n", 1)[0]  # a 421 may follow the 220
                heard = first.decode(errors="replace") if first else "closed"
                if first.startswith(b"220"):
                    sock.sendall(b"QUIT\r\n")
            except TimeoutError:
                heard = "silent"
            except OSError as exc:
                heard = type(exc).__name__
        seen.append((heard, time.monotonic() - started))
        if heard == "ConnectionRefusedError":
            time.sleep(0.005)


def test_no_connection_waits_in_silence_while_a_drain_closes_the_listener(
    tmp_path: Path,
) -> None:
    """Two worker processes share the port (SO_REUSEPORT); clients keep connecting while a
    drain closes both listeners.  Every connection is greeted (``220``), told the shutdown
    ``421``, reset (it was still in the kernel's accept queue of a closing socket: Linux
    resets those, nothing migrates them to another worker) or refused, promptly: none waits
    for a greeting that never comes (a client would sit out its whole timeout)."""
    sink = SinkProc(tmp_path / "sink")
    port = free_port()
    env = relay_env(
        relay_port=port,
        sink_port=sink.port,
        spool=tmp_path / "spool",
        PYRELAY_WORKERS="2",
        PYRELAY_DRAIN_GRACE="0.2s",
    )
    relay = RelayProc(env).start()
    stop = threading.Event()
    seen: list[tuple[str, float]] = []
    knockers = [
        threading.Thread(target=_knock, args=(port, stop, seen), daemon=True) for _ in range(6)
    ]
    try:
        relay.wait_started()
        for t in knockers:
            t.start()
        time.sleep(0.5)
        done = subprocess.run(
            [sys.executable, "-m", "pyrelay", "drain", "--timeout", "1"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert relay.wait(10) == 0
        time.sleep(0.3)  # and after the exit: refused
    finally:
        stop.set()
        for t in knockers:
            t.join(10)
        relay.kill()
        sink.stop()
    heard = Counter(h for h, _ in seen)
    print("connections during a drain:", dict(heard))
    assert heard["220 relay.test ESMTP pyrelay"] > 20, heard
    assert heard["ConnectionRefusedError"] > 0, heard  # the listener did close meanwhile
    allowed = {
        "220 relay.test ESMTP pyrelay",
        SHUTTING_DOWN.decode().strip(),
        "closed",
        "ConnectionResetError",
        "ConnectionRefusedError",
    }
    assert set(heard) <= allowed, heard
    # A silent connection shows as "silent" (3 s); a SYN that races the close of a listening
    # socket is dropped by the kernel and sent again after 1 s, which is not silence.
    slow = sorted(t for _, t in seen if t > 2.0)
    assert slow == [], slow


def test_a_stop_signal_to_the_whole_process_group_stops_every_worker_gracefully(
    tmp_path: Path,
) -> None:
    """Ctrl-C in a terminal, ``timeout`` and systemd's default KillMode signal every process of
    the relay at once; the primary then passes the stop on to its workers.  A worker took that
    second signal for an operator insisting and exited at once (``forced_exit``), cutting its
    sessions in DATA; every process must let them finish, as after a SIGTERM to the primary."""
    import os
    import signal

    sink = SinkProc(tmp_path / "sink")
    env = relay_env(relay_port=free_port(), sink_port=sink.port, spool=tmp_path / "spool")
    env.update(PYRELAY_WORKERS="2", PYRELAY_SHUTDOWN_GRACE="10s")
    port = int(env["PYRELAY_LISTEN"].rsplit(":", 1)[1])
    relay = RelayProc(env, prefix=["setsid"]).start()  # its own process group
    clients: list[socket.socket] = []
    try:
        relay.wait_started(processes=2)
        for _ in range(8):  # spread over both processes by SO_REUSEPORT
            c = socket.create_connection(("127.0.0.1", port), timeout=10)
            c.recv(1024)
            c.sendall(f"EHLO app.test\r\nMAIL FROM:<{SENDER}>\r\nRCPT TO:<{RCPT}>\r\n".encode())
            c.sendall(b"DATA\r\n")
            got = b""
            while b"354" not in got:
                got += c.recv(4096)
            c.sendall(b"Subject: in flight\r\n\r\nfirst half\r\n")
            clients.append(c)
        os.killpg(relay.pid, signal.SIGTERM)
        time.sleep(0.5)  # both stopping, waiting for their sessions in DATA
        replies = []
        for c in clients:
            c.sendall(b"second half\r\n.\r\n")
            replies.append(c.recv(4096))
        assert all(r.startswith(b"250 2.0.0 Ok: queued as") for r in replies), replies
        assert relay.proc is not None
        assert relay.proc.wait(30) == 0
    finally:
        for c in clients:
            c.close()
        relay.kill()
        sink.stop()
    assert not relay.named("forced_exit"), relay.raw[-10:]
