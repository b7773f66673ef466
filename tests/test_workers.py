"""PYRELAY_WORKERS=2: two processes share the port; retries and orphans end up with the primary."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import smtplib
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from procs import relay_env

from conftest import MESSAGE, PASSWORD, USER, Upstream, free_port, wait_until

pytestmark = pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="needs Linux pidfd_open")


class Relay:
    def __init__(
        self, proc: subprocess.Popen[bytes], port: int, log: Path, spool: Path, metrics: int
    ) -> None:
        self.proc, self.port, self.log, self.spool = proc, port, log, spool
        self.metrics_port = metrics

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics") as r:
            text = r.read().decode()
        found = re.findall(rf"^{name} (\S+)$", text, re.M)
        return float(found[0]) if found else 0.0

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def send(self, n: int) -> list[str]:
        ids = []
        for i in range(n):
            with smtplib.SMTP("127.0.0.1", self.port, timeout=10) as smtp:
                smtp.ehlo()
                smtp.mail("app@example.org")
                smtp.rcpt(f"r{i}@dest.test")
                code, reply = smtp.data(MESSAGE)
                assert code == 250, reply
                ids.append(reply.decode().rsplit(" ", 1)[1])
        return ids

    def worker_pid(self) -> int:
        found = re.findall(r"event=worker_started worker=1 pid=(\d+)", self.text())
        return int(found[-1])


@pytest.fixture
async def workers2(upstream: Upstream, ca_file: Path, tmp_path: Path) -> AsyncIterator[Relay]:
    port = free_port()
    metrics = free_port()
    spool = tmp_path / "spool"
    env = relay_env(
        relay_port=port,
        sink_port=upstream.port,
        spool=spool,
        RELAYHOST_USERNAME=USER,
        RELAYHOST_PASSWORD=PASSWORD,
        RELAYHOST_TLS_LEVEL="secure",
        RELAYHOST_TLS_CA_FILE=str(ca_file),
        PYRELAY_LOG_FORMAT="console",
        PYRELAY_UPSTREAM_DATA_TIMEOUT="30s",
        PYRELAY_WORKERS="2",
        PYRELAY_SHUTDOWN_GRACE="2s",
        PYRELAY_METRICS_LISTEN=f"127.0.0.1:{metrics}",
    )
    log = tmp_path / "relay.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(  # noqa: ASYNC220 - starting it is instant
            [sys.executable, "-m", "pyrelay"], env=env, cwd=tmp_path, stdout=out, stderr=out
        )
    relay = Relay(proc, port, log, spool, metrics)
    try:
        await wait_until(lambda: relay.text().count("event=listening") >= 2, what="both workers")
        yield relay
    finally:
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 20)
        assert code == 0, relay.text()[-3000:]
        assert PASSWORD not in relay.text()
        # No worker outlives the primary.
        for pid in re.findall(r"event=worker_started worker=\d+ pid=(\d+)", relay.text()):
            with pytest.raises(ProcessLookupError):
                os.kill(int(pid), 0)


async def test_both_workers_accept_and_deliver(workers2: Relay, upstream: Upstream) -> None:
    ids = await asyncio.to_thread(workers2.send, 40)
    assert {qid[-1] for qid in ids} == {"0", "1"}  # the kernel spread the connections
    await wait_until(lambda: len(upstream.state.messages) == 40, what="all delivered")
    assert sorted(r for m in upstream.state.messages for r in m.rcpt_tos) == sorted(
        f"r{i}@dest.test" for i in range(40)
    )
    # The primary serves the sum over both processes.
    await wait_until(
        lambda: workers2.metric("pyrelay_recipients_delivered_total") == 40, what="metrics"
    )
    assert workers2.metric("pyrelay_messages_received_total") == 40
    assert workers2.metric("pyrelay_queue_size") == 0


async def test_deferrals_of_a_secondary_are_retried_by_the_primary(
    workers2: Relay, upstream: Upstream
) -> None:
    upstream.state.data_reply = "451 4.3.0 try again later"
    ids = await asyncio.to_thread(workers2.send, 20)
    secondary = [qid for qid in ids if qid.endswith("1")]
    assert secondary
    await wait_until(
        lambda: all(f"event=deferred queue_id={q}" in workers2.text() for q in ids),
        what="every message deferred once",
    )
    upstream.state.data_reply = None
    await wait_until(lambda: len(upstream.state.messages) == 20, what="all delivered on retry")
    assert list((workers2.spool / "deferred").iterdir()) == []


async def test_a_killed_worker_is_replaced_and_its_messages_delivered(
    workers2: Relay, upstream: Upstream
) -> None:
    upstream.state.data_gate = asyncio.Event()  # every delivery hangs at the end of DATA
    ids = await asyncio.to_thread(workers2.send, 20)
    secondary = [qid for qid in ids if qid.endswith("1")]
    assert secondary
    victim = workers2.worker_pid()
    os.kill(victim, signal.SIGKILL)
    await wait_until(lambda: "event=worker_died" in workers2.text(), what="death noticed")
    await wait_until(lambda: workers2.worker_pid() != victim, timeout=15, what="replacement")
    upstream.state.data_gate.set()

    def delivered() -> set[str]:
        return {r for m in upstream.state.messages for r in m.rcpt_tos}

    def queued() -> list[str]:
        return [
            p.name
            for d in ("incoming", "active", "deferred")
            for p in (workers2.spool / d).iterdir()
        ]

    await wait_until(lambda: len(delivered()) == 20, timeout=20, what="every message delivered")
    await wait_until(lambda: queued() == [], what="queue empty")


def _not_our_child() -> int:
    """A running process that is not a child of this one (what a reaped worker's PID may have
    become): started by a shell that exits at once."""
    out = subprocess.run(
        ["sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!"], capture_output=True, check=True
    )
    return int(out.stdout)


def _alive(pid: int) -> bool:
    """Running (a killed orphan may linger as a zombie until init reaps it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


async def test_stopping_never_signals_the_old_pid_of_a_reaped_worker(tmp_path: Path) -> None:
    """After a worker died and was reaped (its replacement not started yet), the pool still
    remembers its PID, which the system may have given to another process: stopping must not
    signal it, nor must the clean-up after the event loop."""
    from conftest import relay_settings
    from pyrelay.app import _stop_children
    from pyrelay.workers import WorkerPool

    bystander = _not_our_child()
    try:
        settings = relay_settings(tmp_path, None, None, workers=2)
        pool = WorkerPool(settings, scheduler=None, pids={1: bystander})  # type: ignore[arg-type]
        await pool.stop(grace=0.1)
        _stop_children({1: bystander})
        await asyncio.sleep(0.1)
        assert _alive(bystander)
    finally:
        os.kill(bystander, signal.SIGKILL)
