"""Queue hand-off: forward queued entries to a peer relay over SMTP (``pyrelay queue handoff
--to HOST:PORT``, and ``PYRELAY_HANDOFF_TO`` at the end of a drain that timed out).

Each entry goes as it is queued: the envelope sender, the *remaining* recipients, and the message
bytes as spooled (already rewritten: the peer adds its own ``Received:``; nothing is masqueraded
twice here, and masquerading is idempotent anyway).  The entry is claimed first (a rename into
``active/``), so no local delivery races it; it is removed only after the peer's ``250`` for that
message, and put back into ``deferred/`` (due now) on any failure.

The peer accepts because this relay's address is in its ``MYNETWORKS``.  Duplicates are possible
in one window only: the peer said ``250`` and this process died before the unlink (the same
at-least-once window as an upstream delivery).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import cast

import aiosmtplib

from pyrelay.config import HostPort, Settings
from pyrelay.delivery import one_line
from pyrelay.logging import get_logger
from pyrelay.metrics import Metrics
from pyrelay.queuefile import CorruptEntry
from pyrelay.spool import Spool, SpoolBody
from pyrelay.transaction import (
    BadCommand,
    ConnectionLost,
    Garbled,
    Replies,
    Reply,
    ReplyTimeout,
    Transaction,
    command_arg,
    run_transaction,
)

log = get_logger("pyrelay.handoff")

# Parallel connections to the peer.
CONNECTIONS = 4


@dataclass
class HandoffResult:
    handed_off: int = 0
    failed: int = 0
    skipped: int = 0  # gone or claimed by someone else meanwhile
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.handed_off / self.seconds if self.seconds > 0 else 0.0


class HandoffError(Exception):
    """One entry could not be handed off (the text says why, in the peer's words)."""


async def handoff(
    spool: Spool,
    settings: Settings,
    target: HostPort,
    *,
    states: Iterable[str] = ("deferred", "incoming"),
    metrics: Metrics | None = None,
    connections: int = CONNECTIONS,
    timeout: float = 30.0,
) -> HandoffResult:
    """Forward every entry in ``states`` (``active`` included: entries nobody delivers any more,
    e.g. after the delivery agents stopped) to ``target``."""
    started = time.monotonic()
    work: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
    for state in states:
        for queue_id in await asyncio.to_thread(_sorted_ids, spool, state):
            work.put_nowait((queue_id, state))
    result = HandoffResult()
    if work.empty():
        return result
    log.info("handoff_started", to=str(target), messages=work.qsize())

    async def worker() -> None:
        client: aiosmtplib.SMTP | None = None
        try:
            while True:
                try:
                    queue_id, state = work.get_nowait()
                except asyncio.QueueEmpty:
                    return
                try:
                    if client is None or not client.is_connected:
                        client = await _connect(settings, target, timeout)
                    outcome = await _forward(spool, client, queue_id, state, target, timeout)
                except (HandoffError, aiosmtplib.SMTPException, OSError) as exc:
                    text = one_line(str(exc)) or type(exc).__name__
                    result.failed += 1
                    result.errors.append(f"{queue_id}: {text}")
                    if metrics is not None:
                        metrics.handoff.labels(result="failed").inc()
                    log.warning("handoff_failed", queue_id=queue_id, to=str(target), reason=text)
                    if client is not None and not isinstance(exc, HandoffError):
                        client.close()
                        client = None
                    continue
                if outcome:
                    result.handed_off += 1
                    if metrics is not None:
                        metrics.handoff.labels(result="handed_off").inc()
                else:
                    result.skipped += 1
        finally:
            if client is not None and client.is_connected:
                with contextlib.suppress(aiosmtplib.SMTPException, OSError, TimeoutError):
                    await asyncio.wait_for(client.quit(), 2)
                client.close()

    await asyncio.gather(*(worker() for _ in range(max(1, connections))))
    result.seconds = time.monotonic() - started
    log.info(
        "handoff_finished",
        to=str(target),
        handed_off=result.handed_off,
        failed=result.failed,
        skipped=result.skipped,
        seconds=round(result.seconds, 3),
        rate=round(result.rate, 1),
    )
    return result


def _sorted_ids(spool: Spool, state: str) -> list[str]:
    return sorted(spool.ids(state))  # oldest first: queue IDs start with the arrival time


async def _connect(settings: Settings, target: HostPort, timeout: float) -> aiosmtplib.SMTP:
    # Plain SMTP inside the cluster network (the peer's listener has no TLS yet); the
    # NetworkPolicy limits who can reach it.
    client = aiosmtplib.SMTP(
        hostname=target.host,
        port=target.port,
        local_hostname=settings.hostname,
        timeout=timeout,
        start_tls=False,
        use_tls=False,
    )
    await client.connect()
    return client


async def _forward(
    spool: Spool,
    client: aiosmtplib.SMTP,
    queue_id: str,
    state: str,
    target: HostPort,
    timeout: float,
) -> bool:
    """Hand one entry off; False when it was not there to take.  Raises on failure, after
    putting the entry back into ``deferred/``."""
    if state != "active" and not await asyncio.to_thread(spool.claim, queue_id, state):
        return False
    try:
        entry = await asyncio.to_thread(spool.open_entry, "active", queue_id)
    except FileNotFoundError:
        return False
    except CorruptEntry as exc:
        spool.quarantine("active", queue_id)
        raise HandoffError(f"corrupt queue file, moved to corrupt/: {exc}") from None
    try:
        env = entry.envelope
        if not env.recipients:
            await asyncio.to_thread(spool.remove, queue_id, "active")
            return True
        options = []
        if client.supports_extension("size"):
            options.append(b"SIZE=%d" % env.size)
        if env.eightbit and client.supports_extension("8bitmime"):
            options.append(b"BODY=8BITMIME")
        if env.smtputf8:
            options.append(b"SMTPUTF8")
        encoding = "utf-8" if env.smtputf8 else "ascii"
        if client.last_ehlo_response is None:
            await client.ehlo()
        try:
            mail = b" ".join([b"MAIL FROM:" + command_arg(env.sender, encoding), *options])
            rcpts = [(r, command_arg(r, encoding)) for r in env.recipients]
        except BadCommand as exc:
            raise HandoffError(f"cannot hand off: {exc}") from None
        transport = client.transport
        if transport is None or transport.is_closing():
            raise HandoffError(f"lost connection with {target}")
        tx = Transaction(cast(asyncio.Transport, transport), timeout)
        try:
            async with tx:
                replies = await run_transaction(
                    tx,
                    mail,
                    rcpts,
                    SpoolBody(spool, entry),
                    pipelining=client.supports_extension("pipelining"),
                    reset_first=False,
                )
        except (ConnectionLost, ReplyTimeout, Garbled, OSError) as exc:
            client.close()
            raise HandoffError(f"{target}: {exc} while sending {tx.stage}") from None
        refused = _refusal(replies)
        if refused is not None:
            with contextlib.suppress(aiosmtplib.SMTPException, OSError):
                await client.rset()
            raise HandoffError(f"{target} said: {refused.code} {one_line(refused.text)}")
        reply = replies.final
        assert reply is not None
        # The peer has it: only now does it leave this queue.
        await asyncio.to_thread(spool.remove, queue_id, "active")
    except BaseException:
        _put_back(spool, queue_id)
        raise
    finally:
        entry.close()
    log.info(
        "handed_off",
        queue_id=queue_id,
        to=str(target),
        nrcpt=len(env.recipients),
        size=env.size,
        reply=f"{reply.code} {one_line(reply.text)}",
    )
    return True


def _refusal(replies: Replies) -> Reply | None:
    """The first reply that means the peer did not take the whole message, or None."""
    if not replies.mail.ok:
        return replies.mail
    for reply in replies.rcpts.values():
        if not reply.ok:
            return reply
    if replies.data is not None and replies.data.code != 354:
        return replies.data
    if replies.final is None or not replies.final.ok:
        return replies.final or replies.mail
    return None


def _put_back(spool: Spool, queue_id: str) -> None:
    """Return a claimed entry to ``deferred/``, due now (its status file is untouched)."""
    with contextlib.suppress(OSError):
        now = time.time()
        os.utime(spool.path("active", queue_id), (now, now))
    with contextlib.suppress(OSError):
        spool.move(queue_id, "active", "deferred")
