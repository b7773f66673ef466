"""Issue 11: SMTP AUTH for clients, with real clients.

A client outside MYNETWORKS (its socket bound to 127.0.0.2 while MYNETWORKS is 127.0.0.1/32)
is refused without AUTH, relays with AUTH over TLS, and is refused a sender outside its list;
``swaks --tls --auth``; ``pyrelay user add`` and a users file re-read on change; the AUTH
error paths (before STARTTLS, wrong password, bad base64, unknown mechanism, ``*``), the
growing delay after failures, and the password in no log line.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import shutil
import smtplib
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import bcrypt
import pytest
from faulty_upstream import RawClient

from conftest import MESSAGE, LogCapture, Upstream, wait_until

OUTSIDE = "127.0.0.2"
SECRET = "Client-Pa55word-QUUX"
SECRET_FORMS = [
    SECRET,
    base64.b64encode(SECRET.encode()).decode(),
    base64.b64encode(f"\0app1\0{SECRET}".encode()).decode(),
]
AUTH_FAILED = "535 5.7.8 Error: authentication failed"
NEEDS_TLS = "538 5.7.11 Encryption required for requested authentication mechanism"


def users_file(path: Path, *lines: tuple[str, str, str]) -> Path:
    """A users file; bcrypt cost 4 keeps the tests fast (the format is the same)."""
    text = "# name hash [senders]\n"
    for name, password, senders in lines:
        hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(4)).decode()
        text += f"{name} {hashed} {senders}\n"
    tmp = path.with_suffix(".new")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def unverified() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    return ctx


async def tls_client(port: int, *, source: str = OUTSIDE) -> RawClient:
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0)), 5
    )
    client = RawClient(reader, writer)
    assert (await client.reply()).startswith("220 ")
    assert "AUTH" not in await client.cmd("EHLO app.test")  # never offered in plain text
    assert (await client.cmd("STARTTLS")).startswith("220 ")
    await client.writer.start_tls(unverified())
    assert "250-AUTH PLAIN LOGIN" in await client.cmd("EHLO app.test")
    return client


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


@pytest.fixture
def auth_relay(make_relay: Any, upstream: Upstream, tmp_path: Path) -> Any:
    path = users_file(tmp_path / "users", ("app1", SECRET, "@example.org billing@example.net"))

    def make(**overrides: Any) -> Any:
        values: dict[str, Any] = {
            "mynetworks": "127.0.0.1/32",
            "smtpd_tls_level": "may",
            "smtpd_users_file": path,
            "smtpd_sasl_users": "app2:second-Pa55,app3:third-Pa55",
            "allowed_sender_domains": "example.org",
        }
        values.update(overrides)
        return make_relay(upstream, **values)

    return make


def outside_send(port: int, sender: str, login: tuple[str, str] | None) -> Any:
    with smtplib.SMTP(
        "127.0.0.1", port, timeout=10, source_address=(OUTSIDE, 0), local_hostname="app.test"
    ) as smtp:
        smtp.starttls()
        if login:
            smtp.login(*login)
        return smtp.sendmail(sender, ["r@dest.test"], MESSAGE)


async def test_client_outside_mynetworks_relays_only_with_auth_over_tls(
    auth_relay: Any, upstream: Upstream, logs: LogCapture
) -> None:
    async with auth_relay() as relay:
        # Without AUTH: exactly as today.
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            await asyncio.to_thread(outside_send, relay.port, "a@example.org", None)
        code, text = refused.value.recipients["r@dest.test"]
        assert (code, text.decode()) == (
            554,
            f"5.7.1 <{OUTSIDE}>: Client host rejected: Access denied",
        )
        # With AUTH over TLS: relays, from its own senders (a domain, or one address).
        for sender in ("news@example.org", "billing@example.net"):
            result = await asyncio.to_thread(outside_send, relay.port, sender, ("app1", SECRET))
            assert result == {}
        await wait_until(lambda: len(upstream.state.messages) == 2, what="deliveries")
        # A sender outside its list (even one in ALLOWED_SENDER_DOMAINS' parent): refused.
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            await asyncio.to_thread(outside_send, relay.port, "x@example.net", ("app1", SECRET))
        code, text = refused.value.recipients["r@dest.test"]
        assert (code, text.decode()) == (
            553,
            "5.7.1 <x@example.net>: Sender address rejected: not owned by user app1",
        )
        # A user without a list (SMTPD_SASL_USERS) is held to ALLOWED_SENDER_DOMAINS.
        login2 = ("app2", "second-Pa55")
        assert await asyncio.to_thread(outside_send, relay.port, "a@example.org", login2) == {}
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            await asyncio.to_thread(outside_send, relay.port, "a@example.net", login2)
        await wait_until(lambda: len(upstream.state.messages) == 3, what="deliveries")
    content = upstream.state.messages[0].content.decode()
    assert "by relay.test (pyrelay) with ESMTPSA id" in content
    assert logs.has("event=queued", "sasl_username=app1", f"client={OUTSIDE}")
    assert logs.has("event=queued", "sasl_username=app2")
    for line in logs.lines():
        assert "second-Pa55" not in line and SECRET not in line


async def test_auth_error_paths_and_growing_delay_and_no_password_in_logs(
    auth_relay: Any, logs: LogCapture, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with auth_relay() as relay:
        # Before STARTTLS: 538, and AUTH is not advertised.
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", relay.port, local_addr=(OUTSIDE, 0)
        )
        client = RawClient(reader, writer)
        await client.reply()
        assert "AUTH" not in await client.cmd("EHLO app.test")
        assert await client.cmd(f"AUTH PLAIN {plain('app1', SECRET)}") == NEEDS_TLS
        client.close()

        client = await tls_client(relay.port)
        assert await client.cmd("AUTH PLAIN !!!not-base64") == "501 5.5.2 Can't decode base64"
        assert await client.cmd("AUTH CRAM-MD5") == "504 5.5.4 Unrecognized authentication type"
        assert (await client.cmd("AUTH LOGIN")).startswith("334 ")
        assert await client.cmd("*") == "501 5.7.0 Auth aborted"
        # Wrong passwords: 535, each further attempt from this client waits longer.
        took = []
        for attempt in range(3):
            start = time.monotonic()
            wrong = plain("app1", f"{SECRET}-wrong{attempt}")
            assert await client.cmd(f"AUTH PLAIN {wrong}", timeout=20) == AUTH_FAILED
            took.append(time.monotonic() - start)
        assert took[0] < 0.4, took
        assert took[2] >= 0.9, took  # 0, 0.5, 1 seconds
        assert took[2] > took[1] > took[0]
        # The right password still works (after its wait), by LOGIN too.
        assert (await client.cmd("AUTH LOGIN")).startswith("334 ")
        assert (await client.cmd(base64.b64encode(b"app1").decode())).startswith("334 ")
        ok = await client.cmd(base64.b64encode(SECRET.encode()).decode(), timeout=20)
        assert ok == "235 2.7.0 Authentication successful"
        assert await client.cmd("MAIL FROM:<a@example.org>") == "250 2.1.0 Ok"
        assert await client.cmd("RCPT TO:<r@dest.test>") == "250 2.1.5 Ok"
        client.close()
        # An unknown user fails the same way.
        client = await tls_client(relay.port, source="127.0.0.3")
        assert await client.cmd(f"AUTH PLAIN {plain('nobody', SECRET)}") == AUTH_FAILED
        client.close()
        await wait_until(lambda: logs.has("event=auth_failed", "sasl_username=nobody"))
    assert logs.has("event=auth_failed", f"client={OUTSIDE}", "sasl_username=app1", "failures=3")
    assert logs.has("event=authenticated", "sasl_username=app1", "sasl_method=LOGIN")
    records = [r.getMessage() for r in caplog.records]
    assert len(logs.lines()) > 10 and len(records) > 10
    for text in logs.lines() + records:
        for form in SECRET_FORMS:
            assert form not in text, f"the password leaked: {text}"


async def test_auth_without_users_is_not_enabled(make_relay: Any, upstream: Upstream) -> None:
    async with make_relay(upstream, smtpd_tls_level="may") as relay:
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        client = RawClient(reader, writer)
        await client.reply()
        await client.cmd("EHLO app.test")
        await client.cmd("STARTTLS")
        await client.writer.start_tls(unverified())
        assert "AUTH" not in await client.cmd("EHLO app.test")
        assert await client.cmd("AUTH PLAIN " + plain("a", "b")) == (
            "503 5.5.1 Error: authentication not enabled"
        )
        client.close()


# -- swaks, `pyrelay user add`, reload ----------------------------------------------------------


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{tool} is not installed (.ci/run installs it)")
        pytest.skip(f"{tool} is not installed")
    return path


def user_add(name: str, password: str, *senders: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "pyrelay", "user", "add", name, *senders],
        input=password + "\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert password not in result.stdout + result.stderr
    return result.stdout.strip()


async def test_swaks_tls_auth_with_a_user_added_while_running(
    auth_relay: Any, upstream: Upstream, tmp_path: Path, logs: LogCapture
) -> None:
    swaks = need("swaks")
    line = await asyncio.to_thread(user_add, "swaks-user", "Swaks-Pa55", "@example.org")
    name, hashed, sender = line.split()
    assert (name, sender) == ("swaks-user", "@example.org")
    assert bcrypt.checkpw(b"Swaks-Pa55", hashed.encode())
    path = tmp_path / "users"
    async with auth_relay() as relay:

        async def run_swaks() -> tuple[int, str]:
            proc = await asyncio.create_subprocess_exec(
                swaks,
                "--server",
                f"127.0.0.1:{relay.port}",
                "--local-interface",
                OUTSIDE,
                "--tls",
                "--auth",
                "PLAIN",
                "--auth-user",
                "swaks-user",
                "--auth-password",
                "Swaks-Pa55",
                "--from",
                "swaks@example.org",
                "--to",
                "r@dest.test",
                "--timeout",
                "15",
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            out, _ = await asyncio.wait_for(proc.communicate(), 30)
            return proc.returncode or 0, out.decode(errors="replace")

        code, out = await run_swaks()
        assert code != 0 and AUTH_FAILED in out, out  # not in the users file yet
        # The line `pyrelay user add` printed, appended while the relay runs: re-read.
        path.write_text(path.read_text() + line + "\n")
        await asyncio.sleep(1.1)
        code, out = await run_swaks()
        assert code == 0, out
        assert "235 2.7.0 Authentication successful" in out
        await wait_until(lambda: len(upstream.state.messages) == 1, what="delivery")
    assert logs.has("event=users_file_reloaded")
    assert logs.has("event=queued", "sasl_username=swaks-user")
