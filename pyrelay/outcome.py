"""What happens to a queue entry after a delivery attempt (the second half of qmgr(8)).

Per recipient: sent, deferred or bounced.  The order of the disk writes is what keeps Postfix's
guarantees across a crash or a failed write:

1. recipients delivered in this attempt are persisted (status file) *before* a bounce is written,
   so a failed bounce write can never re-send to them;
2. the bounce is queued as a new entry;
3. the entry then leaves the queue (nothing pending), or goes to ``deferred/`` with its status
   (or to ``hold/``, or away, when the operator asked for that during the attempt).
"""

from __future__ import annotations

import functools
import random
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from pyrelay.bounce import FailedRecipient, build_bounce
from pyrelay.config import Settings
from pyrelay.delivery import Outcome, RecipientResult
from pyrelay.errors import SpoolError
from pyrelay.logging import get_logger
from pyrelay.metrics import Metrics
from pyrelay.queuefile import Envelope
from pyrelay.reaper import Reaper
from pyrelay.rewrite import masquerade_address
from pyrelay.spool import Spool, crash_point
from pyrelay.wire import dot_stuff, header_block

log = get_logger("pyrelay.outcome")

# How much of a message a bounce quotes: its header block (Postfix header_size_limit).
BOUNCE_HEADERS = 102400


def retry_delay(
    attempts: int, min_backoff: float, max_backoff: float, rand: Callable[[], float] = random.random
) -> float:
    """Seconds until the next attempt after ``attempts`` failed ones (Postfix doubling), ±10 %
    jitter so that a burst deferred together does not retry together."""
    base = min(max_backoff, min_backoff * (2 ** max(0, attempts - 1)))
    return float(min(max_backoff, base * (0.9 + 0.2 * rand())))


def log_result(
    env: Envelope, res: RecipientResult, relay: str, delay: float, **extra: object
) -> None:
    """The Postfix-style delivery line: ``event=sent|deferred|bounced … status=X (reply)``."""
    outcome = res.outcome.value
    log.info(
        outcome,
        queue_id=env.queue_id,
        to=f"<{res.recipient}>",
        relay=relay,
        delay=delay,
        dsn=res.dsn,
        status=f"{outcome} ({res.reply})",
        **extra,
    )


class OutcomeRecorder:
    """Persists the results of one attempt on an entry in ``active/``."""

    def __init__(
        self,
        settings: Settings,
        spool: Spool,
        metrics: Metrics,
        submit: Callable[[Envelope, bytes | None], None],
        reaper: Reaper,
    ) -> None:
        self.settings = settings
        self.spool = spool
        self.reaper = reaper
        self.metrics = metrics
        self.submit = submit
        # Told the time of every deferral's next attempt (the primary's queue runner wakes up
        # for the soonest).
        self.on_deferred: Callable[[float], None] = lambda when: None

    async def record(
        self,
        env: Envelope,
        head: Callable[[], Awaitable[bytes]],
        results: list[RecipientResult],
        relay: str,
        *,
        relays: dict[str, str] | None = None,
        retry_in: float | None = None,
    ) -> None:
        """``relays``: the relay of each recipient where they differ (fallback, MX);
        ``retry_in``: a deferral that is not a failed attempt (rate limit, throttling, busy
        destination): retried after that many seconds, ``attempts`` unchanged."""
        now = time.time()
        delay = round(now - env.arrival, 2)
        sent: list[str] = []
        still: list[RecipientResult] = []
        bounced: list[RecipientResult] = []
        for res in results:
            if res.outcome is Outcome.SENT:
                sent.append(res.recipient)
                self.metrics.delivered.inc()
                log_result(env, res, (relays or {}).get(res.recipient, relay), delay)
            elif res.outcome is Outcome.BOUNCED:
                bounced.append(res)
            else:
                still.append(res)
        if still and now - env.arrival >= self.settings.queue_lifetime:
            bounced += [
                RecipientResult(
                    r.recipient,
                    Outcome.BOUNCED,
                    r.dsn,
                    f"message delivery time expired; last error: {r.reply}",
                )
                for r in still
            ]
            still = []
        for res in bounced:
            self.metrics.bounced.inc()
            log_result(env, res, (relays or {}).get(res.recipient, relay), delay)
        env.delivered += sent
        if bounced:
            if sent:
                # (1) above: the recipients just delivered must not be retried if (2) fails.
                env.recipients = [r.recipient for r in (*still, *bounced)]
                await self.spool.run(self.spool.write_status, env)
                crash_point("bounce-after-status")
            try:
                await self._bounce(env, head, bounced, relay)
            except SpoolError as exc:
                log.error(
                    "bounce_write_failed",
                    queue_id=env.queue_id,
                    reason=exc.reply,
                    note="the bounced recipients stay queued and are retried",
                )
                still += bounced
        if still:
            # Durable only when this attempt changed some recipient's state.
            changed = bool(sent or bounced)
            await self._defer(
                env, still, relay, delay, now, relays=relays, retry_in=retry_in, durable=changed
            )
        else:
            self.metrics.latency.observe(now - env.arrival)
            await self._finished(env)

    async def _defer(
        self,
        env: Envelope,
        still: list[RecipientResult],
        relay: str,
        delay: float,
        now: float,
        *,
        relays: dict[str, str] | None = None,
        retry_in: float | None = None,
        durable: bool = True,
    ) -> None:
        if retry_in is None:
            env.attempts += 1
            wait = retry_delay(env.attempts, self.settings.min_backoff, self.settings.max_backoff)
        else:
            wait = retry_in * (0.9 + 0.2 * random.random())
        env.recipients = [r.recipient for r in still]
        env.next_attempt = now + wait
        env.last_error = still[0].reply
        action = self.spool.pending_request(env.queue_id)
        if action == "delete":
            await self._finished(env, why="deleted by the operator during its delivery")
            return
        dst = "hold" if action == "hold" else "deferred"
        await self.spool.run(
            functools.partial(self.spool.defer, env, dst, durable=durable or dst == "hold")
        )
        if action == "hold":
            self.spool.clear_request(env.queue_id)
            log.info("held", queue_id=env.queue_id, reason="hold requested during delivery")
        for res in still:
            self.metrics.deferred.inc()
            log_result(
                env,
                res,
                (relays or {}).get(res.recipient, relay),
                delay,
                next_attempt_in=round(wait, 1) if wait < 10 else round(wait),
            )
        if dst == "deferred":
            self.on_deferred(env.next_attempt)

    async def _finished(self, env: Envelope, *, why: str = "") -> None:
        """The entry leaves the queue: unlinked by the reaper, off the loop and in a batch
        (``removed`` is logged then).  Until then it is in ``active/``, where a restart finds it
        (the documented at-least-once window): when too many wait for that, this waits."""
        self.reaper.remove(env.queue_id, why)
        await self.reaper.room()

    def bounce_sender(self) -> str:
        """``PYRELAY_BOUNCE_FROM`` (MAILER-DAEMON@<hostname>), through MASQUERADED_DOMAINS like
        any header sender (Postfix rewrites its bounces in cleanup too)."""
        address = self.settings.bounce_from
        masq = self.settings.masquerade_domains
        return masquerade_address(address, masq) if masq else address

    async def _bounce(
        self,
        env: Envelope,
        head: Callable[[], Awaitable[bytes]],
        bounced: list[RecipientResult],
        relay: str,
    ) -> None:
        if env.sender == "":
            # RFC 5321 6.1: never bounce a bounce.  A provider refusing our bounce (often its
            # sender address) is worth an error: the original sender is never told.
            log.error(
                "bounce_suppressed",
                queue_id=env.queue_id,
                reason=bounced[0].reply,
                note="a bounce is never bounced; check PYRELAY_BOUNCE_FROM / MASQUERADED_DOMAINS",
            )
            return
        bounce_id = self.spool.new_id()
        remote = None if relay == "none" else relay.split("[", 1)[0]
        body = build_bounce(
            hostname=self.settings.hostname,
            from_address=self.bounce_sender(),
            queue_id=env.queue_id,
            bounce_queue_id=bounce_id,
            sender=env.sender,
            recipients=[FailedRecipient(r.recipient, r.dsn, r.reply, remote) for r in bounced],
            original_headers=header_block(await head()),
            arrival=datetime.fromtimestamp(env.arrival, UTC),
            now=datetime.now(UTC),
        )
        wire = dot_stuff(body)
        notice = Envelope(
            queue_id=bounce_id,
            sender="",
            recipients=[env.sender],
            arrival=time.time(),
            client="localhost",
            smtputf8=env.smtputf8 and not env.sender.isascii(),
            eightbit=not wire.isascii(),
        )
        await self.spool.store(notice, [wire])
        log.info("bounce_queued", queue_id=env.queue_id, bounce_id=bounce_id, to=f"<{env.sender}>")
        self.submit(notice, wire)
