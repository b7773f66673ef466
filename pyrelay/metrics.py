"""Prometheus metrics.  Always counted (a counter increment is ~1 µs); served only when
``PYRELAY_METRICS_LISTEN`` is set."""

from __future__ import annotations

from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from pyrelay.config import HostPort


class Metrics:
    def __init__(self) -> None:
        self._server: WSGIServer | None = None
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
        self.queue_size = Gauge("pyrelay_queue_size", "Messages in the queue", registry=r)
        self.oldest_age = Gauge(
            "pyrelay_queue_oldest_age_seconds", "Age of the oldest queued message", registry=r
        )
        self.latency = Histogram(
            "pyrelay_delivery_latency_seconds",
            "Time from acceptance to upstream acceptance",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600, 86400),
            registry=r,
        )

    def serve(self, listen: HostPort) -> None:
        self._server, _ = start_http_server(listen.port, addr=listen.host, registry=self.registry)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
