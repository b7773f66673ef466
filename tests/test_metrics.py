"""The Prometheus endpoint (``PYRELAY_METRICS_LISTEN``): scraped over HTTP like Prometheus would,
while real messages flow through the relay to a real upstream; and without the endpoint, a relay
process that never imports prometheus-client."""

from __future__ import annotations

import asyncio
import json
import smtplib
import sys
import textwrap
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from procs import RelayProc, SinkProc, relay_env, send_one
from prometheus_client.parser import text_string_to_metric_families

from conftest import MESSAGE, LogCapture, Upstream, free_port, wait_until
from pyrelay.metrics import NOOP, Metrics

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _scrape(port: int) -> tuple[str, Samples]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        content_type = response.headers["Content-Type"]
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return content_type, samples


async def scrape(port: int) -> Samples:
    return (await asyncio.to_thread(_scrape, port))[1]


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def test_counters_move_as_messages_flow(
    upstream: Upstream, make_relay: Any, logs: LogCapture
) -> None:
    upstream.state.rcpt_replies["later@dest.test"] = "451 4.2.0 <later@dest.test>: mailbox busy"
    upstream.state.rcpt_replies["nobody@dest.test"] = "550 5.1.1 <nobody@dest.test>: unknown"
    port = free_port()
    async with make_relay(upstream, metrics_listen=f"127.0.0.1:{port}") as relay:
        content_type, before = await asyncio.to_thread(_scrape, port)
        assert content_type.startswith("text/plain")
        assert value(before, "pyrelay_messages_received_total") == 0
        assert value(before, "pyrelay_queue_size") == 0

        await relay.asend("app@example.org", ["alice@dest.test"], MESSAGE)  # delivered
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            await relay.asend("x@evil.test", ["alice@dest.test"], MESSAGE)  # rejected
        await relay.asend("app@example.org", ["later@dest.test"], MESSAGE)  # deferred
        await relay.asend("app@example.org", ["nobody@dest.test"], MESSAGE)  # bounced
        # alice's message and the bounce notice to app@example.org
        await wait_until(lambda: len(upstream.state.messages) == 2, what="deliveries")
        await wait_until(lambda: logs.has("event=deferred", "later@dest.test"), what="deferral")
        await wait_until(lambda: logs.has("event=removed"), what="removal")
        after = await scrape(port)

    assert value(after, "pyrelay_messages_received_total") == 3
    assert value(after, "pyrelay_messages_rejected_total", reason="relay_denied") == 1
    assert value(after, "pyrelay_recipients_delivered_total") == 2
    assert value(after, "pyrelay_recipients_bounced_total") == 1
    assert value(after, "pyrelay_recipients_deferred_total") >= 1
    # Only the deferred message is still queued.
    assert value(after, "pyrelay_queue_size") == 1
    assert 0 <= value(after, "pyrelay_queue_oldest_age_seconds") < 60
    assert value(after, "pyrelay_delivery_latency_seconds_count") >= 1
    assert value(after, "pyrelay_delivery_latency_seconds_bucket", le="+Inf") == value(
        after, "pyrelay_delivery_latency_seconds_count"
    )


async def test_upstream_errors_are_counted_by_kind(
    make_upstream: Any, make_relay: Any, logs: LogCapture
) -> None:
    gone: Upstream = await make_upstream()
    await gone.stop()  # connection refused from now on
    port = free_port()
    async with make_relay(gone, metrics_listen=f"127.0.0.1:{port}") as relay:
        await relay.asend("app@example.org", ["alice@dest.test"], MESSAGE)
        await wait_until(lambda: logs.has("event=deferred", "Connection refused"), what="deferral")
        samples = await scrape(port)
    assert value(samples, "pyrelay_upstream_errors_total", kind="tcp") >= 1
    assert value(samples, "pyrelay_recipients_deferred_total") >= 1
    assert value(samples, "pyrelay_recipients_delivered_total") == 0


# -- metrics off: no prometheus-client ----------------------------------------------------------

# Run as RelayProc's prefix: ``python -c REPORTER REPORT python -m pyrelay`` runs the module named
# after ``-m`` like ``python -m`` would and, at exit, writes the prometheus-client modules it had
# imported to REPORT.
_REPORTER = textwrap.dedent(
    """
    import atexit, json, runpy, sys
    report, _python, dash_m, module, *args = sys.argv[1:]
    assert dash_m == "-m", sys.argv

    def write_report() -> None:
        loaded = sorted(m for m in sys.modules if m.split(".")[0] == "prometheus_client")
        with open(report, "w") as f:
            json.dump(loaded, f)

    atexit.register(write_report)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    """
)


@pytest.mark.parametrize("endpoint", [False, True], ids=["metrics_off", "metrics_on"])
def test_prometheus_client_is_imported_only_with_the_endpoint(
    tmp_path: Path, endpoint: bool
) -> None:
    """A real relay process, which accepts and delivers a message: without
    ``PYRELAY_HTTP_LISTEN`` it never imports prometheus-client (idle memory of every process);
    with it, it does (which also shows that the report sees an import)."""
    sink = SinkProc(tmp_path / "sink")
    smtp = free_port()
    extra = {"PYRELAY_HTTP_LISTEN": f"127.0.0.1:{free_port()}"} if endpoint else {}
    env = relay_env(relay_port=smtp, sink_port=sink.port, spool=tmp_path / "spool", **extra)
    report = tmp_path / "modules.json"
    relay = RelayProc(env, prefix=[sys.executable, "-c", _REPORTER, str(report)]).start()
    try:
        relay.wait_started()
        assert send_one(smtp, "lazy-metrics").accepted
        deadline = time.monotonic() + 15
        while not sink.deliveries() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [d.test_id for d in sink.deliveries()] == ["lazy-metrics"]
        relay.terminate()
        assert relay.wait(15) == 0, "\n".join(relay.raw[-30:])
    finally:
        relay.kill()
        sink.stop()
    loaded = json.loads(report.read_text())
    if endpoint:
        assert "prometheus_client" in loaded
    else:
        assert loaded == []


def test_metrics_off_instruments_are_no_ops() -> None:
    metrics = Metrics(enabled=False)
    assert metrics.registry is None
    for instrument in (metrics.received, metrics.rejected, metrics.latency, metrics.draining):
        assert instrument is NOOP
    metrics.rejected.labels(reason="size").inc()
    metrics.latency.observe(0.5)
    metrics.draining.set(1)
    assert metrics.counter(lambda registry: pytest.fail("made a counter")) is NOOP
    with pytest.raises(RuntimeError):
        metrics.exposition_registry()


def test_metrics_on_count() -> None:
    metrics = Metrics(enabled=True)
    assert metrics.registry is not None
    metrics.received.inc(2)
    metrics.rejected.labels(reason="size").inc()
    assert metrics.registry.get_sample_value("pyrelay_messages_received_total") == 2
    assert (
        metrics.registry.get_sample_value("pyrelay_messages_rejected_total", {"reason": "size"})
        == 1
    )
