"""Promise 2 of issue 5: upstream faults.

Every fault must give the right per-recipient outcome (deferred / bounced / sent) with Postfix's
log wording, and no credential may ever cross the wire in clear.  The upstream is
``faulty_upstream.FaultUpstream`` (raw asyncio, records every byte received before TLS).
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import ssl
import time
from pathlib import Path
from typing import Any

import pytest
import trustme
from faulty_upstream import BlackHole, FaultUpstream

from conftest import MESSAGE, PASSWORD, USER, LogCapture, MakeFault, wait_until

# Short upstream timeouts so that stalls resolve in about a second.
FAST: dict[str, Any] = {
    "upstream_connect_timeout": "1s",
    "upstream_command_timeout": "1s",
    "upstream_data_timeout": "1s",
}


def events(logs: LogCapture, event: str, rcpt: str | None = None) -> list[str]:
    return [
        line
        for line in logs.lines()
        if f"event={event} " in line and (rcpt is None or f"to=<{rcpt}>" in line)
    ]


def assert_no_clear_credentials(*ups: FaultUpstream) -> None:
    plain = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode())
    for up in ups:
        clear = bytes(up.clear_bytes)
        assert PASSWORD.encode() not in clear
        assert base64.b64encode(PASSWORD.encode()) not in clear
        assert plain not in clear
        assert b"AUTH" not in clear.upper()
        assert all(tls for tls, _ in up.auth_lines), up.auth_lines
        assert not any(verb.upper().startswith("AUTH") for tls, verb in up.commands if not tls)


def only_deferred(logs: LogCapture, rcpt: str) -> str:
    """The recipient was deferred and neither sent nor bounced; returns the first line."""
    deferred = events(logs, "deferred", rcpt)
    assert deferred, f"no deferral for {rcpt}"
    assert not events(logs, "sent", rcpt) and not events(logs, "bounced", rcpt)
    return deferred[0]


# -- connection level -------------------------------------------------------------------------


async def test_refused_connection_defers_every_recipient(
    make_relay: Any, logs: LogCapture, fault: MakeFault
) -> None:
    up = await fault()
    await up.stop()  # nothing listens on the port any more
    async with make_relay(up, **FAST) as relay:
        await relay.asend("a@example.org", ["r1@dest.test", "r2@dest.test"], MESSAGE)
        await wait_until(lambda: len(events(logs, "deferred")) >= 2, what="deferral")
    for rcpt in ("r1@dest.test", "r2@dest.test"):
        line = only_deferred(logs, rcpt)
        assert "Connection refused" in line and "dsn=4.4.1" in line
        assert f"connect to 127.0.0.1[127.0.0.1]:{up.port}" in line


async def test_connect_timeout_fires(make_relay: Any, logs: LogCapture) -> None:
    hole = BlackHole()
    try:
        async with make_relay(None, relayhost=hole.relayhost, **FAST) as relay:
            started = time.monotonic()
            await relay.asend("a@example.org", ["r@dest.test"], MESSAGE)
            await wait_until(lambda: bool(events(logs, "deferred")), timeout=8, what="deferral")
            elapsed = time.monotonic() - started
    finally:
        hole.close()
    line = only_deferred(logs, "r@dest.test")
    assert "Connection timed out" in line and "dsn=4.4.1" in line
    assert 0.8 < elapsed < 6


@pytest.mark.parametrize(
    ("stage", "wording"),
    [
        ("GREETING", "timed out while receiving the initial server greeting"),
        ("EHLO", "timed out while performing the EHLO handshake"),
        ("STARTTLS", "timed out while sending STARTTLS"),
        ("MAIL", "timed out while sending MAIL FROM"),
        ("RCPT", "timed out while sending RCPT TO"),
        ("DATA", "timed out while sending DATA"),
        ("EOD", "timed out while sending end of data -- message may be sent more than once"),
    ],
)
async def test_stalled_upstream_times_out_and_defers(
    make_relay: Any, logs: LogCapture, fault: MakeFault, stage: str, wording: str
) -> None:
    up = await fault(stall_on={stage})
    async with make_relay(up, **FAST) as relay:
        started = time.monotonic()
        await relay.asend("a@example.org", ["r@dest.test"], MESSAGE)
        await wait_until(lambda: bool(events(logs, "deferred")), timeout=8, what="deferral")
        elapsed = time.monotonic() - started
        # Recovery: the upstream behaves again and the message goes out exactly once.
        up.stall_on.clear()
        await wait_until(lambda: len(up.messages) >= 1, timeout=8, what="delivery after stall")
        await asyncio.sleep(0.3)
    line = events(logs, "deferred", "r@dest.test")[0]
    assert wording in line, line
    assert "event=delivery_crashed" not in logs.getvalue()
    assert elapsed < 6
    # A stall before the final reply may legitimately yield a duplicate (at-least-once); a stall
    # anywhere else must not.
    assert len(up.messages) == 1 or stage == "EOD"
    assert events(logs, "sent", "r@dest.test")
    assert_no_clear_credentials(up)


async def test_data_timeout_is_separate_from_command_timeout(
    make_relay: Any, logs: LogCapture, fault: MakeFault
) -> None:
    up = await fault(stall_on={"EOD"})
    settings = {**FAST, "upstream_command_timeout": "30s", "upstream_data_timeout": "1s"}
    async with make_relay(up, **settings) as relay:
        await relay.asend("a@example.org", ["r@dest.test"], MESSAGE)
        await wait_until(lambda: bool(events(logs, "deferred")), timeout=6, what="deferral")
    assert "timed out while sending end of data" in only_deferred(logs, "r@dest.test")


@pytest.mark.parametrize("stage", ["GREETING", "EHLO", "MAIL", "RCPT", "MIDDATA"])
async def test_dropped_connection_defers_then_delivers_once(
    make_relay: Any, logs: LogCapture, fault: MakeFault, stage: str
) -> None:
    up = await fault(drop_on={stage})
    async with make_relay(up, **FAST) as relay:
        await relay.asend("a@example.org", ["r1@dest.test", "r2@dest.test"], MESSAGE)
        await wait_until(lambda: len(events(logs, "deferred")) >= 2, timeout=8, what="deferral")
        up.drop_on.clear()
        await wait_until(lambda: len(up.messages) == 1, timeout=8, what="delivery")
        await asyncio.sleep(0.3)
    assert len(up.messages) == 1 and sorted(up.recipients) == ["r1@dest.test", "r2@dest.test"]
    line = events(logs, "deferred", "r1@dest.test")[0]
    assert "lost connection with" in line, line
    if stage == "MIDDATA":
        assert "while sending message body" in line or "while sending end of data" in line
    assert "event=delivery_crashed" not in logs.getvalue()
    assert_no_clear_credentials(up)


# -- reply codes ------------------------------------------------------------------------------


async def test_421_greeting_defers(make_relay: Any, logs: LogCapture, fault: MakeFault) -> None:
    up = await fault(greeting="421 4.3.2 fault.test Service not available")
    async with make_relay(up, **FAST) as relay:
        await relay.asend("a@example.org", ["r@dest.test"], MESSAGE)
        await wait_until(lambda: bool(events(logs, "deferred")), what="deferral")
    line = only_deferred(logs, "r@dest.test")
    assert "refused to talk to me: 421 4.3.2" in line and "dsn=4.3.2" in line


async def test_ehlo_and_helo_refused_defers(
    make_relay: Any, logs: LogCapture, fault: MakeFault
) -> None:
    up = await fault(replies={"EHLO": "554 5.7.1 fault.test: you are not welcome"})
    async with make_relay(up, **FAST) as relay:
        await relay.asend("a@example.org", ["r@dest.test"], MESSAGE)
        await wait_until(lambda: bool(events(logs, "deferred")), what="deferral")
    line = only_deferred(logs, "r@dest.test")
    assert "554 5.7.1 fault.test: you are not welcome (in reply to EHLO command)" in line
    assert "dsn=4.7.1" in line and "event=delivery_crashed" not in logs.getvalue()


@pytest.mark.parametrize(
    ("verb", "reply", "dsn"),
    [
        ("MAIL", "421 4.7.0 fault.test closing connection", "4.7.0"),
        ("MAIL", "451 4.3.0 Temporary local problem", "4.3.0"),
        ("MAIL", "454 Throttling failure: Maximum sending rate exceeded", "4.0.0"),
        ("EOD", "454 Throttling failure: Maximum sending rate exceeded", "4.0.0"),
        ("EOD", "451 4.4.1 try later", "4.4.1"),
    ],
)
async def test_transient_replies_defer_then_deliver(
    make_relay: Any, logs: LogCapture, fault: MakeFault, verb: str, reply: str, dsn: str
) -> None:
    up = await fault(replies={verb: reply})
    async with make_relay(up, **FAST) as relay:
        await relay.asend("a@example.org", ["r1@dest.test", "r2@dest.test"], MESSAGE)
        await wait_until(lambda: len(events(logs, "deferred")) >= 2, what="deferral")
        up.replies.clear()  # throttling over
        await wait_until(lambda: len(up.messages) == 1, what="delivery")
        await asyncio.sleep(0.3)
    assert len(up.messages) == 1
    for rcpt in ("r1@dest.test", "r2@dest.test"):
        first = events(logs, "deferred", rcpt)[0]
        assert f"dsn={dsn}" in first and reply.split(" ", 1)[1] in first, first
        assert events(logs, "sent", rcpt) and not events(logs, "bounced", rcpt)
    assert_no_clear_credentials(up)


async def test_mixed_recipient_outcomes(
    make_relay: Any, logs: LogCapture, fault: MakeFault
) -> None:
    up = await fault(
        rcpt_replies={
            "gone@dest.test": "550 5.1.1 <gone@dest.test>: Recipient address rejected",
            "later@dest.test": "451 4.2.0 <later@dest.test>: greylisted",
        }
    )
    rcpts = ["ok@dest.test", "gone@dest.test", "later@dest.test"]
    async with make_relay(up, **FAST) as relay:
        await relay.asend("app@example.org", rcpts, MESSAGE)
        await wait_until(lambda: bool(events(logs, "deferred", "later@dest.test")))
        await wait_until(lambda: any(m.mail_from == "" for m in up.messages), what="bounce")
        del up.rcpt_replies["later@dest.test"]  # greylisting passed
        await wait_until(lambda: "later@dest.test" in up.recipients, what="retry")
        await asyncio.sleep(0.3)
    originals = [m for m in up.messages if m.mail_from == "app@example.org"]
    bounces = [m for m in up.messages if m.mail_from == ""]
    assert [m.rcpt_tos for m in originals] == [["ok@dest.test"], ["later@dest.test"]]
    assert len(bounces) == 1 and bounces[0].rcpt_tos == ["app@example.org"]
    assert b"gone@dest.test" in bounces[0].data and b"5.1.1" in bounces[0].data
    assert b"later@dest.test" not in bounces[0].data.split(b"\r\n\r\n", 1)[1].split(b"---")[0]
    assert len(events(logs, "sent", "ok@dest.test")) == 1
    assert "dsn=5.1.1" in events(logs, "bounced", "gone@dest.test")[0]
    assert "dsn=4.2.0" in events(logs, "deferred", "later@dest.test")[0]
    assert not events(logs, "deferred", "ok@dest.test")
    assert events(logs, "sent", "later@dest.test")
    assert not events(logs, "sent", "gone@dest.test")


async def test_rcpt_5xx_for_all_bounces_without_data(
    make_relay: Any, logs: LogCapture, fault: MakeFault
) -> None:
    up = await fault(replies={"RCPT": "550 5.7.1 Relaying denied"})
    async with make_relay(up, allow_null_sender=True, **FAST) as relay:
        await relay.asend("<>", ["a@dest.test", "b@dest.test"], MESSAGE)
        await wait_until(lambda: len(events(logs, "bounced")) == 2, what="bounces")
        await wait_until(lambda: logs.has("event=bounce_suppressed"))
    assert up.messages == []
    # A pipelining client sends DATA with the RCPTs (RFC 2920); no message follows it.
    assert not any(cmd.upper() == "." for _, cmd in up.commands)


# -- TLS and AUTH -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("level", "wording"),
    [
        ("secure", "TLS is required, but was not offered"),
        ("encrypt", "TLS is required, but was not offered"),
        ("may", "refusing to send SASL credentials"),
        ("none", "refusing to send SASL credentials"),
    ],
)
async def test_no_starttls_never_sends_credentials(
    make_relay: Any, logs: LogCapture, fault: MakeFault, level: str, wording: str
) -> None:
    up = await fault(offer_starttls=False)
    async with make_relay(up, tls_level=level, **FAST) as relay:
        await relay.asend("a@example.org", ["r@dest.test"], MESSAGE)
        await wait_until(lambda: bool(events(logs, "deferred")), what="deferral")
    assert wording in only_deferred(logs, "r@dest.test")
    assert up.messages == [] and up.auth_lines == []
    assert_no_clear_credentials(up)


async def test_starttls_refused_never_sends_credentials(
    make_relay: Any, logs: LogCapture, fault: MakeFault
) -> None:
    up = await fault(starttls_reply="454 4.7.0 TLS not available due to temporary reason")
    async with make_relay(up, tls_level="may", **FAST) as relay:
        await relay.asend("a@example.org", ["r@dest.test"], MESSAGE)
        await wait_until(lambda: bool(events(logs, "deferred")), what="deferral")
    assert "Cannot start TLS" in only_deferred(logs, "r@dest.test")
    assert up.messages == [] and up.auth_lines == []
    assert_no_clear_credentials(up)


async def test_without_credentials_level_may_delivers_in_clear(
    make_relay: Any, logs: LogCapture, fault: MakeFault
) -> None:
    up = await fault(offer_starttls=False, offer_auth=False)
    settings = {**FAST, "relayhost_username": "", "relayhost_password": ""}
    async with make_relay(up, tls_level="may", **settings) as relay:
        await relay.asend("a@example.org", ["r@dest.test"], MESSAGE)
        await wait_until(lambda: len(up.messages) == 1, what="delivery")
    assert not up.messages[0].tls
    assert events(logs, "sent", "r@dest.test")


def _server_context(pem_key: bytes, pem_chain: bytes, tmp: Path) -> ssl.SSLContext:
    key, chain = tmp / "key.pem", tmp / "chain.pem"
    key.write_bytes(pem_key)
    chain.write_bytes(pem_chain)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(chain), str(key))
    return ctx


@pytest.fixture(scope="module")
def bad_certs(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    now = dt.datetime.now(dt.UTC)
    expired = ca.issue_cert(
        "127.0.0.1",
        "localhost",
        not_before=now - dt.timedelta(days=30),
        not_after=now - dt.timedelta(days=1),
    )
    wrong_host = ca.issue_cert("wrong.example.net")
    rogue = trustme.CA()  # a self-signed certificate nobody trusts
    out: dict[str, Any] = {}
    for name, key, chain in [
        (
            "expired",
            expired.private_key_pem.bytes(),
            b"".join(b.bytes() for b in expired.cert_chain_pems),
        ),
        (
            "wrong_host",
            wrong_host.private_key_pem.bytes(),
            b"".join(b.bytes() for b in wrong_host.cert_chain_pems),
        ),
        ("self_signed", rogue.private_key_pem.bytes(), rogue.cert_pem.bytes()),
    ]:
        out[name] = _server_context(key, chain, tmp_path_factory.mktemp(name))
    return out


@pytest.mark.parametrize(
    ("cert", "reason"),
    [
        ("expired", "certificate has expired"),
        ("wrong_host", "mismatch"),
        ("self_signed", "self-signed certificate"),
    ],
)
async def test_bad_certificate_defers_without_auth(
    make_relay: Any,
    logs: LogCapture,
    fault: MakeFault,
    bad_certs: dict[str, ssl.SSLContext],
    cert: str,
    reason: str,
) -> None:
    up = await fault(tls_context=bad_certs[cert])
    async with make_relay(up, tls_level="secure", **FAST) as relay:
        await relay.asend("a@example.org", ["r@dest.test"], MESSAGE)
        await wait_until(lambda: bool(events(logs, "deferred")), what="deferral")
    line = only_deferred(logs, "r@dest.test")
    assert "Server certificate not verified" in line and reason in line, line
    assert "dsn=4.7.5" in line
    assert up.messages == [] and up.auth_lines == []
    assert_no_clear_credentials(up)


async def test_bad_certificate_is_accepted_at_level_encrypt(
    make_relay: Any, logs: LogCapture, fault: MakeFault, bad_certs: dict[str, ssl.SSLContext]
) -> None:
    # Postfix "encrypt": mandatory encryption, no authentication of the peer.
    up = await fault(tls_context=bad_certs["expired"])
    async with make_relay(up, tls_level="encrypt", **FAST) as relay:
        await relay.asend("a@example.org", ["r@dest.test"], MESSAGE)
        await wait_until(lambda: len(up.messages) == 1, what="delivery")
    assert up.messages[0].tls and up.auth_lines and all(tls for tls, _ in up.auth_lines)
    assert_no_clear_credentials(up)


async def test_auth_rejected_535_defers(
    make_relay: Any, logs: LogCapture, fault: MakeFault
) -> None:
    up = await fault(auth_reply="535 5.7.8 Authentication credentials invalid")
    async with make_relay(up, **FAST) as relay:
        await relay.asend("a@example.org", ["r1@dest.test", "r2@dest.test"], MESSAGE)
        await wait_until(lambda: len(events(logs, "deferred")) >= 2, what="deferral")
        up.auth_reply = "235 2.7.0 Authentication successful"  # operator fixed the key
        await wait_until(lambda: len(up.messages) == 1, what="delivery after fix")
    for rcpt in ("r1@dest.test", "r2@dest.test"):
        line = events(logs, "deferred", rcpt)[0]
        assert "SASL authentication failed" in line and "535 5.7.8" in line
        assert "dsn=4.7.0" in line
    assert up.auth_lines and all(tls for tls, _ in up.auth_lines)
    assert_no_clear_credentials(up)
    assert PASSWORD not in logs.getvalue()


# -- flapping ---------------------------------------------------------------------------------


async def test_flapping_upstream_eventually_delivers_everything(
    make_relay: Any, logs: LogCapture, fault: MakeFault, server_tls: ssl.SSLContext
) -> None:
    up = await fault()
    port = up.port
    n = 20
    rcpts = [f"f{i}@dest.test" for i in range(n)]
    async with make_relay(up, min_backoff="0.1s", max_backoff="0.5s", **FAST) as relay:

        async def flap() -> None:
            for _ in range(4):  # ~4 s of up 0.5 s / down 0.5 s
                await asyncio.sleep(0.5)
                await up.stop()
                await asyncio.sleep(0.5)
                up.port = port
                await up.start()

        flapper = asyncio.create_task(flap())
        for rcpt in rcpts:
            await relay.asend("a@example.org", [rcpt], MESSAGE)
            await asyncio.sleep(0.1)
        await flapper
        await wait_until(lambda: set(up.recipients) == set(rcpts), timeout=20, what="all")
        await asyncio.sleep(0.5)
    got = up.recipients
    deferrals = len(events(logs, "deferred"))
    dups = len(got) - len(set(got))
    print(
        f"\nflap: sent={n} delivered={len(set(got))} lost={n - len(set(got))} "
        f"duplicated={dups} deferrals={deferrals} connections={up.connections}"
    )
    assert set(got) == set(rcpts)
    assert deferrals > 0  # the flapping really hit deliveries
    # Duplicates are only possible when the drop falls between the end of DATA and the reply.
    assert dups <= deferrals
    assert_no_clear_credentials(up)


# -- garbage and unencodable input ------------------------------------------------------------


@pytest.mark.parametrize(
    ("behaviour", "wording"),
    [
        ({"greeting": "HTTP/1.0 400 Bad request"}, "refused to talk to me: protocol error"),
        ({"replies": {"EHLO": "hello there"}}, "Malformed SMTP response line: hello there"),
        ({"replies": {"MAIL": "hello"}}, "protocol error while sending MAIL FROM"),
        ({"replies": {"RCPT": "xyz"}}, "protocol error while sending RCPT TO"),
        ({"replies": {"DATA": "go ahead"}}, "protocol error while sending DATA"),
        ({"replies": {"EOD": "ok!"}}, "protocol error while sending end of data"),
        ({"replies": {"MAIL": "250-" + "x" * 9000}}, "Response too long"),
    ],
    ids=["http-greeting", "ehlo", "mail", "rcpt", "data", "eod", "too-long"],
)
async def test_non_smtp_replies_defer_with_a_valid_dsn(
    make_relay: Any, logs: LogCapture, fault: MakeFault, behaviour: dict[str, Any], wording: str
) -> None:
    up = await fault(**behaviour)
    async with make_relay(up, **FAST) as relay:
        await relay.asend("a@example.org", ["r@dest.test"], MESSAGE)
        await wait_until(lambda: bool(events(logs, "deferred")), what="deferral")
        up.greeting, up.replies = "220 fault.test ESMTP", {}  # fixed upstream
        await wait_until(lambda: len(up.messages) == 1, what="delivery")
    line = events(logs, "deferred", "r@dest.test")[0]
    assert wording in line and "dsn=4.5.0" in line, line
    assert "event=delivery_crashed" not in logs.getvalue()


async def test_unencodable_addresses_bounce_instead_of_crashing(
    make_relay: Any, fault: MakeFault, tmp_path: Path, ca_file: Path
) -> None:
    """Queue entries the listener no longer accepts (control characters; UTF-8 without SMTPUTF8)
    must still leave the queue: bounced per recipient, never an endless crash loop."""
    from conftest import relay_settings
    from pyrelay.delivery import InMemoryBody, Outcome, Upstream

    up = await fault()
    upstream = Upstream(relay_settings(tmp_path, None, ca_file, relayhost=up.relayhost, **FAST))
    session = await upstream.open()
    try:
        rcpts = ['"a\x01b"@dest.test', "\u00fc@dest.test", "ok@dest.test"]
        results = await upstream.transaction(session, "a@example.org", rcpts, InMemoryBody(MESSAGE))
        assert [(r.outcome, r.dsn) for r in results] == [
            (Outcome.BOUNCED, "5.1.3"),
            (Outcome.BOUNCED, "5.1.3"),
            (Outcome.SENT, "2.0.0"),
        ]
        results = await upstream.transaction(
            session, "a\x7f@example.org", rcpts[2:], InMemoryBody(MESSAGE)
        )
        assert [(r.outcome, r.dsn) for r in results] == [(Outcome.BOUNCED, "5.1.7")]
        # The session is still in step after both.
        results = await upstream.transaction(
            session, "a@example.org", rcpts[2:], InMemoryBody(MESSAGE)
        )
        assert [r.outcome for r in results] == [Outcome.SENT]
    finally:
        await upstream.close(session)
    assert up.recipients == ["ok@dest.test", "ok@dest.test"]


async def test_utf8_address_without_smtputf8_parameter(
    make_relay: Any, logs: LogCapture, fault: MakeFault, tmp_path: Path
) -> None:
    """A client sending a UTF-8 address without asking for SMTPUTF8 is relayed with SMTPUTF8;
    an upstream that does not offer it gets a 5.6.7 bounce, not a crash loop."""
    from faulty_upstream import RawClient

    async def send_raw(port: int) -> None:
        client = await RawClient.connect(port)
        assert (await client.reply()).startswith("220")
        assert (await client.cmd("EHLO app.test")).startswith("250")
        assert (await client.cmd("MAIL FROM:<a@example.org>")).startswith("250")
        assert (await client.cmd("RCPT TO:<\u00fc@dest.test>")).startswith("250")
        assert (await client.cmd("DATA")).startswith("354")
        await client.send(MESSAGE + b".\r\n")
        assert (await client.reply()).startswith("250 2.0.0")
        client.close()

    up = await fault()
    async with make_relay(up, **FAST) as relay:
        await send_raw(relay.port)
        await wait_until(lambda: len(up.messages) == 1, what="delivery")
    assert any("SMTPUTF8" in cmd for _, cmd in up.commands if cmd.startswith("MAIL"))
    plain = await fault(offer_smtputf8=False)
    async with make_relay(plain, spool_dir=tmp_path / "spool2", **FAST) as relay:
        await send_raw(relay.port)
        await wait_until(lambda: bool(events(logs, "bounced")), what="bounce")
    assert "dsn=5.6.7" in events(logs, "bounced")[0]
    assert "event=delivery_crashed" not in logs.getvalue()
