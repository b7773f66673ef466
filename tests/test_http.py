"""Issue 14: the HTTP endpoints on ``PYRELAY_HTTP_LISTEN`` (``/metrics``, ``/healthz``,
``/readyz``) of a relay subprocess, probed like Kubernetes and Prometheus would."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from procs import REPO, RelayProc, SinkProc, free_port, relay_env, send_one


def get(port: int, path: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def start(env: dict[str, str]) -> RelayProc:
    relay = RelayProc(env).start()
    relay.wait_started()
    return relay


def test_endpoints_and_series_present_from_start(tmp_path: Path) -> None:
    http = free_port()
    env = relay_env(
        relay_port=free_port(),
        sink_port=free_port(),
        spool=tmp_path / "spool",
        PYRELAY_HTTP_LISTEN=f"127.0.0.1:{http}",
    )
    relay = start(env)
    try:
        assert get(http, "/healthz") == (200, "ok\n")
        assert get(http, "/readyz") == (200, "ready\n")
        assert get(http, "/nope")[0] == 404
        code, text = get(http, "/metrics")
        assert code == 200
        # Labelled series an alert uses exist before the first event.
        for series in (
            'pyrelay_upstream_errors_total{kind="auth"} 0.0',
            'pyrelay_messages_rejected_total{reason="relay_denied"} 0.0',
            'pyrelay_messages_rejected_total{reason="auth_failed"} 0.0',
            'pyrelay_handoff_messages_total{result="handed_off"} 0.0',
            "pyrelay_draining 0.0",
            "pyrelay_queue_size 0.0",
        ):
            assert series in text
    finally:
        relay.terminate()
        relay.wait(10)


def test_metrics_listen_stays_an_alias(tmp_path: Path) -> None:
    http = free_port()
    env = relay_env(
        relay_port=free_port(),
        sink_port=free_port(),
        spool=tmp_path / "spool",
        PYRELAY_METRICS_LISTEN=f"127.0.0.1:{http}",
    )
    relay = start(env)
    try:
        assert get(http, "/readyz") == (200, "ready\n")
    finally:
        relay.terminate()
        relay.wait(10)


def _smtp_accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.settimeout(1)
            return s.recv(4).startswith(b"220")
    except OSError:
        return False


def test_readyz_goes_false_before_the_listener_closes(tmp_path: Path) -> None:
    sink = SinkProc(tmp_path / "sink")
    http, smtp = free_port(), free_port()
    env = relay_env(
        relay_port=smtp,
        sink_port=sink.port,
        spool=tmp_path / "spool",
        PYRELAY_HTTP_LISTEN=f"127.0.0.1:{http}",
        PYRELAY_DRAIN_GRACE="1s",
    )
    relay = start(env)
    not_ready_at: float | None = None
    closed_at: float | None = None
    accepted_while_not_ready = 0
    try:
        drain = subprocess.Popen(
            [sys.executable, "-m", "pyrelay", "drain", "--timeout", "5"],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 15
        while closed_at is None and time.monotonic() < deadline:
            now = time.monotonic()
            if not_ready_at is None:
                try:
                    code = get(http, "/readyz", timeout=1)[0]
                except OSError:
                    code = 0
                if code == 503:
                    not_ready_at = now
            if _smtp_accepts(smtp):
                if not_ready_at is not None:
                    accepted_while_not_ready += 1
            else:
                closed_at = now
            time.sleep(0.02)
        assert drain.wait(20) == 0
        assert relay.wait(10) == 0
    finally:
        relay.kill()
        sink.stop()
    assert not_ready_at is not None and closed_at is not None
    assert not_ready_at < closed_at
    assert closed_at - not_ready_at > 0.5  # the grace: the Service has time to notice
    assert accepted_while_not_ready > 0


def test_healthz_answers_within_a_second_under_load(tmp_path: Path) -> None:
    sink = SinkProc(tmp_path / "sink", delay=(0.0, 0.02))
    http, smtp = free_port(), free_port()
    env = relay_env(
        relay_port=smtp,
        sink_port=sink.port,
        spool=tmp_path / "spool",
        PYRELAY_HTTP_LISTEN=f"127.0.0.1:{http}",
    )
    relay = start(env)
    stop = threading.Event()
    sent: list[bool] = []

    def client(i: int) -> None:
        n = 0
        while not stop.is_set():
            sent.append(send_one(smtp, f"l{i}-{n}", size=20_000).accepted)
            n += 1

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(8)]
    latencies = []
    try:
        for t in threads:
            t.start()
        end = time.monotonic() + 4
        while time.monotonic() < end:
            t0 = time.monotonic()
            assert get(http, "/healthz", timeout=5)[0] == 200
            latencies.append(time.monotonic() - t0)
            assert get(http, "/metrics", timeout=5)[0] == 200
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(15)
        relay.terminate()
        relay.wait(10)
        sink.stop()
    assert len(sent) > 50 and all(sent)
    assert max(latencies) < 1.0, max(latencies)
