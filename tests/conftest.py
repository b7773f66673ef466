"""Shared fixtures: a real upstream (aiosmtpd + STARTTLS from trustme + AUTH), pyrelay in-process
on ephemeral ports, a blocking stdlib ``smtplib`` client like a web app, and captured logs."""

from __future__ import annotations

import asyncio
import io
import smtplib
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
from faulty_upstream import FaultUpstream
from procs import free_port as free_port  # re-exported: one helper for every test module

from pyrelay.app import Relay
from pyrelay.config import Settings, load_settings
from pyrelay.logging import configure_logging
from pyrelay.sink import SinkState, start_sink

USER = "apikey"
PASSWORD = "S3cr3t-Pa55w0rd-XYZZY"


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture(scope="session")
def server_tls(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost", "upstream.test").configure_cert(ctx)
    return ctx


class LogCapture(io.StringIO):
    def lines(self) -> list[str]:
        return self.getvalue().splitlines()

    def has(self, *words: str) -> bool:
        return any(all(w in line for w in words) for line in self.lines())


@pytest.fixture
def logs() -> Iterator[LogCapture]:
    stream = LogCapture()
    configure_logging("console", "debug", stream=stream)
    yield stream
    configure_logging("console", "info")


@dataclass
class Upstream:
    state: SinkState
    server: asyncio.Server
    port: int
    host: str = "127.0.0.1"

    @property
    def relayhost(self) -> str:
        return f"[{self.host}]:{self.port}"

    async def stop(self) -> None:
        self.server.close()
        try:
            await asyncio.wait_for(self.server.wait_closed(), 1)
        except TimeoutError:
            pass


@pytest.fixture
async def make_upstream(server_tls: ssl.SSLContext) -> AsyncIterator[Callable[..., Any]]:
    started: list[Upstream] = []

    async def make(
        *,
        tls: bool = True,
        auth: bool = True,
        port: int = 0,
        implicit_tls: bool = False,
        smtputf8: bool = True,
    ) -> Upstream:
        state = SinkState(username=USER if auth else None, password=PASSWORD if auth else None)
        server = await start_sink(
            state,
            port=port,
            tls_context=server_tls if tls else None,
            implicit_tls=implicit_tls,
            smtputf8=smtputf8,
        )
        up = Upstream(state, server, server.sockets[0].getsockname()[1])
        started.append(up)
        return up

    yield make
    for up in started:
        await up.stop()


@pytest.fixture
async def upstream(make_upstream: Callable[..., Any]) -> Upstream:
    up: Upstream = await make_upstream()
    return up


def relay_settings(
    tmp_path: Path, up: Upstream | None, ca_file: Path | None, **overrides: Any
) -> Settings:
    values: dict[str, Any] = {
        "relayhost": up.relayhost if up else "[127.0.0.1]:9",
        "relayhost_username": USER,
        "relayhost_password": PASSWORD,
        "tls_level": "secure",
        "tls_ca_file": ca_file,
        "allowed_sender_domains": "example.org",
        "masquerade_domains": "example.org",
        "listen": "127.0.0.1:0",
        "spool_dir": tmp_path / "spool",
        "hostname": "relay.test",
        "min_backoff": "0.2s",
        "max_backoff": "1s",
        "shutdown_grace": "2s",
        "upstream_idle_timeout": "1s",
        "concurrency": 4,
        "upstream_command_timeout": "5s",
        "upstream_connect_timeout": "5s",
    }
    values.update(overrides)
    return load_settings(_env_file=None, **values)


class RunningRelay:
    def __init__(self, relay: Relay) -> None:
        self.relay = relay

    @property
    def port(self) -> int:
        return self.relay.listener.ports[0][1]

    def client(self) -> smtplib.SMTP:
        return smtplib.SMTP("127.0.0.1", self.port, local_hostname="app.test", timeout=10)

    def send(self, sender: str, rcpts: list[str], message: bytes | str) -> dict[str, Any]:
        with self.client() as smtp:
            return smtp.sendmail(sender, rcpts, message)

    async def asend(self, sender: str, rcpts: list[str], message: bytes | str) -> dict[str, Any]:
        return await asyncio.to_thread(self.send, sender, rcpts, message)


@asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[RunningRelay]:
    relay = Relay(settings)
    await relay.startup()
    try:
        yield RunningRelay(relay)
    finally:
        await relay.shutdown()


@pytest.fixture
def make_relay(tmp_path: Path, ca_file: Path, logs: LogCapture) -> Callable[..., Any]:
    def make(up: Upstream | None, **overrides: Any) -> Any:
        return running(relay_settings(tmp_path, up, ca_file, **overrides))

    return make


async def wait_until(
    predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition"
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")  # pragma: no cover
        await asyncio.sleep(0.02)


MESSAGE = (
    b"From: OpenDLP <noreply@mail.example.org>\r\n"
    b"To: Alice <alice@dest.test>\r\n"
    b"Subject: Your registration\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"Hello Alice,\r\n"
    b".leading dot line\r\n"
    b"From: not-a-header@mail.example.org\r\n"
    b"\r\n"
    b"Bye\r\n"
)


MakeFault = Callable[..., Awaitable[FaultUpstream]]


@pytest.fixture
async def fault(server_tls: ssl.SSLContext) -> AsyncIterator[MakeFault]:
    """Factory for raw fault-injecting upstreams (tests/faulty_upstream.py), stopped afterwards."""
    made: list[FaultUpstream] = []

    async def make(**kwargs: Any) -> FaultUpstream:
        kwargs.setdefault("tls_context", server_tls)
        up = await FaultUpstream(**kwargs).start()
        made.append(up)
        return up

    yield make
    for up in made:
        await up.stop()
