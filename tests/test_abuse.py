"""Issue 9, abuse resistance round 2: the findings outside the DATA/spool path, each against a
real listener (raw sockets or stdlib smtplib) and the recording upstream.

Null sender, log forging, UTS-46 domains, duplicate recipients, the bounce's sender, per-client
connection slots, the junk command limit, outsiders hung up on after their 554, and the
deferral text with ``RELAYHOST_TLS_LEVEL=none``.
"""

from __future__ import annotations

import asyncio
import smtplib
from typing import Any

import pytest
from faulty_upstream import RawClient

from conftest import MESSAGE, PASSWORD, LogCapture, Upstream, free_port, wait_until

NULL_DENIED = "554 5.7.1 <r@dest.test>: Relay access denied: null sender is not allowed"


async def session(port: int, *, source: str | None = None) -> RawClient:
    if source is None:
        client = await RawClient.connect(port)
    else:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0)), 5
        )
        client = RawClient(reader, writer)
    assert (await client.reply()).startswith("220 relay.test ESMTP pyrelay")
    return client


async def ehlo(port: int, *, source: str | None = None) -> RawClient:
    client = await session(port, source=source)
    assert (await client.cmd("EHLO app.test")).startswith("250-relay.test")
    return client


def counted(**overrides: Any) -> dict[str, Any]:
    """``make_relay`` overrides for a relay that counts (metrics are off without an endpoint)."""
    return {"metrics_listen": f"127.0.0.1:{free_port()}", **overrides}


def rejected_count(relay: Any, reason: str) -> float:
    value = relay.relay.metrics.registry.get_sample_value(
        "pyrelay_messages_rejected_total", {"reason": reason}
    )
    return float(value or 0.0)


# -- 1. null sender -----------------------------------------------------------------------------


async def test_null_sender_is_refused_at_rcpt_unless_allowed(
    upstream: Upstream, make_relay: Any, logs: LogCapture
) -> None:
    async with make_relay(upstream, **counted()) as relay:
        client = await ehlo(relay.port)
        assert await client.cmd("MAIL FROM:<>") == "250 2.1.0 Ok"
        assert await client.cmd("RCPT TO:<r@dest.test>") == NULL_DENIED
        assert (await client.cmd("DATA")).startswith("503 5.5.1")
        client.close()
        await wait_until(lambda: logs.has("event=rejected", "null sender is not allowed"))
        assert rejected_count(relay, "null_sender") == 1
    assert logs.has("event=rejected", "client=127.0.0.1", "from=<>", "to=<r@dest.test>")
    assert upstream.state.messages == []
    # Accepted only with an explicit opt-in (or when any sender domain is allowed).
    for opt_in in ("allow_null_sender", "allow_empty_sender_domains"):
        async with make_relay(upstream, **{opt_in: True}) as relay:
            await relay.asend("<>", ["r@dest.test"], MESSAGE)
            await wait_until(lambda: len(upstream.state.messages) == 1, what="delivery")
        assert upstream.state.messages.pop().mail_from == ""


# -- 2. typed policy decisions: reasons counted without parsing reply texts ---------------------


async def test_rejections_are_counted_by_reason(upstream: Upstream, make_relay: Any) -> None:
    async with make_relay(upstream, **counted(max_recipients=1)) as relay:
        client = await ehlo(relay.port)
        assert (await client.cmd("MAIL FROM:<x@exa\u00admple.org> SMTPUTF8")).startswith("501")
        assert (await client.cmd("MAIL FROM:<x@evil.test>")).startswith("250")
        assert (await client.cmd("RCPT TO:<r@dest.test>")).startswith("554 5.7.1 <r@dest.test>")
        assert (await client.cmd("RSET")).startswith("250")
        assert (await client.cmd("MAIL FROM:<x@example.org> SIZE=999999999")).startswith("552")
        assert (await client.cmd("MAIL FROM:<x@example.org>")).startswith("250")
        assert (await client.cmd("RCPT TO:<r@dest.test>")) == "250 2.1.5 Ok"
        assert (await client.cmd("RCPT TO:<s@dest.test>")).startswith("452 4.5.3")
        assert (await client.cmd("RCPT TO:<bob>")).startswith("504 5.5.2")
        client.close()
        await asyncio.sleep(0.1)
        counts = {
            reason: rejected_count(relay, reason)
            for reason in ("syntax", "relay_denied", "size", "too_many_recipients")
        }
    assert counts == {"syntax": 2, "relay_denied": 1, "size": 1, "too_many_recipients": 1}


# -- 3. UTS-46 ----------------------------------------------------------------------------------


async def test_u_label_and_a_label_are_the_same_allowed_domain(
    upstream: Upstream, make_relay: Any
) -> None:
    senders = ["x@fa\u00df.de", "x@xn--fa-hia.de", "x@XN--FA-HIA.DE", "x@mail.fa\u00df.de"]
    async with make_relay(upstream, allowed_sender_domains="xn--fa-hia.de") as relay:
        for sender in senders:
            client = await ehlo(relay.port)
            utf8 = "" if sender.isascii() else " SMTPUTF8"
            assert await client.cmd(f"MAIL FROM:<{sender}>{utf8}") == "250 2.1.0 Ok"
            assert await client.cmd("RCPT TO:<r@dest.test>") == "250 2.1.5 Ok", sender
            assert (await client.cmd("DATA")).startswith("354")
            await client.send(MESSAGE + b".\r\n")
            assert (await client.reply()).startswith("250 2.0.0 Ok: queued as")
            client.close()
        await wait_until(lambda: len(upstream.state.messages) == len(senders), what="delivery")
    # Relayed exactly as approved.
    assert sorted(m.mail_from for m in upstream.state.messages) == sorted(senders)


async def test_ss_is_not_sharp_s(upstream: Upstream, make_relay: Any) -> None:
    # IDNA 2003 mapped faß.de to fass.de: a different domain was allowed.
    async with make_relay(upstream, allowed_sender_domains="fa\u00df.de") as relay:
        client = await ehlo(relay.port)
        assert await client.cmd("MAIL FROM:<x@fass.de>") == "250 2.1.0 Ok"
        assert await client.cmd("RCPT TO:<r@dest.test>") == (
            "554 5.7.1 <r@dest.test>: Relay access denied: sender domain fass.de is not in "
            "ALLOWED_SENDER_DOMAINS"
        )
        client.close()
    assert upstream.state.messages == []


@pytest.mark.parametrize(
    ("domain", "canonical"),
    [
        ("exa\u00admple.org", "example.org"),  # soft hyphen: ignored by UTS-46
        ("\uff45\uff58\uff41\uff4d\uff50\uff4c\uff45.org", "example.org"),  # full-width
        ("example\u3002org", "example.org"),  # ideographic full stop
        ("B\u00dcCHER.example", "xn--bcher-kva.example"),  # non-ASCII capital
        ("bu\u0308cher.example", "xn--bcher-kva.example"),  # not NFC
    ],
)
async def test_domains_not_in_normalised_form_are_refused(
    upstream: Upstream, make_relay: Any, logs: LogCapture, domain: str, canonical: str
) -> None:
    # Before: checked as example.org but relayed upstream as written.
    why = f"domain is not in UTS-46 normalized form (write it as {canonical})"
    async with make_relay(
        upstream, allowed_sender_domains="example.org b\u00fccher.example"
    ) as relay:
        client = await ehlo(relay.port)
        assert await client.cmd(f"MAIL FROM:<x@{domain}> SMTPUTF8") == (
            f"501 5.1.7 Bad sender address syntax: {why}"
        )
        assert await client.cmd("MAIL FROM:<x@example.org> SMTPUTF8") == "250 2.1.0 Ok"
        assert await client.cmd(f"RCPT TO:<r@{domain}>") == (
            f"501 5.1.3 Bad recipient address syntax: {why}"
        )
        client.close()
        await wait_until(lambda: logs.has("event=rejected", "501 5.1.3"))
    assert upstream.state.messages == []


async def test_operator_a_label_in_masquerade_domains(upstream: Upstream, make_relay: Any) -> None:
    async with make_relay(
        upstream, allowed_sender_domains="xn--fa-hia.de", masquerade_domains="fa\u00df.de"
    ) as relay:
        await relay.asend(
            "app@mail.xn--fa-hia.de",
            ["r@dest.test"],
            b"From: <app@mail.fa\xc3\x9f.de>\r\nSubject: x\r\n\r\nhi\r\n",
        )
        await wait_until(lambda: len(upstream.state.messages) == 1, what="delivery")
    got = upstream.state.messages[0]
    assert got.mail_from == "app@xn--fa-hia.de"
    assert b"From: <app@xn--fa-hia.de>\r\n" in got.content


# -- 4. log forging -----------------------------------------------------------------------------

CONTROLS = [chr(c) for c in [*range(0x20), 0x7F, *range(0x80, 0xA0)]]


def assert_clean_log(logs: LogCapture) -> None:
    text = logs.getvalue()
    for ch in CONTROLS:
        if ch != "\n":
            assert ch not in text, f"raw {ch!r} in the log"
    for line in text.split("\n"):
        if line:
            # Every line is one whole event: pyrelay's own, or a stdlib one (repr'd message).
            assert line.startswith(("timestamp=", "level=")), line


async def test_control_characters_never_reach_the_console_log_raw(
    upstream: Upstream, make_relay: Any, logs: LogCapture
) -> None:
    async with make_relay(upstream, allowed_sender_domains="example.org") as relay:

        async def command(client: RawClient, line: bytes) -> list[str]:
            # A raw LF ends the command line early: one reply per line sent.
            await client.send(line + b"\r\n")
            return await client.replies(line.count(b"\n") + 1)

        for ch in CONTROLS:
            raw = ch.encode()
            client = await session(relay.port)
            await command(client, b"EHLO a" + raw + b"b.test")
            await command(client, b"EHLO app.test")
            replies = await command(client, b"MAIL FROM:<a" + raw + b"b@example.org>")
            if any(r.startswith("250") for r in replies):
                await command(client, b"RSET")
            assert await command(client, b"MAIL FROM:<app@example.org>") == ["250 2.1.0 Ok"]
            await command(client, b"RCPT TO:<r" + raw + b"@dest.test>")
            await client.send(b"RCPT TO:<ok@dest.test>\r\n")
            assert (await client.reply()).startswith("250")
            await client.send(b"DATA\r\n")
            assert (await client.reply()).startswith("354")
            await client.send(
                b"Subject: x" + raw + b"y\r\nFrom: <f" + raw + b"@x.test>\r\n\r\n.\r\n"
            )
            assert (await client.reply()).startswith("250 2.0.0 Ok: queued as")
            client.close()
        # A forged sender as the issue sent it, on a session that is also accepted.
        client = await ehlo(relay.port)
        forged = b'MAIL FROM:<"\r\x1b[1Aevent=sent queue_id=FAKE\x07\x85"@example.org>\r\n'
        await client.send(forged)
        await client.reply()
        client.close()
        await wait_until(
            lambda: logs.getvalue().count("event=sent") >= len(CONTROLS), what="deliveries"
        )
    assert logs.has("event=rejected", "from=<a\\x1bb@example.org>")
    assert logs.has("event=rejected", "\\r\\x1b[1Aevent=sent queue_id=FAKE\\x07\\x85")
    assert_clean_log(logs)


# -- 5. duplicate recipients --------------------------------------------------------------------


async def test_duplicate_recipients_reach_the_upstream_once(
    upstream: Upstream, make_relay: Any
) -> None:
    rcpts = ["r@dest.test"] * 5 + ["r@DEST.test", "r@Dest.Test", "R@dest.test"]
    async with make_relay(upstream) as relay:
        client = await ehlo(relay.port)
        assert await client.cmd("MAIL FROM:<app@example.org>") == "250 2.1.0 Ok"
        for rcpt in rcpts:
            assert await client.cmd(f"RCPT TO:<{rcpt}>") == "250 2.1.5 Ok"
        assert (await client.cmd("DATA")).startswith("354")
        await client.send(MESSAGE + b".\r\n")
        assert (await client.reply()).startswith("250 2.0.0 Ok: queued as")
        client.close()
        await wait_until(lambda: len(upstream.state.messages) == 1, what="delivery")
        await asyncio.sleep(0.2)
    # The local part may be case-sensitive: R@ is another mailbox.
    assert [m.rcpt_tos for m in upstream.state.messages] == [["r@dest.test", "R@dest.test"]]


# -- 6. the bounce's sender ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"hostname": "relay.mail.example.org"}, b"MAILER-DAEMON@example.org"),
        ({"bounce_from": "postmaster@notices.example.org"}, b"postmaster@example.org"),
        ({"bounce_from": "bounces@other.test"}, b"bounces@other.test"),
    ],
)
async def test_bounce_from_is_configurable_and_masqueraded(
    upstream: Upstream, make_relay: Any, overrides: dict[str, str], expected: bytes
) -> None:
    upstream.state.rcpt_replies["nobody@dest.test"] = "550 5.1.1 <nobody@dest.test>: unknown"
    async with make_relay(upstream, **overrides) as relay:
        await relay.asend("app@example.org", ["nobody@dest.test"], MESSAGE)
        await wait_until(lambda: len(upstream.state.messages) == 1, what="the bounce")
    bounce = upstream.state.messages[0]
    assert bounce.mail_from == "" and bounce.rcpt_tos == ["app@example.org"]
    assert b"\r\nFrom: " + expected + b" (Mail Delivery System)\r\n" in b"\r\n" + bounce.content


# -- 8. the deferral text with RELAYHOST_TLS_LEVEL=none ----------------------------------------


async def test_tls_level_none_deferral_says_why(
    upstream: Upstream, make_relay: Any, logs: LogCapture
) -> None:
    # The upstream offers STARTTLS; TLS is off by configuration, so credentials stay home.
    async with make_relay(upstream, tls_level="none") as relay:
        await relay.asend("app@example.org", ["r@dest.test"], MESSAGE)
        await wait_until(lambda: logs.has("event=deferred"), what="deferral")
    assert logs.has("event=deferred", "(TLS is disabled by RELAYHOST_TLS_LEVEL=none)")
    assert not logs.has("did not offer STARTTLS")
    assert upstream.state.auth_attempts == []
    assert PASSWORD not in logs.getvalue()


# -- 9. connection slots ------------------------------------------------------------------------


async def test_one_client_cannot_take_every_slot(upstream: Upstream, make_relay: Any) -> None:
    async with make_relay(upstream) as relay:
        port = relay.port
        held: list[asyncio.StreamWriter] = []
        replies: list[str] = []
        for _ in range(60):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            held.append(writer)
            replies.append((await asyncio.wait_for(reader.readline(), 5)).decode().strip())
        assert all(r.startswith("220 relay.test") for r in replies[:50]), replies[:50]
        assert (
            replies[50:] == ["421 4.7.0 relay.test Error: too many connections from 127.0.0.1"] * 10
        )
        # Another client address (127.0.0.2 is loopback too) is still served.
        other = await ehlo(port, source="127.0.0.2")
        assert await other.cmd("MAIL FROM:<app@example.org>") == "250 2.1.0 Ok"
        other.close()
        # Slots come back when the sessions end.
        for writer in held:
            writer.close()
        await asyncio.sleep(0.3)
        again = await ehlo(port)
        again.close()
        assert await relay.asend("app@example.org", ["r@dest.test"], MESSAGE) == {}
    # PYRELAY_MAX_CONNECTIONS_PER_CLIENT=0: unlimited.
    async with make_relay(upstream, max_connections_per_client=0) as relay:
        clients = [await session(relay.port) for _ in range(55)]
        for c in clients:
            c.close()


@pytest.mark.parametrize("junk", ["NOOP", "RSET", "VRFY r@dest.test", "HELP", "EXPN list"])
async def test_junk_command_limit(
    upstream: Upstream, make_relay: Any, logs: LogCapture, junk: str
) -> None:
    async with make_relay(upstream) as relay:
        client = await ehlo(relay.port)
        for _ in range(100):
            assert (await client.cmd(junk))[0] in "25", junk
        assert await client.cmd(junk) == "421 4.7.0 relay.test Error: too many errors"
        assert await client.closed()
        await wait_until(lambda: logs.has("junk_command_limit", "client=127.0.0.1"))


async def test_junk_trickle_with_a_message_in_between(upstream: Upstream, make_relay: Any) -> None:
    # The limit is per session, like Postfix: a message in between does not reset it.
    def app(port: int) -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", port, local_hostname="app.test", timeout=10) as smtp:
            for _ in range(60):
                assert smtp.noop()[0] == 250
            smtp.sendmail("app@example.org", ["r@dest.test"], MESSAGE)
            for _ in range(40):
                assert smtp.noop()[0] == 250
            return smtp.noop()

    async with make_relay(upstream) as relay:
        assert await asyncio.to_thread(app, relay.port) == (
            421,
            b"4.7.0 relay.test Error: too many errors",
        )
        await wait_until(lambda: len(upstream.state.messages) == 1, what="delivery")


async def test_outsider_is_disconnected_after_its_554(
    upstream: Upstream, make_relay: Any, logs: LogCapture
) -> None:
    async with make_relay(upstream, mynetworks="127.0.0.1/32") as relay:
        client = await ehlo(relay.port, source="127.0.0.2")
        assert await client.cmd("MAIL FROM:<app@example.org>") == "250 2.1.0 Ok"
        # Pipelined: nothing after the rejected RCPT may be acted on.
        await client.send(
            b"RCPT TO:<r@dest.test>\r\nRCPT TO:<s@dest.test>\r\nDATA\r\n" + MESSAGE + b".\r\n"
        )
        assert await client.reply() == (
            "554 5.7.1 <127.0.0.2>: Client host rejected: Access denied"
        )
        assert await client.reply() == ""  # closed: no reply to the pipelined commands
        assert await client.closed()
        await wait_until(lambda: not relay.relay.listener.sessions, what="slot released")
        # An insider on the same listener is not affected.
        assert await relay.asend("app@example.org", ["r@dest.test"], MESSAGE) == {}
        await wait_until(lambda: len(upstream.state.messages) == 1, what="delivery")
    assert logs.has("event=rejected", "client=127.0.0.2", "Client host rejected")
