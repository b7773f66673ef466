"""RELAYHOST on port 465 means implicit TLS (SMTPS), as with Postfix's wrapper mode."""

from __future__ import annotations

import random
import ssl
from typing import Any

import pytest
import trustme

from conftest import MESSAGE, USER, LogCapture, wait_until
from pyrelay.sink import SinkState, start_sink


async def test_port_465_uses_implicit_tls_with_verified_certificate(
    ca: trustme.CA, make_relay: Any, logs: LogCapture
) -> None:
    # Port 465 is fixed by the rule under test; a random loopback address keeps it free.
    host = f"127.0.{random.randint(1, 254)}.{random.randint(2, 254)}"
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(host).configure_cert(ctx)
    state = SinkState(username=USER, password="S3cr3t-Pa55w0rd-XYZZY")
    try:
        server = await start_sink(state, host=host, port=465, tls_context=ctx, implicit_tls=True)
    except OSError as exc:
        pytest.skip(f"cannot listen on {host}:465 here: {exc.strerror}")
    try:
        async with make_relay(None, relayhost=f"[{host}]:465") as relay:
            await relay.asend("a@example.org", ["b@dest.test"], MESSAGE)
            await wait_until(lambda: len(state.messages) == 1, what="delivery over SMTPS")
    finally:
        server.close()
    got = state.messages[0]
    assert got.tls and got.user == USER
    assert all(a.tls for a in state.auth_attempts)
    assert logs.has("event=sent", f"relay={host}[{host}]:465")
