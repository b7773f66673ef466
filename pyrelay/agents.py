"""Delivery agents: ``PYRELAY_CONCURRENCY`` tasks that take work items from the scheduler's
active queue, claim the entry (a rename into ``active/``), run one attempt upstream over a
reused connection, and hand the results to the outcome recorder.

The attempt follows the sender's route (``pyrelay.routes``): its rate (``pyrelay.ratelimit``),
its relay host and, when that fails temporarily, its fallback in the same attempt; or the
recipients' MX hosts (``pyrelay.mx``).  An agent keeps one session per relay target.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pyrelay.config import DeliveryMode, Settings
from pyrelay.delivery import InMemoryBody, Outcome, RecipientResult, Session, Tried, Upstream
from pyrelay.errors import DeliveryError
from pyrelay.logging import get_logger
from pyrelay.metrics import Metrics
from pyrelay.outcome import BOUNCE_HEADERS, OutcomeRecorder
from pyrelay.queuefile import CorruptEntry, Envelope
from pyrelay.ratelimit import RateLimiter, is_throttling
from pyrelay.reaper import Reaper
from pyrelay.routes import Route, RouteTable, Target, route_counter
from pyrelay.spool import ClaimError, OpenEntry, Spool, SpoolBody
from pyrelay.transaction import MessageBody

if TYPE_CHECKING:
    from pyrelay.mx import MXDelivery

log = get_logger("pyrelay.agents")


@dataclass(frozen=True, slots=True)
class FreshMessage:
    """Accepted just now by this process: the envelope (and a small message's bytes) are still
    in memory, so the first attempt reads nothing back."""

    envelope: Envelope
    payload: bytes | None

    @property
    def queue_id(self) -> str:
        return self.envelope.queue_id

    @property
    def state(self) -> str:
        return self.envelope.state  # incoming, or active when accepted claimed


@dataclass(frozen=True, slots=True)
class DueEntry:
    """A queue entry found on disk (due in ``deferred/``, or left in ``incoming/``)."""

    queue_id: str
    state: str


WorkItem = FreshMessage | DueEntry
Sessions = dict[object, Session]
# Open sessions an agent keeps (one per relay target); past it the oldest is closed.
SESSIONS_PER_AGENT = 8


@dataclass(slots=True)
class Attempt:
    """What one attempt did: per-recipient results, the relay that took the message (the
    relay of each recipient when they differ), and ``retry_in`` when every deferral was "not
    now" (rate limit, throttling, busy destination) rather than a failed attempt."""

    results: list[RecipientResult]
    relay: str
    relays: dict[str, str] | None = None
    retry_in: float | None = None


def _deferred(recipients: list[str], dsn: str, text: str) -> list[RecipientResult]:
    return [RecipientResult(r, Outcome.DEFERRED, dsn, text) for r in recipients]


class Suspension:
    """Like qmgr's dead-destination marking: after a connection-level failure, do not hammer a
    broken upstream with every queued message; they are deferred with the same reason until it
    is tried again."""

    STEPS = frozenset({"dns", "tcp", "greeting", "tls", "auth"})

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.reason: DeliveryError | None = None
        self.until = 0.0

    def active(self) -> DeliveryError | None:
        if self.reason is not None and time.monotonic() < self.until:
            return self.reason
        return None

    def failed(self, exc: DeliveryError) -> None:
        if exc.kind in self.STEPS:
            self.reason = exc
            self.until = time.monotonic() + min(60.0, self.settings.min_backoff)

    def clear(self) -> None:
        self.reason = None


class DeliveryAgents:
    def __init__(
        self,
        settings: Settings,
        spool: Spool,
        metrics: Metrics,
        upstream: Upstream,
        recorder: OutcomeRecorder,
        take: Callable[[], Awaitable[WorkItem]],
        reaper: Reaper,
    ) -> None:
        self.settings = settings
        self.spool = spool
        self.metrics = metrics
        self.upstream = upstream
        self.recorder = recorder
        self.take = take
        self.reaper = reaper
        self.suspension = Suspension(settings)
        self.routes = RouteTable(settings)
        self.limiter = RateLimiter(settings.spool_dir)
        self.route_results = metrics.counter(route_counter)
        self.mx: MXDelivery | None = None
        if settings.delivery is DeliveryMode.MX:
            # dnspython only when MX delivery is configured (idle memory of every process).
            from pyrelay.mx import MXDelivery

            self.mx = MXDelivery(settings, self._via)
        default = self.routes.default.primary
        self._upstreams: dict[object, Upstream] = {default.key: upstream} if default else {}
        self._suspensions: dict[object, Suspension] = (
            {default.key: self.suspension} if default else {}
        )
        self._route_active: dict[str, int] = {}
        self.busy_retry = max(0.5, min(settings.min_backoff, 5.0))
        self._tasks: list[asyncio.Task[None]] = []
        self._busy: dict[asyncio.Task[None], str] = {}
        self._inflight: dict[asyncio.Task[None], asyncio.Future[None]] = {}
        self._closing = False

    def start(self) -> None:
        for i in range(self.settings.concurrency):
            self._tasks.append(asyncio.create_task(self._run(), name=f"pyrelay-agent-{i}"))

    @property
    def busy(self) -> int:
        return len(self._busy)

    async def stop(self, grace: float) -> None:
        """Take no new work; let attempts in flight finish within ``grace`` seconds.  Whatever is
        not finished stays in the spool (``active/``) and is retried at the next start."""
        self._closing = True
        self.reaper.closing = True
        for task in self._tasks:
            if task not in self._busy:
                task.cancel()
        busy = list(self._busy)
        if busy:
            log.info("shutdown_waiting", deliveries=len(busy), grace=grace)
            _, pending = await asyncio.wait(busy, timeout=grace)
            inner = [self._inflight[t] for t in pending if t in self._inflight]
            for task in pending:
                log.warning("shutdown_cancelled", queue_id=self._busy.get(task, "?"))
                task.cancel()
            if inner:
                # The attempts run shielded from their agents; stop them too.  A cancel can be
                # lost (Python 3.11's wait_for swallows it when the reply arrives in the same
                # loop iteration), so also close the connections: every wait on the upstream
                # ends now, and the messages stay queued (delivered again later if the upstream
                # had them already: the at-least-once window).
                for fut in inner:
                    fut.cancel()
                for up in self._upstreams.values():
                    up.abort_all()
                if self.mx is not None:
                    self.mx.abort_all()
                await asyncio.wait(inner, timeout=1.0)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.limiter.close()

    def clear_suspensions(self) -> None:
        """``pyrelay queue flush``: try every relay target and destination again."""
        for suspension in self._suspensions.values():
            suspension.clear()
        if self.mx is not None:
            self.mx.clear()

    async def _run(self) -> None:
        sessions: Sessions = {}
        idle = self.settings.upstream_idle_timeout
        task = asyncio.current_task()
        assert task is not None
        try:
            while not self._closing:
                try:
                    if not sessions:
                        item = await self.take()
                    else:
                        item = await asyncio.wait_for(self.take(), idle)
                except TimeoutError:
                    idle_sessions = list(sessions.values())
                    sessions.clear()
                    for session in idle_sessions:
                        await self.upstream.close(session)
                    continue
                if self._closing:
                    break  # durable on disk; the next start picks it up
                self._busy[task] = item.queue_id
                inner = asyncio.ensure_future(self._deliver(item, sessions))
                self._inflight[task] = inner
                try:
                    await asyncio.shield(inner)
                finally:
                    self._busy.pop(task, None)
                    self._inflight.pop(task, None)
        finally:
            for session in sessions.values():
                session.client.close()

    async def _deliver(self, item: WorkItem, sessions: Sessions) -> None:
        queue_id = item.queue_id
        entry: OpenEntry | None = None
        try:
            if isinstance(item, FreshMessage) and item.payload is not None:
                # In memory already: only the claim (none when accepted into active/).
                if item.state != "active" and not await self._claim_fresh(item):
                    return
                env = item.envelope
                body: MessageBody = InMemoryBody(item.payload)
                payload = item.payload

                async def head() -> bytes:
                    return payload[:BOUNCE_HEADERS]

            else:
                entry = await self._take(item)
                if entry is None:
                    return
                env = entry.envelope
                spool_body = SpoolBody(self.spool, entry)
                body = spool_body

                async def head() -> bytes:
                    return await spool_body.head(BOUNCE_HEADERS)

            try:
                attempt = await self._attempt(env, body, sessions)
            except Exception as exc:
                # A bug must not turn into endless immediate retries: record it as a deferral,
                # so that attempts are counted, backoff applies and the queue lifetime ends it.
                log.exception("delivery_crashed", queue_id=queue_id)
                for session in sessions.values():
                    session.client.close()  # their state is unknown: never reuse them
                sessions.clear()
                reason = (
                    f"internal error during delivery ({type(exc).__name__}), see delivery_crashed"
                )
                attempt = Attempt(_deferred(env.recipients, "4.3.0", reason), "none")
            await self._record(env, head, attempt)
        finally:
            if entry is not None:
                # Before its unlink as a rule (then the unlink in the reaper's thread frees the
                # inode); the descriptor is closed at once, whatever the reaper's backlog.
                entry.close()

    async def _claim_fresh(self, item: FreshMessage) -> bool:
        """Claim a message that is in memory; in a thread: a rename is journal work (it was 7 %
        of the event loop's time at 10 clients)."""
        job = functools.partial(self.spool.claim_checked, item.state, item.queue_id)
        if not await self._claim(item.queue_id, job):
            return False
        item.envelope.state = "active"
        return True

    async def _take(self, item: WorkItem) -> OpenEntry | None:
        """Claim and open a queued entry in one thread job (a small message is read with its
        envelope); None when there is nothing to deliver."""
        queue_id = item.queue_id
        job = functools.partial(self.spool.take, item.state, queue_id, preload=SpoolBody.CHUNK)
        try:
            result = await self._claim(queue_id, job)
        except CorruptEntry as exc:
            log.error("corrupt_queue_file", queue_id=queue_id, reason=str(exc))
            self.spool.quarantine("active", queue_id)
            return None
        except FileNotFoundError:
            return None
        except OSError as exc:
            # Unreadable (I/O error, permissions): keep it for a later attempt, never crash.
            log.error("unreadable_queue_file", queue_id=queue_id, reason=exc.strerror or str(exc))
            self.spool.move(queue_id, "active", "deferred")
            return None
        assert result is None or isinstance(result, OpenEntry)
        return result

    async def _claim(self, queue_id: str, job: Callable[[], object]) -> object:
        """Run a claim job (``Spool.claim_checked`` or ``Spool.take``) in a spool thread.  None
        (nothing to deliver) when the entry stays where it is (a read-only or broken spool: a
        later scan finds it), is gone (held, deleted or taken by someone else since it was
        queued), or had an operator request, which is honoured here."""
        try:
            result = await self.spool.run(job)
        except ClaimError as exc:
            log.error("queue_file_move_failed", queue_id=queue_id, reason=str(exc))
            return None
        if isinstance(result, str):
            self.spool.honour_request(queue_id, result)
            log.info("operator_request", queue_id=queue_id, action=result)
            return None
        return result or None

    async def _record(
        self,
        env: Envelope,
        head: Callable[[], Awaitable[bytes]],
        attempt: Attempt,
    ) -> None:
        try:
            await self.recorder.record(
                env,
                head,
                attempt.results,
                attempt.relay,
                relays=attempt.relays,
                retry_in=attempt.retry_in,
            )
        except Exception as exc:
            # Could not record the outcome (spool write error): put the entry back where the
            # queue runner finds it, and retry it later.
            reason = getattr(exc, "reply", None) or getattr(exc, "strerror", None) or repr(exc)
            log.error("queue_file_write_error", queue_id=env.queue_id, reason=reason)
            try:
                self.spool.move(env.queue_id, "active", "deferred")
            except OSError:
                pass  # still in active/: retried at the next start

    async def _attempt(self, env: Envelope, body: MessageBody, sessions: Sessions) -> Attempt:
        route = self.routes.select(env.sender)
        if route.primary is None:
            assert self.mx is not None, "a route without relay host needs PYRELAY_DELIVERY=mx"
            results, relays, retry_in = await self.mx.deliver(
                env, body, sessions, route.concurrency
            )
            relay = next(
                (relays[r.recipient] for r in results if r.outcome is Outcome.SENT),
                next(iter(relays.values()), "none"),
            )
            self._count(route, results)
            return Attempt(results, relay, relays, retry_in)
        busy = self._route_active.get(route.name, 0)
        if route.concurrency is not None and busy >= route.concurrency:
            text = f"route {route.name} is busy: {route.concurrency} deliveries in progress"
            return Attempt(_deferred(env.recipients, "4.4.5", text), "none", None, self.busy_retry)
        wait = 0.0
        if route.rate is not None:
            slot = self.limiter.reserve(route.name, route.rate.per_second)
            if not slot.taken:
                text = (
                    f"rate limit of route {route.name}: {slot.rate:.3g}/s (configured "
                    f"{route.rate}), waiting in the queue"
                )
                return Attempt(_deferred(env.recipients, "4.7.0", text), "none", None, slot.wait)
            wait = slot.wait
        self._route_active[route.name] = busy + 1
        try:
            if wait > 0:
                await asyncio.sleep(wait)
            attempt = await self._via_route(route, route.primary, env, body, sessions)
        finally:
            self._route_active[route.name] -= 1
            if not self._route_active[route.name]:
                del self._route_active[route.name]
        self._count(route, attempt.results)
        return attempt

    def _count(self, route: Route, results: list[RecipientResult]) -> None:
        for res in results:
            self.route_results.labels(route=route.name, result=res.outcome.value).inc()

    async def _via_route(
        self, route: Route, primary: Target, env: Envelope, body: MessageBody, sessions: Sessions
    ) -> Attempt:
        first = await self._via(
            self._upstream(primary), primary.key, env, body, env.recipients, sessions
        )
        deferred = [r for r in first.results if r.outcome is Outcome.DEFERRED]
        throttled = [r for r in deferred if is_throttling(r.reply)]
        if throttled:
            rate = None
            if route.rate is not None:
                rate = self.limiter.throttled(route.name, route.rate.per_second)
            log.warning(
                "throttled",
                queue_id=env.queue_id,
                route=route.name,
                relay=first.relay,
                rate=round(rate, 3) if rate is not None else "unlimited",
                reply=throttled[0].reply,
            )
            retry_in = None
            if len(throttled) == len(deferred):
                # Not a failed attempt: back in the queue until the (lower) rate has room.
                retry_in = max(1.0, 2.0 / rate) if rate else 1.0
            return Attempt(first.results, first.relay, None, retry_in)
        fallback = route.fallback
        if fallback is None or not deferred:
            return Attempt(first.results, first.relay)
        pending = [r.recipient for r in deferred]
        log.info(
            "fallback",
            queue_id=env.queue_id,
            route=route.name,
            relay=first.relay,
            to=str(fallback.relayhost),
            reason=deferred[0].reply,
        )
        second = await self._via(
            self._upstream(fallback), fallback.key, env, body, pending, sessions
        )
        merged = {r.recipient: r for r in first.results}
        relays = {r.recipient: first.relay for r in first.results}
        for res in second.results:
            merged[res.recipient] = res
            relays[res.recipient] = second.relay
        took = any(r.outcome is Outcome.SENT for r in second.results)
        return Attempt(
            [merged[r] for r in env.recipients], second.relay if took else first.relay, relays
        )

    def _upstream(self, target: Target) -> Upstream:
        up = self._upstreams.get(target.key)
        if up is None:
            up = self._upstreams[target.key] = Upstream(target.settings(self.settings))
        return up

    async def _via(
        self,
        upstream: Upstream,
        key: object,
        env: Envelope,
        body: MessageBody,
        pending: Sequence[str],
        sessions: Sessions,
    ) -> Tried:
        """One transaction through ``upstream``, on the agent's session for ``key`` (opened
        or reused); a connection-level failure comes back as ``Tried.error``."""
        suspension = self._suspensions.get(key)
        if suspension is None:
            if len(self._suspensions) > 1000:
                self._suspensions = {
                    k: v for k, v in self._suspensions.items() if v.active() is not None
                }
            suspension = self._suspensions[key] = Suspension(self.settings)
        suspended = suspension.active()
        if suspended is not None:
            text = f"delivery temporarily suspended: {suspended.text}"
            return Tried(_deferred(list(pending), suspended.status, text), "none", suspended)
        session = sessions.pop(key, None)
        reused = session is not None and session.client.is_connected
        relay = "none"
        for attempt in (1, 2):
            try:
                if session is None or not session.client.is_connected:
                    reused = False
                    session = await upstream.open()
                relay = session.relay
                results = await upstream.transaction(
                    session, env.sender, pending, body, smtputf8=env.smtputf8, eightbit=env.eightbit
                )
                suspension.clear()
                sessions[key] = session
                if len(sessions) > SESSIONS_PER_AGENT:
                    oldest = next(iter(sessions))
                    sessions.pop(oldest).client.close()
                return Tried(results, relay)
            except DeliveryError as exc:
                if session is not None:
                    session.client.close()
                session = None
                if reused and attempt == 1 and exc.kind == "connection":
                    # The upstream closed an idle cached connection; try a fresh one once.
                    continue
                self.metrics.upstream_errors.labels(kind=str(exc.kind)).inc()
                suspension.failed(exc)
                return Tried(_deferred(list(pending), exc.status, exc.text), relay, exc)
        raise AssertionError("unreachable")  # pragma: no cover
