"""SMTP smuggling (CVE-2023-51764, CVE-2023-51765/51766, CVE-2024-27305).

A client hides a second transaction behind an end-of-data sequence that pyrelay does not treat
as one (``<LF>.<CR><LF>``, ``<CR>.<CR><LF>``, ``<CR><LF>.<LF>`` ...).  pyrelay must never let
the upstream see a different message boundary than it saw itself.  The upstream here is
``FaultUpstream`` with a deliberately *lax* end-of-data parser (any "." line ended by CRLF, bare
LF or bare CR), like the vulnerable servers of the CVEs: if pyrelay relayed any such sequence
verbatim, the upstream would record an extra message for the smuggled recipient.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest
from faulty_upstream import FaultMessage, FaultUpstream, RawClient, spool_files

from conftest import LogCapture, MakeFault, wait_until

SMUGGLED = (
    b"MAIL FROM:<ceo@example.org>\r\n"
    b"RCPT TO:<victim@dest.test>\r\n"
    b"DATA\r\n"
    b"From: CEO <ceo@example.org>\r\n"
    b"Subject: smuggled\r\n"
    b"\r\n"
    b"wire the money\r\n"
)

# Every end-of-data look-alike that some server once honoured.
FAKE_ENDS = [
    b"\n.\r\n",
    b"\r.\r\n",
    b"\r\n.\n",
    b"\n.\n",
    b"\r.\r",
    b"\r\n.\r",
    b"\n.\r",
    b"\r.\n",
    b"\r\n\x00.\r\n",
    b"\n..\n",
    b"\r\n.\r\r\n",
    b"\r\n.\n\r\n",
]

LAX_END = re.compile(rb"(?:\r\n|\n|\r)\.(?:\r\n|\n|\r)")


async def transaction(port: int, payload: bytes, *, rcpt: str = "alice@dest.test") -> str:
    """One raw transaction: ``payload`` is sent verbatim after ``DATA``, then the real
    terminator.  Returns the reply to the end of data."""
    client = await RawClient.connect(port)
    try:
        assert (await client.reply()).startswith("220")
        assert (await client.cmd("EHLO app.test")).startswith("250")
        assert (await client.cmd("MAIL FROM:<app@example.org>")).startswith("250")
        assert (await client.cmd(f"RCPT TO:<{rcpt}>")).startswith("250")
        assert (await client.cmd("DATA")).startswith("354")
        await client.send(payload + b"\r\n.\r\n")
        reply = await client.reply()
        assert (await client.cmd("QUIT")).startswith("221")
        return reply
    finally:
        client.close()


async def relay_once(make_relay: Any, up: FaultUpstream, payload: bytes) -> str:
    """Send ``payload`` through a fresh relay to ``up``; return the reply to the end of data,
    after the delivery (if accepted) and a little longer: a smuggled second message would have
    arrived by then too."""
    async with make_relay(up) as relay:
        reply = await transaction(relay.port, payload)
        if reply.startswith("250"):
            await wait_until(lambda: len(up.messages) >= 1, what="delivery")
        await asyncio.sleep(0.3)
    return reply


def assert_clean_wire(msg: FaultMessage) -> None:
    data = msg.data
    # Clean wire form: every CR is part of a CRLF, every LF too.
    assert data.count(b"\r") == data.count(b"\r\n") == data.count(b"\n"), data
    # No line that is just "." (it would end the message at the next hop)...
    assert b"\r\n.\r\n" not in b"\r\n" + data
    # ...not even for a lax next hop.
    assert not LAX_END.search(b"\r\n" + data), data


def body_of(msg: FaultMessage) -> bytes:
    return msg.data.partition(b"\r\n\r\n")[2]


@pytest.mark.parametrize("fake_end", FAKE_ENDS, ids=[repr(f)[2:-1] for f in FAKE_ENDS])
async def test_smuggled_transaction_in_body_is_never_a_second_message(
    make_relay: Any, fault: MakeFault, logs: LogCapture, fake_end: bytes
) -> None:
    up = await fault()
    payload = b"From: app@example.org\r\nSubject: innocent\r\n\r\nhello" + fake_end + SMUGGLED
    reply = await relay_once(make_relay, up, payload)
    # Either refused outright (Postfix smtpd_forbid_bare_newline=reject) or normalised.
    if not reply.startswith("250"):
        assert reply.startswith("550 5.5.2"), reply
    assert all(m.rcpt_tos == ["alice@dest.test"] for m in up.messages), up.messages
    assert len(up.messages) == (1 if reply.startswith("250") else 0)
    assert "victim@dest.test" not in up.recipients
    assert not any("victim" in cmd for _, cmd in up.commands)
    for msg in up.messages:
        assert_clean_wire(msg)
        # The smuggled commands stayed message text.
        assert b"RCPT TO:<victim@dest.test>" in msg.data


@pytest.mark.parametrize("fake_end", [b"\n.\r\n", b"\r.\r\n", b"\n.\n", b"\r\n.\n"])
async def test_smuggling_inside_the_header_section(
    make_relay: Any, fault: MakeFault, fake_end: bytes
) -> None:
    up = await fault()
    payload = b"From: app@example.org\r\nSubject: a" + fake_end + SMUGGLED
    await relay_once(make_relay, up, payload)
    assert len(up.messages) <= 1 and "victim@dest.test" not in up.recipients
    for msg in up.messages:
        assert_clean_wire(msg)


async def test_all_variants_in_one_message(make_relay: Any, fault: MakeFault) -> None:
    up = await fault()
    payload = b"Subject: many\r\n\r\n" + b"".join(b"x" + end + SMUGGLED for end in FAKE_ENDS)
    await relay_once(make_relay, up, payload)
    assert len(up.messages) <= 1 and "victim@dest.test" not in up.recipients
    for msg in up.messages:
        assert_clean_wire(msg)


async def test_bare_lf_terminator_does_not_end_data(
    make_relay: Any, fault: MakeFault, tmp_path: Path
) -> None:
    """A client that ends DATA with ``<LF>.<LF>`` has not ended it: the commands after it are
    message text, and without the real terminator nothing is queued (the client times out)."""
    up = await fault()
    async with make_relay(up, command_timeout="1s") as relay:
        client = await RawClient.connect(relay.port)
        assert (await client.reply()).startswith("220")
        assert (await client.cmd("EHLO app.test")).startswith("250")
        assert (await client.cmd("MAIL FROM:<app@example.org>")).startswith("250")
        assert (await client.cmd("RCPT TO:<alice@dest.test>")).startswith("250")
        assert (await client.cmd("DATA")).startswith("354")
        await client.send(b"Subject: x\n\nbody\n.\nMAIL FROM:<ceo@example.org>\nQUIT\n")
        # No reply until the session times out: the data never ended.
        reply = await client.reply(timeout=5)
        assert reply.startswith("421 4.4.2"), reply
        assert await client.closed()
        client.close()
        await asyncio.sleep(0.3)
        assert spool_files(tmp_path / "spool") == []
    assert up.messages == []


async def test_dot_stuffing_survives_relay(make_relay: Any, fault: MakeFault) -> None:
    """Lines starting with "." arrive at the upstream still stuffed; a "." line in the text the
    client meant (sent as "..") stays one line of text."""
    up = await fault(lax_terminator=False)
    payload = b"Subject: dots\r\n\r\n..\r\n...\r\n..leading\r\nend"
    async with make_relay(up) as relay:
        reply = await transaction(relay.port, payload)
        assert reply.startswith("250")
        await wait_until(lambda: len(up.messages) == 1)
    assert body_of(up.messages[0]) == b"..\r\n...\r\n..leading\r\nend\r\n"
    assert_clean_wire(up.messages[0])


async def test_pipelined_commands_after_terminator_are_not_smuggling(
    make_relay: Any, fault: MakeFault
) -> None:
    """The genuine ``<CR><LF>.<CR><LF>`` ends the message; what follows in the same packet is a
    second transaction that pyrelay itself saw and answered, so it is relayed as exactly that."""
    up = await fault()
    async with make_relay(up) as relay:
        client = await RawClient.connect(relay.port)
        assert (await client.reply()).startswith("220")
        assert (await client.cmd("EHLO app.test")).startswith("250")
        assert (await client.cmd("MAIL FROM:<app@example.org>")).startswith("250")
        assert (await client.cmd("RCPT TO:<alice@dest.test>")).startswith("250")
        assert (await client.cmd("DATA")).startswith("354")
        await client.send(b"Subject: one\r\n\r\nfirst\r\n.\r\n" + SMUGGLED + b".\r\nQUIT\r\n")
        replies = await client.replies(6)
        client.close()
        await wait_until(lambda: len(up.messages) == 2, what="two messages")
    assert [r[:3] for r in replies] == ["250", "250", "250", "354", "250", "221"], replies
    assert sorted(up.recipients) == ["alice@dest.test", "victim@dest.test"]
    for msg in up.messages:
        assert_clean_wire(msg)
