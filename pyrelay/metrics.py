"""Prometheus metrics.  Always counted (a counter increment is ~1 µs); served on ``/metrics``
only when ``PYRELAY_HTTP_LISTEN`` (or its old name ``PYRELAY_METRICS_LISTEN``) is set
(``pyrelay.http``).

Every labelled series an alert or a dashboard panel uses exists from start-up (value 0), so that
``rate()`` and ``increase()`` see the first event and an alert never looks at a missing series.

With several worker processes every process counts into files in a shared directory
(prometheus-client's multiprocess mode) and the primary serves the sum, so a delivery counts
whichever worker made it.  The queue gauges come from the primary, which owns every retry.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    values,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# The label values known in advance (policy.Reason and the listener's own refusals; the
# delivery steps of delivery.Step and the connection-level kinds), created at start-up.
REJECTION_REASONS = (
    "client",
    "relay_denied",
    "null_sender",
    "syntax",
    "too_many_recipients",
    "size",
    "hops",
    "spool",
    "junk_commands",
    "too_many_connections",
    "too_many_connections_per_client",
)
UPSTREAM_ERROR_KINDS = ("dns", "tcp", "greeting", "tls", "auth", "connection", "protocol")
HANDOFF_RESULTS = ("handed_off", "failed")


def enable_multiprocess(directory: Path) -> None:
    """Count into ``directory`` from now on, in this process and in processes it starts.

    Called by the primary before it forks its workers; the directory is emptied because the
    files of a previous run would otherwise be added to this run's counters."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True, mode=0o700)
    os.environ[MULTIPROC_ENV] = str(directory)
    # prometheus-client picks its value class when imported; metrics are created later (per
    # Relay), so switching it here covers every metric of this and the forked processes.
    values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]


class _QueueCollector(Collector):
    def __init__(self, stats: Callable[[], tuple[int, float]]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        size, oldest = self.stats()
        yield GaugeMetricFamily("pyrelay_queue_size", "Messages in the queue", value=size)
        yield GaugeMetricFamily(
            "pyrelay_queue_oldest_age_seconds", "Age of the oldest queued message", value=oldest
        )


class Metrics:
    def __init__(self) -> None:
        self._queue: _QueueCollector | None = None
        self._exposed: CollectorRegistry | None = None
        self.registry = CollectorRegistry()
        r = self.registry
        self.received = Counter(
            "pyrelay_messages_received", "Messages accepted and queued", registry=r
        )
        self.rejected = Counter(
            "pyrelay_messages_rejected", "SMTP commands rejected, by reason", ["reason"], registry=r
        )
        self.delivered = Counter(
            "pyrelay_recipients_delivered", "Recipients delivered upstream", registry=r
        )
        self.deferred = Counter(
            "pyrelay_recipients_deferred", "Recipient deliveries deferred", registry=r
        )
        self.bounced = Counter("pyrelay_recipients_bounced", "Recipients bounced", registry=r)
        self.upstream_errors = Counter(
            "pyrelay_upstream_errors", "Upstream connection failures, by kind", ["kind"], registry=r
        )
        self.latency = Histogram(
            "pyrelay_delivery_latency_seconds",
            "Time from acceptance to upstream acceptance",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600, 86400),
            registry=r,
        )
        self.handoff = Counter(
            "pyrelay_handoff_messages",
            "Queue entries forwarded to a peer relay (drain or queue handoff), by result",
            ["result"],
            registry=r,
        )
        self.draining = Gauge(
            "pyrelay_draining",
            "1 while the relay drains (not ready, listener closing)",
            registry=r,
            multiprocess_mode="max",
        )
        for reason in REJECTION_REASONS:
            self.rejected.labels(reason=reason)
        for kind in UPSTREAM_ERROR_KINDS:
            self.upstream_errors.labels(kind=kind)
        for result in HANDOFF_RESULTS:
            self.handoff.labels(result=result)

    def watch_queue(self, stats: Callable[[], tuple[int, float]]) -> None:
        """Report ``stats() -> (size, oldest age)`` as the queue gauges."""
        self._queue = _QueueCollector(stats)

    def exposition_registry(self) -> CollectorRegistry:
        """The registry ``/metrics`` renders: this process's, or the sum of every worker's."""
        if self._exposed is not None:
            return self._exposed
        registry = self.registry
        directory = os.environ.get(MULTIPROC_ENV)
        if directory:
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
        if self._queue is not None:
            registry.register(self._queue)
        self._exposed = registry
        return registry

    @staticmethod
    def render(registry: CollectorRegistry) -> tuple[bytes, str]:
        """The text exposition of ``registry`` (blocking: run it in a thread)."""
        return generate_latest(registry), CONTENT_TYPE_LATEST
