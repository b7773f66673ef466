"""The operations HTTP endpoint (``PYRELAY_HTTP_LISTEN``; ``PYRELAY_METRICS_LISTEN`` is its older
name), for Prometheus and Kubernetes probes:

- ``/metrics``: the Prometheus text exposition (rendered in a thread);
- ``/healthz``: the process is alive and its event loop responsive.  The answer is written by the
  event loop itself, so a blocked loop fails the probe by timing out;
- ``/readyz``: the listener accepts connections and the spool is writable, and the relay is not
  draining (``pyrelay drain`` turns this false first, so a Service stops routing to the pod before
  its listener closes).

A deliberately small HTTP/1.1 server on the relay's event loop: one request per connection,
``GET`` and ``HEAD`` only, bounded request size and time.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from pyrelay.config import HostPort
from pyrelay.logging import get_logger
from pyrelay.metrics import Metrics

log = get_logger("pyrelay.http")

REQUEST_LIMIT = 8192
REQUEST_TIMEOUT = 5.0
_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}

# Returns why the relay is not ready, or "" when it is.
ReadinessCheck = Callable[[], Awaitable[str]]


class HttpServer:
    def __init__(self, listen: HostPort, metrics: Metrics, not_ready: ReadinessCheck) -> None:
        self.listen = listen
        self.metrics = metrics
        self.not_ready = not_ready
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, host=self.listen.host, port=self.listen.port, reuse_address=True
        )
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 1)
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
            except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                return
            if len(head) > REQUEST_LIMIT:
                return
            parts = head.split(b"\r\n", 1)[0].split()
            if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
                return
            method = parts[0].decode("ascii", "replace")
            path = parts[1].decode("ascii", "replace").split("?", 1)[0]
            status, body, content_type = await self._route(method, path)
            reason = _REASONS.get(status, "Error")
            headers = (
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n"
                "Cache-Control: no-store\r\n\r\n"
            )
            writer.write(headers.encode("ascii") + (b"" if method == "HEAD" else body))
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT)
        except (OSError, TimeoutError):
            pass
        finally:
            writer.close()

    async def _route(self, method: str, path: str) -> tuple[int, bytes, str]:
        text = "text/plain; charset=utf-8"
        if method not in ("GET", "HEAD"):
            return 405, b"method not allowed\n", text
        if path == "/metrics":
            registry = self.metrics.exposition_registry()
            body, content_type = await asyncio.to_thread(Metrics.render, registry)
            return 200, body, content_type
        if path == "/healthz":
            return 200, b"ok\n", text
        if path == "/readyz":
            why = await self.not_ready()
            if why:
                return 503, f"not ready: {why}\n".encode(), text
            return 200, b"ready\n", text
        return 404, b"not found: try /metrics, /healthz or /readyz\n", text
