"""Issue 11: TLS on the listener, with real clients.

OpenDLP's adapter (stdlib smtplib, ``starttls()`` without a context), nodemailer with its
default options (from npm), ``smtplib.SMTP_SSL`` on a ``tls://`` listener, ``openssl s_client
-starttls smtp`` across a certificate renewal, the ``encrypt`` level, and the 454 plus the
operator's warning when a client asks for TLS while it is off.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import shutil
import smtplib
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trustme
from faulty_upstream import RawClient

from conftest import MESSAGE, LogCapture, Upstream, wait_until
from pyrelay.smtpd_tls import read_cert_info

ROOT = Path(__file__).resolve().parents[1]
STARTTLS_454 = "454 4.7.0 TLS not available"
MUST_STARTTLS = "530 5.7.0 Must issue a STARTTLS command first"


def need(tool: str) -> str:
    """The tool's path; skipped locally without it, a failure under CI (.ci/run installs it)."""
    path = shutil.which(tool)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{tool} is not installed (.ci/run installs it)")
        pytest.skip(f"{tool} is not installed")
    return path


def write_cert(ca: trustme.CA, directory: Path, name: str, **kwargs: Any) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 with ``name`` as its CN: chain and key in two PEM files,
    each replaced atomically (as cert-manager and certbot do)."""
    leaf = ca.issue_cert("127.0.0.1", "localhost", name, common_name=name, **kwargs)
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "tls.crt", directory / "tls.key"
    for path, blob in ((cert, b"".join(b.bytes() for b in leaf.cert_chain_pems)),
                       (key, leaf.private_key_pem.bytes())):  # fmt: skip
        tmp = path.with_suffix(".new")
        tmp.write_bytes(blob)
        os.replace(tmp, path)
    return cert, key


def received_header(upstream: Upstream) -> str:
    content = upstream.state.messages[-1].content.decode()
    return content.split("\r\n\r\n", 1)[0].split("Received:", 1)[1].split("\r\n\t", 2)[1]


# -- OpenDLP's default: SMTP_USE_TLS=true ----------------------------------------------------


def opendlp_send(port: int) -> dict[str, Any]:
    """What OpenDLP's smtplib adapter does with SMTP_USE_TLS=true (no context, no login)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        smtp.starttls()
        return smtp.sendmail("noreply@example.org", ["alice@dest.test"], MESSAGE)


async def test_opendlp_adapter_starttls_with_level_may_and_no_certificate(
    upstream: Upstream, make_relay: Any, tmp_path: Path, logs: LogCapture
) -> None:
    async with make_relay(upstream, smtpd_tls_level="may") as relay:
        assert await asyncio.to_thread(opendlp_send, relay.port) == {}
        await wait_until(lambda: len(upstream.state.messages) == 1, what="delivery")
    assert "with ESMTPS id" in received_header(upstream)
    # The self-signed certificate for PYRELAY_HOSTNAME is kept in the spool volume ...
    pem = tmp_path / "spool" / "tls" / "selfsigned.pem"
    first = read_cert_info(pem)
    assert first.subject == "CN=relay.test"
    assert logs.has("event=tls_certificate_generated")
    # ... so a restart presents the same one.
    async with make_relay(upstream, smtpd_tls_level="may") as relay:
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE

        def peer_cert() -> bytes:
            with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as smtp:
                smtp.starttls(context=ctx)
                der = smtp.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]
                assert der is not None
                return der

        der = await asyncio.to_thread(peer_cert)
    assert read_cert_info(pem).sha256 == first.sha256
    assert ssl.DER_cert_to_PEM_cert(der) in pem.read_text()


async def test_starttls_while_off_gets_454_and_one_warning_naming_both_fixes(
    upstream: Upstream, make_relay: Any, logs: LogCapture
) -> None:
    async with make_relay(upstream) as relay:

        def ask() -> tuple[int, bytes, bool]:
            with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as smtp:
                smtp.ehlo()
                offered = smtp.has_extn("starttls")
                code, text = smtp.docmd("STARTTLS")
                # The session goes on in plain text, as before.
                assert smtp.sendmail("a@example.org", ["b@dest.test"], MESSAGE) == {}
                return code, text, offered

        for _ in range(2):
            code, text, offered = await asyncio.to_thread(ask)
            assert f"{code} {text.decode()}" == STARTTLS_454
            assert not offered
        await wait_until(lambda: len(upstream.state.messages) == 2, what="deliveries")
    warnings = [line for line in logs.lines() if "event=starttls_refused" in line]
    assert len(warnings) == 1, warnings
    assert "client=127.0.0.1" in warnings[0]
    assert "SMTP_USE_TLS=false" in warnings[0]
    assert "PYRELAY_SMTPD_TLS_LEVEL=may" in warnings[0]
    assert "PYRELAY_TLS_CERT_FILE" in warnings[0]


async def test_encrypt_level_refuses_mail_before_starttls(
    upstream: Upstream, make_relay: Any
) -> None:
    async with make_relay(upstream, smtpd_tls_level="encrypt") as relay:
        client = await RawClient.connect(relay.port)
        assert (await client.reply()).startswith("220 ")
        ehlo = await client.cmd("EHLO app.test")
        assert "250-STARTTLS" in ehlo
        assert await client.cmd("MAIL FROM:<a@example.org>") == MUST_STARTTLS
        assert (await client.cmd("STARTTLS")).startswith("220 ")
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        await client.writer.start_tls(ctx)
        assert "STARTTLS" not in await client.cmd("EHLO app.test")
        assert await client.cmd("STARTTLS") == "554 5.5.1 Error: TLS already active"
        assert await client.cmd("MAIL FROM:<a@example.org>") == "250 2.1.0 Ok"
        client.close()


# -- implicit TLS (RFC 8314) ------------------------------------------------------------------


async def test_smtp_ssl_on_a_tls_listener_with_the_configured_certificate(
    upstream: Upstream, make_relay: Any, ca: trustme.CA, ca_file: Path, tmp_path: Path
) -> None:
    cert, key = write_cert(ca, tmp_path / "certs", "relay.test")
    async with make_relay(
        upstream,
        listen="127.0.0.1:0 tls://127.0.0.1:0",
        tls_cert_file=cert,
        tls_key_file=key,
    ) as relay:
        plain_port, tls_port = relay.relay.listener.ports[0][1], relay.relay.listener.ports[1][1]
        ctx = ssl.create_default_context(cafile=str(ca_file))  # verifies the chain and name

        def send() -> tuple[bool, bool]:
            with smtplib.SMTP_SSL("127.0.0.1", tls_port, context=ctx, timeout=10) as smtp:
                smtp.ehlo()
                starttls = smtp.has_extn("starttls")
                smtp.sendmail("a@example.org", ["b@dest.test"], MESSAGE)
            with smtplib.SMTP("127.0.0.1", plain_port, timeout=10) as smtp:
                smtp.ehlo()
                return starttls, smtp.has_extn("starttls")

        starttls_on_tls, starttls_on_plain = await asyncio.to_thread(send)
        await wait_until(lambda: len(upstream.state.messages) == 1, what="delivery")
    assert not starttls_on_tls  # already encrypted
    assert starttls_on_plain  # a certificate configured: `may` by default
    assert "with ESMTPS id" in received_header(upstream)


# -- certificate renewal ---------------------------------------------------------------------


async def s_client_subject(port: int) -> str:
    openssl = need("openssl")
    proc = await asyncio.create_subprocess_exec(
        openssl,
        "s_client",
        "-starttls",
        "smtp",
        "-connect",
        f"127.0.0.1:{port}",
        "-brief",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 20)
    text = out.decode(errors="replace")
    for line in text.splitlines():
        if line.startswith("Peer certificate:"):
            return line
    raise AssertionError(f"no peer certificate in s_client output:\n{text}")


async def test_openssl_sees_the_renewed_certificate_without_a_restart(
    upstream: Upstream, make_relay: Any, ca: trustme.CA, tmp_path: Path, logs: LogCapture
) -> None:
    cert, key = write_cert(ca, tmp_path / "certs", "first.relay.test")
    async with make_relay(upstream, tls_cert_file=cert, tls_key_file=key) as relay:
        assert "CN = first.relay.test" in await s_client_subject(relay.port)
        write_cert(ca, tmp_path / "certs", "renewed.relay.test")
        await asyncio.sleep(1.1)  # files are checked for a change at most once a second
        assert "CN = renewed.relay.test" in await s_client_subject(relay.port)
    assert logs.has("event=tls_certificate_reloaded", "renewed.relay.test")


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pyrelay", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


async def test_config_and_health_show_the_certificate_and_warn_before_expiry(
    upstream: Upstream, make_relay: Any, ca: trustme.CA, tmp_path: Path
) -> None:
    soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=10)
    cert, key = write_cert(ca, tmp_path / "certs", "soon.relay.test", not_after=soon)
    info = read_cert_info(cert)
    async with make_relay(upstream, tls_cert_file=cert, tls_key_file=key) as relay:
        env = {
            "RELAYHOST": upstream.relayhost,
            "ALLOWED_SENDER_DOMAINS": "example.org",
            "PYRELAY_SPOOL_DIR": str(tmp_path / "spool"),
            "PYRELAY_LISTEN": f"127.0.0.1:{relay.port}",
            "PYRELAY_TLS_CERT_FILE": str(cert),
            "PYRELAY_TLS_KEY_FILE": str(key),
        }
        config = await asyncio.to_thread(run_cli, "config", "--json", env=env)
        health = await asyncio.to_thread(run_cli, "health", env=env)
    assert config.returncode == 0, config.stderr
    values = json.loads(config.stdout)
    assert values["PYRELAY_SMTPD_TLS_LEVEL"] == "may"
    assert values["listener_certificate"]["subject"].startswith("CN=soon.relay.test,")
    assert values["listener_certificate"]["sha256"] == info.sha256
    assert values["listener_certificate"]["not_after"].startswith(f"{soon:%Y-%m-%d}")
    assert health.returncode == 0, health.stdout + health.stderr
    assert "subject CN=soon.relay.test," in health.stdout
    assert info.sha256 in health.stdout
    assert "WARNING: the listener certificate expires in" in health.stdout


# -- nodemailer (npm) -----------------------------------------------------------------------


@pytest.fixture(scope="session")
def nodemailer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        if os.environ.get("CI"):
            pytest.fail("node and npm are needed for the nodemailer tests")
        pytest.skip("node/npm not installed: cannot run nodemailer")
    where = tmp_path_factory.mktemp("nodemailer")
    result = subprocess.run(
        [npm, "install", "--no-audit", "--no-fund", "--silent", "nodemailer@6"],
        cwd=where,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if result.returncode != 0:
        message = f"npm install nodemailer@6 failed: {result.stderr.strip()[-500:]}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return where


NODE_SEND = """
const nodemailer = require(process.argv[1] + '/node_modules/nodemailer');
const t = nodemailer.createTransport({host: '127.0.0.1', port: Number(process.argv[2])});
t.sendMail({from: 'noreply@example.org', to: 'alice@dest.test', subject: 'hi', text: 'hello'})
  .then(info => { console.log('OK ' + info.response); })
  .catch(err => { console.log('ERR ' + err.message); process.exitCode = 1; });
"""


async def node_send(where: Path, port: int, **env: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        "node",
        "-e",
        NODE_SEND,
        str(where),
        str(port),
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    return out.decode(errors="replace").strip()


async def test_nodemailer_defaults_deliver_with_tls_off_and_with_a_trusted_certificate(
    nodemailer: Path,
    upstream: Upstream,
    make_relay: Any,
    ca: trustme.CA,
    ca_file: Path,
    tmp_path: Path,
) -> None:
    # Default settings: no STARTTLS offered, so nodemailer sends in plain text, as today.
    async with make_relay(upstream) as relay:
        out = await node_send(nodemailer, relay.port)
        assert out.startswith("OK 250 2.0.0 Ok: queued as"), out
        await wait_until(lambda: len(upstream.state.messages) == 1, what="delivery")
    assert "with ESMTP id" in received_header(upstream)
    # A configured certificate whose CA the app trusts: nodemailer upgrades and verifies it.
    cert, key = write_cert(ca, tmp_path / "certs", "relay.test")
    async with make_relay(upstream, tls_cert_file=cert, tls_key_file=key) as relay:
        out = await node_send(nodemailer, relay.port, NODE_EXTRA_CA_CERTS=str(ca_file))
        assert out.startswith("OK 250 2.0.0 Ok: queued as"), out
        await wait_until(lambda: len(upstream.state.messages) == 2, what="delivery")
    assert "with ESMTPS id" in received_header(upstream)
