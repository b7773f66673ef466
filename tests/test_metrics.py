"""The Prometheus endpoint (``PYRELAY_METRICS_LISTEN``): scraped over HTTP like Prometheus would,
while real messages flow through the relay to a real upstream."""

from __future__ import annotations

import asyncio
import smtplib
import urllib.request
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import MESSAGE, LogCapture, Upstream, free_port, wait_until

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
