"""The operator CLI as an operator runs it: ``python -m pyrelay <command>`` in a subprocess with an
explicit environment, against a relay running as a subprocess and a real upstream (the recording
sink) served by the test's own event loop.  Subprocesses are awaited with asyncio, so the loop keeps
serving the upstream while a command runs."""

from __future__ import annotations

import ast
import asyncio
import json
import os
import re
import signal
import smtplib
import ssl
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme

from conftest import PASSWORD, USER, Upstream, free_port
from pyrelay.sink import SinkState, start_sink

CLI_TIMEOUT = 20.0
_AMBIENT = re.compile(r"^(RELAYHOST|ALLOWED|ALLOW_EMPTY|PYRELAY_|MASQUERADE|POSTFIX_|MYNETWORKS)")


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def text(self) -> str:
        return self.out + self.err


class Env(dict[str, str]):
    """The environment commands and the relay run with, and the directory they run in (so that
    no stray ``.env`` is read)."""

    def __init__(self, cwd: Path, values: dict[str, str]) -> None:
        super().__init__(values)
        self.cwd = cwd

    def but(self, **changes: str | None) -> Env:
        env = Env(self.cwd, dict(self))
        for key, value in changes.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        return env

    async def run(self, *args: str) -> Result:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "pyrelay",
            *args,
            env=dict(self),
            cwd=self.cwd,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), CLI_TIMEOUT)
        except TimeoutError:  # pragma: no cover - a hung command is the failure
            proc.kill()
            await proc.wait()
            raise
        assert proc.returncode is not None
        result = Result(proc.returncode, out.decode(), err.decode())
        # Whatever a command prints, it never prints the secret.
        assert PASSWORD not in result.text
        return result


@pytest.fixture
def env(tmp_path: Path, ca_file: Path) -> Env:
    """A relay configuration pointing at nothing yet; tests set RELAYHOST.  The password comes
    from a file, as from a Docker secret."""
    secret = tmp_path / "relayhost_password"
    secret.write_text(PASSWORD + "\n")
    values = {k: v for k, v in os.environ.items() if not _AMBIENT.match(k)}
    values.update(
        RELAYHOST=f"[127.0.0.1]:{free_port()}",
        RELAYHOST_USERNAME=USER,
        RELAYHOST_PASSWORD_FILE=str(secret),
        RELAYHOST_TLS_CA_FILE=str(ca_file),
        ALLOWED_SENDER_DOMAINS="example.org",
        PYRELAY_LISTEN=f"127.0.0.1:{free_port()}",
        PYRELAY_SPOOL_DIR=str(tmp_path / "spool"),
        PYRELAY_HOSTNAME="relay.test",
        PYRELAY_MIN_BACKOFF="0.2s",
        PYRELAY_MAX_BACKOFF="1s",
        PYRELAY_SHUTDOWN_GRACE="2s",
        PYRELAY_UPSTREAM_CONNECT_TIMEOUT="5s",
        PYRELAY_UPSTREAM_COMMAND_TIMEOUT="5s",
    )
    return Env(tmp_path, values)


class RelayProcess:
    """``python -m pyrelay`` (the container's command) as a subprocess."""

    def __init__(self, env: Env) -> None:
        self.env = env
        self.port = int(env["PYRELAY_LISTEN"].rsplit(":", 1)[1])
        self.spool = Path(env["PYRELAY_SPOOL_DIR"])
        self.log_path = env.cwd / f"relay-{self.port}.log"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        log = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "pyrelay", env=dict(self.env), cwd=self.env.cwd, stderr=log
            )
        finally:
            os.close(log)
        deadline = time.monotonic() + 15
        while not (self.spool / "pyrelay.pid").exists():
            if self.proc.returncode is not None or time.monotonic() > deadline:
                raise AssertionError(f"relay did not start:\n{self.log()}")
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        except TimeoutError:  # pragma: no cover
            self.proc.kill()
            await self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def submit(self, subject: str, sender: str = "app@example.org") -> str:
        """Send a message like an application would; return its queue ID."""
        message = (
            f"From: <{sender}>\r\nTo: <{subject}@dest.test>\r\nSubject: {subject}\r\n\r\n"
            ".a line that starts with a dot\r\nbye\r\n"
        )
        with smtplib.SMTP("127.0.0.1", self.port, local_hostname="app.test", timeout=10) as smtp:
            smtp.ehlo()
            assert smtp.mail(sender)[0] == 250
            assert smtp.rcpt(f"{subject}@dest.test")[0] == 250
            code, reply = smtp.data(message.encode())
        assert code == 250, reply
        return reply.decode().rsplit(" ", 1)[1]


@pytest.fixture
async def start_relay() -> AsyncIterator[Callable[[Env], Any]]:
    started: list[RelayProcess] = []

    async def start(env: Env) -> RelayProcess:
        relay = RelayProcess(env)
        started.append(relay)
        await relay.start()
        return relay

    yield start
    for relay in started:
        await relay.stop()
        # The _FILE secret is loaded, used for AUTH, and never logged.
        assert PASSWORD not in relay.log()


async def eventually(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def subjects(up: Upstream) -> list[str]:
    found = []
    for msg in up.state.messages:
        match = re.search(rb"^Subject: (.*?)\r$", msg.content, re.M)
        found.append(match.group(1).decode() if match else "?")
    return found


# ------------------------------------------------------------------------------------ config


async def test_config_masks_secrets_filters_names_and_prints_json(env: Env) -> None:
    env = env.but(MASQUERADE_DOMAINS="example.org")
    result = await env.run("config")
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert "RELAYHOST_PASSWORD = ********" in lines
    assert f"RELAYHOST_USERNAME = {USER}" in lines
    assert "RELAYHOST_TLS_LEVEL = secure" in lines
    assert all(" = " in line for line in lines)

    # Aliases and any case, in the order asked; a _FILE name shows the secret it loads, masked.
    result = await env.run("config", "masquerade_domains", "RELAYHOST_PASSWORD_FILE")
    assert result.code == 0, result.err
    assert result.out.splitlines() == [
        "MASQUERADED_DOMAINS = example.org",
        "RELAYHOST_PASSWORD = ********",
    ]

    result = await env.run("config", "--json", "RELAYHOST", "PYRELAY_MIN_BACKOFF")
    assert result.code == 0, result.err
    assert json.loads(result.out) == {
        "RELAYHOST": "127.0.0.1:" + env["RELAYHOST"].rsplit(":", 1)[1],  # pyrelay never looks up MX
        "PYRELAY_MIN_BACKOFF": "0.2s",
    }

    result = await env.run("config", "RELAYHOST", "NO_SUCH_THING")
    assert result.code == 2
    assert result.out == ""
    assert "unknown parameter NO_SUCH_THING" in result.err


@pytest.mark.parametrize(
    ("changes", "command", "variable"),
    [
        ({"RELAYHOST": "bad:port:x"}, ["config"], "RELAYHOST"),
        ({"ALLOWED_SENDER_DOMAINS": None}, [], "ALLOWED_SENDER_DOMAINS"),  # the relay itself
        ({"PYRELAY_MIN_BACKOFF": "abc"}, ["health"], "PYRELAY_MIN_BACKOFF"),
        ({"RELAYHOST_PASSWORD_FILE": "/nonexistent/secret"}, ["queue"], "RELAYHOST_PASSWORD"),
    ],
)
async def test_invalid_config_exits_2_with_one_line_naming_the_variable(
    env: Env, changes: dict[str, str | None], command: list[str], variable: str
) -> None:
    result = await env.but(**changes).run(*command)
    assert result.code == 2
    assert result.out == ""
    lines = result.err.splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith(f"pyrelay: configuration error: {variable}")


async def test_usage_errors_exit_2(env: Env) -> None:
    assert (await env.run("queue", "frobnicate")).code == 2
    assert (await env.run("send-test")).code == 2  # --to is required
    result = await env.run("queue", "delete")
    assert result.code == 2 and "queue IDs or --all" in result.err


# ---------------------------------------------------------------------------- check-upstream


async def test_check_upstream_connection_refused(env: Env) -> None:
    port = env["RELAYHOST"].rsplit(":", 1)[1]  # free_port(): nothing listens there
    result = await env.run("check-upstream", "--timeout", "5")
    assert result.code == 1
    assert "dns: ok 127.0.0.1" in result.out
    assert f"FAIL tcp: connect to 127.0.0.1[127.0.0.1]:{port}: Connection refused" in result.out


async def test_check_upstream_untrusted_certificate(env: Env) -> None:
    # A certificate from a CA nobody configured: what a self-signed upstream looks like.
    stranger = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert("127.0.0.1").configure_cert(stranger)
    state = SinkState(username=USER, password=PASSWORD)
    server = await start_sink(state, tls_context=stranger)
    try:
        port = server.sockets[0].getsockname()[1]
        result = await env.but(RELAYHOST=f"[127.0.0.1]:{port}").run("check-upstream")
    finally:
        server.close()
    assert result.code == 1
    assert "greeting: ok 220" in result.out
    assert re.search(
        r"^FAIL tls: Server certificate not verified: 127\.0\.0\.1\[127\.0\.0\.1\]:\d+: "
        r"(self.signed|unable to get local issuer)",
        result.out,
        re.M,
    ), result.out
    assert "RELAYHOST_TLS_CA_FILE" in result.out  # the hint
    assert state.auth_attempts == []


async def test_check_upstream_authentication_failed(env: Env, upstream: Upstream) -> None:
    upstream.state.password = "not-what-the-relay-has"
    result = await env.but(RELAYHOST=upstream.relayhost).run("check-upstream")
    assert result.code == 1
    assert "tls: ok STARTTLS" in result.out
    assert (
        f"FAIL auth: SASL authentication failed; server 127.0.0.1[127.0.0.1]:{upstream.port} "
        "said: 535 5.7.8 Authentication credentials invalid"
    ) in result.out
    # The password went to the server (over TLS; once per mechanism aiosmtplib tries), but not
    # to the screen (checked by run()).
    attempts = upstream.state.auth_attempts
    assert attempts and all((a.username, a.tls) == (USER, True) for a in attempts)


async def test_check_upstream_good_server_lists_capabilities(env: Env, upstream: Upstream) -> None:
    env = env.but(RELAYHOST=upstream.relayhost)
    result = await env.run("check-upstream")
    assert result.code == 0, result.text
    lines = result.out.splitlines()
    assert [line.split(":")[0] for line in lines[1:6]] == ["dns", "tcp", "greeting", "tls", "auth"]
    assert lines[5].startswith("auth: ok 235")
    assert "OK: " in result.out
    assert "  AUTH LOGIN PLAIN" in lines or "  AUTH PLAIN LOGIN" in lines
    assert any(line.startswith("  SIZE") for line in lines)

    result = await env.run("check-upstream", "--json")
    assert result.code == 0
    report = json.loads(result.out)
    assert report["ok"] is True and report["failed_step"] is None
    assert [s["step"] for s in report["steps"]] == ["dns", "tcp", "greeting", "tls", "auth"]
    assert "auth" in report["capabilities"]
    assert upstream.state.messages == []  # a check sends nothing


async def test_check_upstream_json_reports_the_failed_step(env: Env) -> None:
    result = await env.run("check-upstream", "--json", "--timeout", "5")
    assert result.code == 1
    report = json.loads(result.out)
    assert report["ok"] is False
    assert report["failed_step"] == "tcp"
    assert "Connection refused" in report["error"]
    assert report["steps"][-1] == {"step": "tcp", "status": "failed", "detail": report["error"]}


# ------------------------------------------------------------------------------------- queue


async def test_queue_commands_change_what_is_delivered(
    env: Env, upstream: Upstream, start_relay: Any
) -> None:
    upstream.state.mail_reply = "451 4.3.0 Try again later"
    # Long backoffs: within this test only flush and release can cause a second attempt.
    env = env.but(
        RELAYHOST=upstream.relayhost, PYRELAY_MIN_BACKOFF="60s", PYRELAY_MAX_BACKOFF="120s"
    )
    relay: RelayProcess = await start_relay(env)
    ids = {}
    for name in ("alpha", "bravo", "charlie"):
        ids[name] = await asyncio.to_thread(relay.submit, name)
    a, b, c = ids["alpha"], ids["bravo"], ids["charlie"]
    deferred = relay.spool / "deferred"
    await eventually(lambda: all((deferred / q).exists() for q in ids.values()), "3 deferrals")

    result = await env.run("queue")
    assert result.code == 0, result.err
    out = result.out
    assert all(q in out for q in ids.values())
    assert "(host 127.0.0.1[127.0.0.1]" in out and "451 4.3.0 Try again later" in out
    assert "    charlie@dest.test" in out
    assert re.search(r"^-- \d+ Kbytes in 3 Requests\.$", out, re.M)

    listing = json.loads((await env.run("queue", "list", "--json")).out)
    assert listing["requests"] == 3
    by_id = {m["queue_id"]: m for m in listing["messages"]}
    assert by_id[a]["state"] == "deferred" and by_id[a]["attempts"] == 1
    assert by_id[a]["sender"] == "app@example.org"
    assert by_id[a]["recipients"] == ["alpha@dest.test"]
    assert "451 4.3.0" in by_id[a]["last_error"]

    result = await env.run("queue", "show", a)
    assert result.code == 0
    assert f"queue_id: {a}" in result.out and "state: deferred" in result.out
    assert "Subject: alpha" in result.out
    # Shown as the recipient will see it: un-stuffed, not in SMTP wire form.
    assert "\n.a line that starts with a dot\n" in result.out
    assert "..a line" not in result.out
    show = json.loads((await env.run("queue", "show", "--json", a.lower())).out)
    assert show["queue_id"] == a and "Subject: alpha" in show["message"]

    result = await env.run("queue", "hold", b)
    assert result.code == 0 and f"{b}: put on hold" in result.out
    result = await env.run("queue", "delete", c, "NOSUCHID")
    assert result.code == 1
    assert f"{c}: deleted" in result.out and "no such message: NOSUCHID" in result.err
    states = {
        m["queue_id"]: m["state"]
        for m in json.loads((await env.run("queue", "--json")).out)["messages"]
    }
    assert states == {a: "deferred", b: "hold"}

    upstream.state.mail_reply = None  # the upstream recovers
    result = await env.run("queue", "flush")
    assert result.code == 0, result.err
    assert "retry 1 deferred" in result.out
    await eventually(lambda: len(upstream.state.messages) == 1, "the flushed message")
    await asyncio.sleep(0.3)  # room for a wrong delivery of the held message to show up
    assert subjects(upstream) == ["alpha"]

    result = await env.run("queue", "release", b)
    assert result.code == 0 and f"{b}: released" in result.out
    await eventually(lambda: len(upstream.state.messages) == 2, "the released message")
    await eventually(lambda: not any(deferred.iterdir()), "an empty queue")
    assert (await env.run("queue")).out == "Mail queue is empty\n"
    assert subjects(upstream) == ["alpha", "bravo"]  # charlie was deleted

    await relay.stop()
    result = await env.run("queue", "flush")
    assert result.code == 1
    assert "the relay is not running (no pid file" in result.err


async def test_queue_delete_all_and_hold_release_without_a_running_relay(
    env: Env, upstream: Upstream, start_relay: Any
) -> None:
    upstream.state.mail_reply = "451 4.3.0 Try again later"
    env = env.but(
        RELAYHOST=upstream.relayhost, PYRELAY_MIN_BACKOFF="60s", PYRELAY_MAX_BACKOFF="60s"
    )
    relay: RelayProcess = await start_relay(env)
    first = await asyncio.to_thread(relay.submit, "one")
    second = await asyncio.to_thread(relay.submit, "two")
    deferred = relay.spool / "deferred"
    await eventually(
        lambda: (deferred / first).exists() and (deferred / second).exists(), "deferrals"
    )
    await relay.stop()

    assert (await env.run("queue", "hold", first)).code == 0
    result = await env.run("queue", "release", first)
    assert result.code == 0
    assert "note: the relay is not running" in result.out
    assert (deferred / first).exists()
    result = await env.run("queue", "delete", "--all")
    assert result.code == 0 and "2 message(s) deleted" in result.out
    assert (await env.run("queue")).out == "Mail queue is empty\n"


async def test_flush_refuses_a_stale_pid_file(env: Env, tmp_path: Path) -> None:
    spool = Path(env["PYRELAY_SPOOL_DIR"])
    (spool / "deferred").mkdir(parents=True)
    dead = await asyncio.create_subprocess_exec("true")
    await dead.wait()
    (spool / "pyrelay.pid").write_text(f"{dead.pid}\n")
    result = await env.run("queue", "flush")
    assert result.code == 1
    assert f"stale pid file {spool / 'pyrelay.pid'}: no process {dead.pid}" in result.err

    # A reused pid: the process there is not pyrelay and must not receive SIGUSR1 (it would die).
    other = await asyncio.create_subprocess_exec("sleep", "30")
    try:
        (spool / "pyrelay.pid").write_text(f"{other.pid}\n")
        result = await env.run("queue", "flush")
        assert result.code == 1
        assert "is not pyrelay" in result.err
        assert other.returncode is None
    finally:
        other.kill()
        await other.wait()


# The relay and the SMTP libraries: what ``queue flush`` (signal a pid) must not pay for loading.
_HEAVY_MODULES = (
    "pyrelay.app",
    "pyrelay.server",
    "pyrelay.scheduler",
    "pyrelay.delivery",
    "pyrelay.spool",
    "aiosmtpd",
    "aiosmtplib",
)
_CLI_MODULES = ("cli", "commands", "queue_commands", "cmdutil", "constants")


async def test_queue_flush_does_not_import_the_relay(env: Env) -> None:
    """The exit codes and the pid-file name live in the leaf ``pyrelay.constants``, so
    ``pyrelay queue flush`` runs without importing the relay or the SMTP libraries."""
    spool = Path(env["PYRELAY_SPOOL_DIR"])
    (spool / "deferred").mkdir(parents=True)
    script = (
        "import sys\n"
        "from pyrelay.cli import main\n"
        "try:\n"
        "    main(['queue', 'flush'])\n"
        "except SystemExit as exc:\n"
        "    print('exit', exc.code)\n"
        f"print('loaded', *[m for m in {_HEAVY_MODULES!r} if m in sys.modules])\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        env=dict(env),
        cwd=env.cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), CLI_TIMEOUT)
    assert proc.returncode == 0, err.decode()
    assert b"the relay is not running (no pid file" in err
    assert out.decode().splitlines() == ["exit 1", "loaded"]


def _pyrelay_imports(path: Path) -> set[str]:
    """The pyrelay modules ``path`` imports, at the top or inside functions."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "pyrelay":
                found.update(f"pyrelay.{alias.name}" for alias in node.names)
            elif node.module.startswith("pyrelay."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("pyrelay."))
    return found


def test_command_line_modules_are_not_in_an_import_cycle() -> None:
    package = Path(__file__).resolve().parents[1] / "pyrelay"
    graph = {f"pyrelay.{p.stem}": _pyrelay_imports(p) for p in package.glob("*.py")}
    for name in _CLI_MODULES:
        start = f"pyrelay.{name}"
        seen: set[str] = set()
        todo = list(graph[start])
        while todo:
            module = todo.pop()
            if module in seen:
                continue
            seen.add(module)
            todo.extend(graph.get(module, ()))
        assert start not in seen, f"{start} imports itself through {sorted(seen)}"
    assert graph["pyrelay.constants"] == set(), "pyrelay.constants must stay a leaf"


# --------------------------------------------------------------------------- send-test, health


async def test_send_test_reports_the_queue_id_and_the_message_arrives(
    env: Env, upstream: Upstream, start_relay: Any
) -> None:
    env = env.but(RELAYHOST=upstream.relayhost)
    relay: RelayProcess = await start_relay(env)
    result = await env.run("send-test", "--to", "ops@dest.test")
    assert result.code == 0, result.text
    match = re.match(r"queued as ([0-9A-F]{16}) \(from <postmaster@example\.org>", result.out)
    assert match, result.out
    await eventually(lambda: len(upstream.state.messages) == 1, "the test message")
    got = upstream.state.messages[0]
    assert got.mail_from == "postmaster@example.org" and got.rcpt_tos == ["ops@dest.test"]
    assert f"id {match.group(1)}".encode() in got.content  # the relay's Received header
    assert subjects(upstream) == ["pyrelay test message"]

    result = await env.run("send-test", "--to", "ops@dest.test", "--from", "x@evil.test", "--json")
    assert result.code == 1
    report = json.loads(result.out)
    assert report["ok"] is False and report["stage"] == "RCPT TO"
    assert report["reply"].startswith("554 5.7.1 <ops@dest.test>: Relay access denied")

    await relay.stop()
    result = await env.run("send-test", "--to", "ops@dest.test")
    assert result.code == 1
    assert f"127.0.0.1:{relay.port}: Connection refused" in result.err


async def test_health(env: Env, upstream: Upstream, start_relay: Any, tmp_path: Path) -> None:
    env = env.but(RELAYHOST=upstream.relayhost)
    await start_relay(env)
    result = await env.run("health")
    assert result.code == 0, result.text
    assert result.out.startswith("healthy:") and len(result.out.splitlines()) == 1

    down = env.but(PYRELAY_LISTEN=f"127.0.0.1:{free_port()}")
    result = await down.run("health")
    assert result.code == 1
    assert result.out.startswith("unhealthy: listener 127.0.0.1:")
    assert "Connection refused" in result.out and "spool" not in result.out

    # Tests run as root, which chmod cannot stop; a spool whose tmp/ is a regular file fails
    # the same create+fsync for everyone.
    broken = tmp_path / "broken-spool"
    broken.mkdir()
    (broken / "tmp").write_text("not a directory")
    result = await env.but(PYRELAY_SPOOL_DIR=str(broken)).run("health")
    assert result.code == 1
    assert result.out == f"unhealthy: spool {broken}: not writable: Not a directory\n"


# -------------------------------------------------------------------------------------- demo


async def test_demo_needs_no_configuration_and_shows_the_delivered_message(env: Env) -> None:
    # A broken ambient configuration must not leak into the demo.
    env = env.but(RELAYHOST="bad:port:x", PYRELAY_LISTEN="256.0.0.1:1", ALLOWED_SENDER_DOMAINS=None)
    result = await env.run("demo")
    assert result.code == 0, result.text
    out = result.out
    assert "250 2.0.0 Ok: queued as" in out
    assert "event=sent" in out and "dsn=2.0.0" in out
    assert "TLS:       yes" in out and "AUTH:      demo" in out
    assert "RCPT TO:   <alice@example.net>" in out
    assert "   Subject: Hello from pyrelay demo" in out
    assert "   Received: from app.demo" in out
