"""Routes by sender domain (PYRELAY_ROUTES_FILE), reloads, the fallback relay and per-route rates
and throttling, against real aiosmtpd upstreams."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session
from procs import relay_env

from conftest import MESSAGE, PASSWORD, USER, LogCapture, free_port, wait_until
from pyrelay.config import HostPort
from pyrelay.errors import ConfigError
from pyrelay.routes import RouteTable, load_routes

pytestmark = pytest.mark.timeout(60)

DOMAINS = "example.org a.example b.example"


def msg(sender: str) -> bytes:
    return MESSAGE.replace(b"noreply@mail.example.org", sender.encode())


async def two_upstreams(make_upstream: Callable[..., Any]) -> tuple[Any, Any]:
    a = await make_upstream()
    b = await make_upstream()
    a.state.username, a.state.password = "user-a", "secret-a"
    b.state.username, b.state.password = "user-b", "secret-b"
    return a, b


def write_routes(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    future = time.time() + 2  # a new mtime even within the file system's granularity
    os.utime(path, (future, future))


async def test_sender_domains_choose_relay_and_credentials_and_reload(
    make_upstream: Callable[..., Any], make_relay: Callable[..., Any], tmp_path: Path, logs: Any
) -> None:
    default = await make_upstream()
    a, b = await two_upstreams(make_upstream)
    (tmp_path / "b.secret").write_text("secret-b\n")
    routes = tmp_path / "routes.toml"
    write_routes(
        routes,
        f"""
[[route]]
senders = ["a.example"]
relayhost = "{a.relayhost}"
username = "user-a"
password = "secret-a"

[[route]]
name = "bee"
senders = ["B.Example"]
relayhost = "{b.relayhost}"
username = "user-b"
password_file = "b.secret"
""",
    )
    async with make_relay(
        default, routes_file=routes, allowed_sender_domains=DOMAINS, masquerade_domains=""
    ) as relay:
        await relay.asend("app@a.example", ["x@dest.test"], msg("app@a.example"))
        await relay.asend("app@mail.b.example", ["y@dest.test"], msg("app@mail.b.example"))
        await relay.asend("app@example.org", ["z@dest.test"], MESSAGE)
        await wait_until(lambda: len(a.state.messages) == 1 and len(b.state.messages) == 1)
        await wait_until(lambda: len(default.state.messages) == 1)
        assert (a.state.messages[0].user, a.state.messages[0].mail_from) == (
            "user-a",
            "app@a.example",
        )
        assert (b.state.messages[0].user, b.state.messages[0].rcpt_tos) == (
            "user-b",
            ["y@dest.test"],
        )
        assert default.state.messages[0].user == USER
        assert logs.has("event=sent", f"relay=127.0.0.1[127.0.0.1]:{b.port}", "to=<y@dest.test>")

        # A broken file keeps the routes in force and names file, line and key.
        write_routes(routes, routes.read_text().replace('name = "bee"', 'name = "bee"\nrate = "x"'))
        await asyncio.sleep(1.1)
        await relay.asend("app@b.example", ["y2@dest.test"], msg("app@b.example"))
        await wait_until(lambda: len(b.state.messages) == 2)
        assert logs.has("event=routes_reload_failed", "line 10", "route[1].rate", "invalid rate")

        # a.example now goes through b, with b's credentials: no restart.
        write_routes(
            routes,
            f"""
[[route]]
senders = ["a.example", "b.example"]
relayhost = "{b.relayhost}"
username = "user-b"
password = "secret-b"
""",
        )
        await asyncio.sleep(1.1)
        await relay.asend("app@a.example", ["x2@dest.test"], msg("app@a.example"))
        await wait_until(lambda: len(b.state.messages) == 3)
        assert b.state.messages[2].rcpt_tos == ["x2@dest.test"]
        assert len(a.state.messages) == 1
        assert logs.has("event=routes_loaded")


def test_routes_file_errors_name_file_line_and_key(tmp_path: Path) -> None:
    from conftest import relay_settings

    settings = relay_settings(tmp_path, None, None)
    path = tmp_path / "routes.toml"
    cases = {
        '[[route]]\nsenders = ["a.example"]\nrelayhost = "smtp.x"\nrate = "fast"\n': (
            "line 4: route[0].rate: invalid rate 'fast'"
        ),
        '[[route]]\nsenders = ["a.example"]\n': "line 1: route[0].relayhost: required but not set",
        '[[route]]\nsenders = ["a.example"]\nrelayhost = "h"\nusrname = "u"\n': (
            "line 4: route[0].usrname: unknown key"
        ),
        '[[route]]\nsenders = ["a.example"]\nrelayhost = "h"\n\n[[route]]\nsenders = '
        '["A.example"]\nrelayhost = "h2"\n': "line 6: route[1].senders: a.example is already",
        "[[route]\n": "line 1: Expected ']]'",
        '[[route]]\nsenders = ["a.example"]\nrelayhost = "h"\npassword_file = "nope"\n': (
            "route[0].password_file: cannot read"
        ),
    }
    for text, expected in cases.items():
        path.write_text(text)
        with pytest.raises(ConfigError) as err:
            load_routes(path, settings)
        assert str(err.value).startswith(f"PYRELAY_ROUTES_FILE: {path}"), err.value
        assert expected in str(err.value), (text, str(err.value))
    path.write_text(
        '[[route]]\nsenders = ["bücher.example"]\nrelayhost = "[smtp.x]:587"\n'
        'fallback = "smtp.y"\nusername = "u"\npassword = "p"\n'
    )
    table = RouteTable(settings.replace(routes_file=path))
    route = table.select("a@shop.xn--bcher-kva.example")
    assert route.primary is not None and route.primary.relayhost == HostPort("smtp.x", 587)
    assert route.fallback is not None and route.fallback.username.get_secret_value() == "u"
    assert table.select("a@example.org").name == "default"
    assert table.select("").name == "default"


def test_bad_routes_file_exits_2_at_start(tmp_path: Path) -> None:
    path = tmp_path / "routes.toml"
    path.write_text('[[route]]\nsenders = ["a.example"]\nrelayhost = "h"\nconcurrency = 0\n')
    env = relay_env(
        relay_port=free_port(),
        sink_port=9,
        spool=tmp_path / "spool",
        PYRELAY_ROUTES_FILE=str(path),
    )
    run = subprocess.run(
        [sys.executable, "-m", "pyrelay"], env=env, capture_output=True, timeout=30, text=True
    )
    assert run.returncode == 2, run.stderr
    assert f"PYRELAY_ROUTES_FILE: {path} line 4: route[0].concurrency" in run.stderr
    config = subprocess.run(
        [sys.executable, "-m", "pyrelay", "config"], env=env, capture_output=True, timeout=30
    )
    assert config.returncode == 2


def test_config_shows_routes_masked_and_check_upstream_all(tmp_path: Path) -> None:
    path = tmp_path / "routes.toml"
    path.write_text(
        '[[route]]\nsenders = ["a.example"]\nrelayhost = "[127.0.0.1]:9"\nusername = "u-a"\n'
        'password = "TOPSECRET-A"\nrate = "14/s"\nfallback = "[127.0.0.1]:9"\n'
    )
    env = relay_env(
        relay_port=free_port(),
        sink_port=9,
        spool=tmp_path / "spool",
        PYRELAY_ROUTES_FILE=str(path),
        RELAYHOST_FALLBACK="[127.0.0.1]:9",
        RELAYHOST_USERNAME="u",
        RELAYHOST_PASSWORD="TOPSECRET-DEFAULT",
        RELAYHOST_TLS_LEVEL="may",
    )
    out = subprocess.run(
        [sys.executable, "-m", "pyrelay", "config"], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "TOPSECRET" not in out.stdout
    assert "[route a.example]" in out.stdout and "rate = 14/s" in out.stdout
    assert "relayhost = 127.0.0.1:9 (user u-a)" in out.stdout
    assert "[route default]" in out.stdout and "fallback = 127.0.0.1:9 (user u)" in out.stdout
    check = subprocess.run(
        [sys.executable, "-m", "pyrelay", "check-upstream", "--all", "--timeout", "2"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert check.returncode == 1
    assert check.stdout.count("== route") == 4, check.stdout
    assert "== route a.example (fallback)" in check.stdout
    assert "TOPSECRET" not in check.stdout + check.stderr


async def test_primary_down_fallback_takes_it_in_the_same_attempt(
    make_upstream: Callable[..., Any], make_relay: Callable[..., Any], logs: LogCapture
) -> None:
    fallback = await make_upstream()
    dead = free_port()
    async with make_relay(
        None, relayhost=f"[127.0.0.1]:{dead}", relayhost_fallback=fallback.relayhost
    ) as relay:
        await relay.asend("app@example.org", ["x@dest.test"], MESSAGE)
        await wait_until(lambda: len(fallback.state.messages) == 1)
        # RELAYHOST's credentials, since RELAYHOST_FALLBACK_USERNAME is unset.
        assert fallback.state.messages[0].user == USER
        await wait_until(lambda: logs.has("event=sent"))
        assert logs.has("event=fallback", f"]:{dead}", "Connection refused")
        assert logs.has("event=sent", f"relay=127.0.0.1[127.0.0.1]:{fallback.port}")
        assert not logs.has("event=deferred")
        # Primary suspended now: the next message goes straight to the fallback.
        await relay.asend("app@example.org", ["y@dest.test"], MESSAGE)
        await wait_until(lambda: len(fallback.state.messages) == 2)
        assert not logs.has("event=deferred")


async def test_route_fallback_after_4xx_with_own_credentials(
    make_upstream: Callable[..., Any], make_relay: Callable[..., Any], tmp_path: Path
) -> None:
    a, b = await two_upstreams(make_upstream)
    a.state.mail_reply = "451 4.3.0 Temporary local problem"
    routes = tmp_path / "routes.toml"
    routes.write_text(
        f'[[route]]\nsenders = ["a.example"]\nrelayhost = "{a.relayhost}"\nusername = "user-a"\n'
        f'password = "secret-a"\nfallback = "{b.relayhost}"\nfallback_username = "user-b"\n'
        'fallback_password = "secret-b"\n'
    )
    async with make_relay(
        None, routes_file=routes, allowed_sender_domains=DOMAINS, masquerade_domains=""
    ) as relay:
        await relay.asend("app@a.example", ["x@dest.test"], msg("app@a.example"))
        await wait_until(lambda: len(b.state.messages) == 1)
        assert b.state.messages[0].user == "user-b" and not a.state.messages


async def test_route_rate_2_per_second(
    make_upstream: Callable[..., Any], make_relay: Callable[..., Any], tmp_path: Path
) -> None:
    up = await make_upstream()
    routes = tmp_path / "routes.toml"
    routes.write_text(
        f'[[route]]\nsenders = ["example.org"]\nrelayhost = "{up.relayhost}"\n'
        f'username = "{USER}"\npassword = "{PASSWORD}"\nrate = "2/s"\n'
    )
    async with make_relay(None, routes_file=routes, concurrency=4) as relay:
        start = time.monotonic()
        for i in range(10):
            await relay.asend("app@example.org", [f"r{i}@dest.test"], MESSAGE)
        await wait_until(lambda: len(up.state.messages) == 10, timeout=20)
        elapsed = time.monotonic() - start
    assert elapsed >= 4.0, elapsed


class Throttler:
    """An upstream that answers ``454 Throttling failure`` to every other message."""

    def __init__(self) -> None:
        self.mails = 0
        self.delivered: list[str] = []
        self.times: list[float] = []

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        self.mails += 1
        if self.mails % 2 == 0:
            return "454 4.7.0 Throttling failure: Maximum sending rate exceeded."
        envelope.mail_from = address
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.delivered.extend(envelope.rcpt_tos)
        self.times.append(time.monotonic())
        return "250 2.0.0 Ok"


async def test_throttling_defers_without_counting_and_halves_the_rate(
    make_relay: Callable[..., Any], tmp_path: Path, logs: LogCapture
) -> None:
    handler = Throttler()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SMTP(handler), host="127.0.0.1", port=0)
    port = server.sockets[0].getsockname()[1]
    routes = tmp_path / "routes.toml"
    routes.write_text(
        f'[[route]]\nsenders = ["example.org"]\nrelayhost = "[127.0.0.1]:{port}"\n'
        'tls_level = "none"\nrate = "20/s"\n'
    )
    try:
        # A counted attempt would wait PYRELAY_MIN_BACKOFF (60 s): far beyond this test.
        async with make_relay(
            None,
            routes_file=routes,
            relayhost_username="",
            relayhost_password="",
            min_backoff="60s",
            max_backoff="120s",
        ) as relay:
            for i in range(6):
                await relay.asend("app@example.org", [f"r{i}@dest.test"], MESSAGE)
            await wait_until(lambda: len(handler.delivered) == 6, timeout=30)
            agents = relay.relay.scheduler.agents
            assert agents.limiter.current("example.org", 20.0) < 20.0
    finally:
        server.close()
    assert sorted(handler.delivered) == [f"r{i}@dest.test" for i in range(6)]
    assert logs.has("event=throttled", "route=example.org")
    assert logs.has("event=deferred", "Throttling failure")
    assert not logs.has("event=bounced")


async def test_queue_by_destination(make_relay: Callable[..., Any], tmp_path: Path) -> None:
    async with make_relay(None, relayhost=f"[127.0.0.1]:{free_port()}") as relay:
        await relay.asend("app@example.org", ["a@one.test", "b@one.test", "c@two.test"], MESSAGE)
        await relay.asend("app@example.org", ["d@one.test"], MESSAGE)
        spool = tmp_path / "spool"
        await wait_until(lambda: len(list((spool / "deferred").iterdir())) == 2)
        env = relay_env(relay_port=free_port(), sink_port=9, spool=spool)
        out = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "pyrelay", "queue", "--by-destination", "--json"],
            env=env,
            capture_output=True,
            text=True,
        )
    assert out.returncode == 0, out.stderr
    assert __import__("json").loads(out.stdout) == {
        "one.test": {"recipients": 3, "messages": 2},
        "two.test": {"recipients": 1, "messages": 1},
    }
