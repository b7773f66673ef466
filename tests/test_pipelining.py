"""Upstream PIPELINING (RFC 2920): MAIL, every RCPT and DATA in one write when the upstream
offers it, one at a time when it does not, and each recipient's reply mapped exactly either way."""

from __future__ import annotations

from typing import Any

import pytest

from conftest import MESSAGE, LogCapture, MakeFault, wait_until

FAST = {"upstream_command_timeout": "3s", "upstream_data_timeout": "3s"}
RCPTS = ["ok@dest.test", "gone@dest.test", "busy@dest.test"]


def _events(logs: LogCapture, event: str) -> dict[str, str]:
    out = {}
    for line in logs.lines():
        if f"event={event} " in line and "to=<" in line:
            out[line.split("to=<", 1)[1].split(">", 1)[0]] = line
    return out


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "one-by-one"])
async def test_partial_rcpt_failures_map_to_each_recipient(
    make_relay: Any, logs: LogCapture, fault: MakeFault, pipelining: bool
) -> None:
    up = await fault(
        offer_pipelining=pipelining,
        rcpt_replies={
            "gone@dest.test": "550 5.1.1 <gone@dest.test>: unknown",
            "busy@dest.test": "452 4.2.2 <busy@dest.test>: mailbox full",
        },
    )
    async with make_relay(up, **FAST) as relay:
        await relay.asend("a@example.org", RCPTS, MESSAGE)
        await wait_until(lambda: "ok@dest.test" in _events(logs, "sent"), what="delivery")
        await wait_until(lambda: "busy@dest.test" in _events(logs, "deferred"), what="deferral")
        await wait_until(lambda: "gone@dest.test" in _events(logs, "bounced"), what="bounce")
    assert [m.rcpt_tos for m in up.messages][0] == ["ok@dest.test"]
    assert "dsn=5.1.1" in _events(logs, "bounced")["gone@dest.test"]
    assert "dsn=4.2.2" in _events(logs, "deferred")["busy@dest.test"]
    # Pipelined: one write carried MAIL, every RCPT and DATA.  Otherwise never two commands.
    batched = [r for r in up.reads if b"MAIL FROM:" in r and b"DATA\r\n" in r]
    if pipelining:
        assert batched and all(f"RCPT TO:<{r}>".encode() in batched[0] for r in RCPTS)
    else:
        assert not any(b"MAIL FROM:" in r and b"RCPT TO:" in r for r in up.reads)


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "one-by-one"])
async def test_mail_refused_bounces_every_recipient_and_sends_no_message(
    make_relay: Any, logs: LogCapture, fault: MakeFault, pipelining: bool
) -> None:
    up = await fault(
        offer_pipelining=pipelining, replies={"MAIL": "550 5.7.1 sender not allowed here"}
    )
    async with make_relay(up, **FAST) as relay:
        await relay.asend("a@example.org", RCPTS[:2], MESSAGE)
        await wait_until(lambda: len(_events(logs, "bounced")) >= 2, what="bounces")
    bounced = _events(logs, "bounced")
    assert all("(in reply to MAIL FROM command)" in bounced[r] for r in RCPTS[:2])
    assert up.messages == []


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "one-by-one"])
async def test_4xx_to_data_defers_the_accepted_recipients(
    make_relay: Any, logs: LogCapture, fault: MakeFault, pipelining: bool
) -> None:
    up = await fault(
        offer_pipelining=pipelining,
        replies={"DATA": "451 4.3.0 try again later"},
        rcpt_replies={"gone@dest.test": "550 5.1.1 unknown"},
    )
    async with make_relay(up, **FAST) as relay:
        await relay.asend("a@example.org", RCPTS[:2], MESSAGE)
        await wait_until(lambda: "ok@dest.test" in _events(logs, "deferred"), what="deferral")
        await wait_until(lambda: "gone@dest.test" in _events(logs, "bounced"), what="bounce")
    assert "(in reply to DATA command)" in _events(logs, "deferred")["ok@dest.test"]
    assert up.messages == []


async def test_pipelined_session_is_reused_for_the_next_message(
    make_relay: Any, logs: LogCapture, fault: MakeFault
) -> None:
    up = await fault()
    async with make_relay(up, concurrency=1, **FAST) as relay:
        for i in range(3):
            await relay.asend("a@example.org", [f"r{i}@dest.test"], MESSAGE)
            await wait_until(lambda i=i: len(up.messages) == i + 1, what=f"delivery {i}")
    assert up.connections == 1
    assert len(up.messages) == 3
