"""``pyrelay demo``: the newcomer's first command.

One process runs an upstream SMTP server (the recording sink: STARTTLS with a throwaway trustme
certificate, AUTH demo/demo) and a relay configured against it exactly as production would be
(``RELAYHOST_TLS_LEVEL=secure``, certificate verified against the throwaway CA).  A stdlib
``smtplib`` client, like a web application, sends one message; the demo prints the relay's log
lines for it and exactly what the upstream received.  Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import io
import smtplib
import ssl
import tempfile
from pathlib import Path
from typing import Any

import trustme

from pyrelay.app import Relay
from pyrelay.config import load_settings
from pyrelay.logging import configure_logging
from pyrelay.sink import Received, SinkState, start_sink

USER = PASSWORD = "demo"
SENDER = "app@example.org"
RECIPIENT = "alice@example.net"
DELIVERY_TIMEOUT = 15.0
MESSAGE = (
    "From: Demo App <app@example.org>\r\n"
    "To: Alice <alice@example.net>\r\n"
    "Subject: Hello from pyrelay demo\r\n"
    "\r\n"
    "This message went app -> pyrelay -> upstream (STARTTLS + AUTH).\r\n"
)


def main() -> int:
    return asyncio.run(_demo())


async def _demo() -> int:
    ca = trustme.CA()
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_tls)
    log = io.StringIO()
    configure_logging("console", "info", stream=log)
    sink = SinkState(username=USER, password=PASSWORD)
    server = await start_sink(sink, tls_context=server_tls, hostname="upstream.demo")
    sink_port = server.sockets[0].getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="pyrelay-demo-") as tmp:
        ca_file = Path(tmp) / "demo-ca.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        values: dict[str, Any] = {
            "relayhost": f"[127.0.0.1]:{sink_port}",
            "relayhost_username": USER,
            "relayhost_password": PASSWORD,
            "tls_level": "secure",
            "tls_ca_file": ca_file,
            "allowed_sender_domains": "example.org",
            "listen": "127.0.0.1:0",
            "spool_dir": Path(tmp) / "spool",
            "hostname": "relay.demo",
            "concurrency": 1,
            "shutdown_grace": "5s",
        }
        # From these values only: the demo must behave the same on every machine, so neither
        # the environment (a real RELAYHOST, a _FILE secret) nor a .env may leak in.
        settings = load_settings(_env_file=None, _environ={}, **values)
        relay = Relay(settings)
        await relay.startup()
        port = relay.listener.ports[0][1]
        print("pyrelay demo: a relay and an upstream in one process; nothing leaves this host.\n")
        print(f"  upstream  127.0.0.1:{sink_port}  STARTTLS (throwaway certificate), AUTH demo")
        print(
            f"  relay     127.0.0.1:{port}  RELAYHOST=[127.0.0.1]:{sink_port} "
            "RELAYHOST_TLS_LEVEL=secure\n"
        )
        try:
            reply = await asyncio.to_thread(_send, port)
            print(f"1. app -> relay: {SENDER} -> {RECIPIENT}\n   relay replied: {reply}\n")
            queue_id = reply.rsplit(" ", 1)[-1]
            got = await _wait_for_delivery(sink)
        except (OSError, smtplib.SMTPException) as exc:
            print(f"FAIL: could not submit the message to the relay: {exc}")
            got = None
            queue_id = ""
        finally:
            # Also waits for the delivery to finish, so its "sent" line is in the log: the sink
            # records a message before it replies to the relay.
            await relay.shutdown()
            server.close()
    lines = [line for line in log.getvalue().splitlines() if queue_id and queue_id in line]
    print("2. relay log for this message:")
    for line in lines or log.getvalue().splitlines():
        print(f"   {line}")
    if got is None:
        print(f"\nFAIL: the upstream received nothing within {DELIVERY_TIMEOUT:g}s")
        return 1
    print("\n3. what the upstream received:")
    _print_received(got)
    print("\nok: delivered. Next: configure RELAYHOST for real and run `pyrelay check-upstream`.")
    return 0


def _send(port: int) -> str:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="app.demo", timeout=10) as smtp:
        smtp.ehlo()
        smtp.mail(SENDER)
        smtp.rcpt(RECIPIENT)
        code, text = smtp.data(MESSAGE.encode())
    reply = f"{code} {text.decode(errors='replace')}"
    if code != 250:
        raise smtplib.SMTPDataError(code, reply)
    return reply


async def _wait_for_delivery(sink: SinkState) -> Received | None:
    try:
        await asyncio.wait_for(sink.arrived.wait(), DELIVERY_TIMEOUT)
    except TimeoutError:
        return None
    return sink.messages[0]


def _print_received(got: Received) -> None:
    details: dict[str, Any] = {
        "MAIL FROM": f"<{got.mail_from}>",
        "RCPT TO": " ".join(f"<{r}>" for r in got.rcpt_tos),
        "TLS": "yes" if got.tls else "no",
        "AUTH": got.user or "none",
    }
    for key, value in details.items():
        print(f"   {key + ':':<11}{value}")
    print("   --- message ---")
    for line in got.content.decode("utf-8", errors="replace").splitlines():
        print(f"   {line}")
