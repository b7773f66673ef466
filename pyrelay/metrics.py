"""Prometheus metrics, served on ``/metrics`` when ``PYRELAY_HTTP_LISTEN`` (or its old name
``PYRELAY_METRICS_LISTEN``) is set (``pyrelay.http``).  Only then are they counted (a counter
increment is ~1 µs) and prometheus-client imported at all: without the endpoint every instrument
is a no-op (``NOOP``) and each relay process is spared prometheus-client's memory (1.7 MB of an
idle relay's RSS, measured).  Callers use the same interface either way (``CounterLike``,
``HistogramLike``, ``GaugeLike``).

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
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.registry import Collector

    from pyrelay.config import Settings

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
    "auth_failed",
)
UPSTREAM_ERROR_KINDS = ("dns", "tcp", "greeting", "tls", "auth", "connection", "protocol")
HANDOFF_RESULTS = ("handed_off", "failed")

# ``() -> (queue size, age of the oldest entry in seconds)``
QueueStats = Callable[[], tuple[int, float]]


class CounterLike(Protocol):
    """What callers use of a ``prometheus_client.Counter`` (labelled or not)."""

    def inc(self, amount: float = 1) -> None: ...

    def labels(self, **labels: str) -> CounterLike: ...


class HistogramLike(Protocol):
    def observe(self, amount: float) -> None: ...


class GaugeLike(Protocol):
    def set(self, value: float) -> None: ...


class _Noop:
    """Every instrument while metrics are off: counts nothing, costs a method call."""

    __slots__ = ()

    def inc(self, amount: float = 1) -> None:
        pass

    def labels(self, **labels: str) -> _Noop:
        return self

    def observe(self, amount: float) -> None:
        pass

    def set(self, value: float) -> None:
        pass


NOOP = _Noop()


def enable_multiprocess(directory: Path) -> None:
    """Count into ``directory`` from now on, in this process and in processes it starts.

    Called by the primary before it forks its workers, only when metrics are on; the directory
    is emptied because the files of a previous run would otherwise be added to this run's
    counters."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True, mode=0o700)
    os.environ[MULTIPROC_ENV] = str(directory)
    from prometheus_client import values

    # prometheus-client picks its value class when first imported: from the variable if that
    # happens now, but it may have been imported earlier (tests/test_library_contracts.py does),
    # so it is switched explicitly.  Metrics are created later (per Relay), so this covers every
    # metric of this and the forked processes.
    values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]


class Metrics:
    """The relay's instruments: prometheus-client's when ``enabled``, else ``NOOP``.

    ``registry`` is the process's ``CollectorRegistry``, ``None`` while metrics are off."""

    received: CounterLike
    rejected: CounterLike
    delivered: CounterLike
    deferred: CounterLike
    bounced: CounterLike
    upstream_errors: CounterLike
    latency: HistogramLike
    handoff: CounterLike
    draining: GaugeLike

    def __init__(self, *, enabled: bool) -> None:
        self._queue_stats: QueueStats | None = None
        self._exposed: CollectorRegistry | None = None
        self.registry: CollectorRegistry | None = None
        if enabled:
            self._create()
        else:
            self.received = self.rejected = self.delivered = self.deferred = NOOP
            self.bounced = self.upstream_errors = self.handoff = NOOP
            self.latency = NOOP
            self.draining = NOOP

    @classmethod
    def for_settings(cls, settings: Settings) -> Metrics:
        """Counting only when there is an endpoint to serve the counts."""
        return cls(enabled=settings.metrics_listen is not None)

    def _create(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
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

    def counter(self, make: Callable[[CollectorRegistry], CounterLike]) -> CounterLike:
        """``make(registry)`` (a counter defined elsewhere, e.g. ``routes.route_counter``), or
        ``NOOP`` while metrics are off."""
        if self.registry is None:
            return NOOP
        return make(self.registry)

    def watch_queue(self, stats: QueueStats) -> None:
        """Report ``stats() -> (size, oldest age)`` as the queue gauges."""
        self._queue_stats = stats

    def exposition_registry(self) -> CollectorRegistry:
        """The registry ``/metrics`` renders: this process's, or the sum of every worker's."""
        if self._exposed is not None:
            return self._exposed
        if self.registry is None:
            raise RuntimeError("metrics are off: there is nothing to expose")
        registry = self.registry
        directory = os.environ.get(MULTIPROC_ENV)
        if directory:
            from prometheus_client import CollectorRegistry
            from prometheus_client.multiprocess import MultiProcessCollector

            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
        if self._queue_stats is not None:
            registry.register(_queue_collector(self._queue_stats))
        self._exposed = registry
        return registry

    @staticmethod
    def render(registry: CollectorRegistry) -> tuple[bytes, str]:
        """The text exposition of ``registry`` (blocking: run it in a thread)."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(registry), CONTENT_TYPE_LATEST


def _queue_collector(stats: QueueStats) -> Collector:
    """The queue gauges, read from ``stats`` at each scrape.  (Defined here rather than at
    module level, where subclassing ``Collector`` would import prometheus-client.)"""
    from prometheus_client.core import GaugeMetricFamily, Metric
    from prometheus_client.registry import Collector

    class QueueCollector(Collector):
        def collect(self) -> Iterator[Metric]:
            size, oldest = stats()
            yield GaugeMetricFamily("pyrelay_queue_size", "Messages in the queue", value=size)
            yield GaugeMetricFamily(
                "pyrelay_queue_oldest_age_seconds",
                "Age of the oldest queued message",
                value=oldest,
            )

    return QueueCollector()
