"""Delivery agents: ``PYRELAY_CONCURRENCY`` tasks that take work items from the scheduler's
active queue, claim the entry (a rename into ``active/``), run one attempt upstream over a
reused connection, and hand the results to the outcome recorder.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from pyrelay.config import Settings
from pyrelay.delivery import InMemoryBody, Outcome, RecipientResult, Session, Upstream
from pyrelay.errors import DeliveryError
from pyrelay.logging import get_logger
from pyrelay.metrics import Metrics
from pyrelay.outcome import BOUNCE_HEADERS, OutcomeRecorder
from pyrelay.queuefile import CorruptEntry, Envelope
from pyrelay.spool import OpenEntry, Spool, SpoolBody
from pyrelay.transaction import MessageBody

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
        return "incoming"


@dataclass(frozen=True, slots=True)
class DueEntry:
    """A queue entry found on disk (due in ``deferred/``, or left in ``incoming/``)."""

    queue_id: str
    state: str


WorkItem = FreshMessage | DueEntry


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
    ) -> None:
        self.settings = settings
        self.spool = spool
        self.metrics = metrics
        self.upstream = upstream
        self.recorder = recorder
        self.take = take
        self.suspension = Suspension(settings)
        self._tasks: list[asyncio.Task[None]] = []
        self._busy: dict[asyncio.Task[None], str] = {}
        self._inflight: dict[asyncio.Task[None], asyncio.Future[Session | None]] = {}
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
        self.recorder.closing = True
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
                self.upstream.abort_all()
                await asyncio.wait(inner, timeout=1.0)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _run(self) -> None:
        session: Session | None = None
        idle = self.settings.upstream_idle_timeout
        task = asyncio.current_task()
        assert task is not None
        try:
            while not self._closing:
                try:
                    if session is None:
                        item = await self.take()
                    else:
                        item = await asyncio.wait_for(self.take(), idle)
                except TimeoutError:
                    if session is not None:
                        await self.upstream.close(session)
                    session = None
                    continue
                if self._closing:
                    break  # durable on disk; the next start picks it up
                self._busy[task] = item.queue_id
                inner = asyncio.ensure_future(self._deliver(item, session))
                self._inflight[task] = inner
                try:
                    session = await asyncio.shield(inner)
                finally:
                    self._busy.pop(task, None)
                    self._inflight.pop(task, None)
        finally:
            if session is not None:
                session.client.close()

    async def _deliver(self, item: WorkItem, session: Session | None) -> Session | None:
        queue_id = item.queue_id
        try:
            if not self.spool.claim(queue_id, item.state):
                return session  # held, deleted or taken by someone else since it was queued
        except OSError as exc:
            # A read-only or broken spool: the entry stays where it is for a later scan.
            log.error("queue_file_move_failed", queue_id=queue_id, reason=exc.strerror or str(exc))
            return session
        action = self.spool.pending_request(queue_id)
        if action is not None:
            self.spool.honour_request(queue_id, action)
            log.info("operator_request", queue_id=queue_id, action=action)
            return session
        entry: OpenEntry | None = None
        try:
            if isinstance(item, FreshMessage) and item.payload is not None:
                env = item.envelope
                env.state = "active"
                body: MessageBody = InMemoryBody(item.payload)
                payload = item.payload

                async def head() -> bytes:
                    return payload[:BOUNCE_HEADERS]

            else:
                try:
                    entry = await self._open(queue_id)
                except FileNotFoundError:
                    return session
                if entry is None:
                    return session
                env = entry.envelope
                spool_body = SpoolBody(self.spool, entry)
                body = spool_body

                async def head() -> bytes:
                    return await spool_body.head(BOUNCE_HEADERS)

            try:
                results, relay, session = await self._attempt(env, body, session)
            except Exception as exc:
                # A bug must not turn into endless immediate retries: record it as a deferral,
                # so that attempts are counted, backoff applies and the queue lifetime ends it.
                log.exception("delivery_crashed", queue_id=queue_id)
                if session is not None:
                    session.client.close()  # its state is unknown: never reuse it
                    session = None
                reason = (
                    f"internal error during delivery ({type(exc).__name__}), see delivery_crashed"
                )
                results = [
                    RecipientResult(r, Outcome.DEFERRED, "4.3.0", reason) for r in env.recipients
                ]
                relay = "none"
            await self._record(env, head, results, relay)
            return session
        finally:
            if entry is not None:
                entry.close()

    async def _open(self, queue_id: str) -> OpenEntry | None:
        try:
            result = await self.spool.run(self.spool.open_entry, "active", queue_id)
        except CorruptEntry as exc:
            log.error("corrupt_queue_file", queue_id=queue_id, reason=str(exc))
            self.spool.quarantine("active", queue_id)
            return None
        except FileNotFoundError:
            raise
        except OSError as exc:
            # Unreadable (I/O error, permissions): keep it for a later attempt, never crash.
            log.error("unreadable_queue_file", queue_id=queue_id, reason=exc.strerror or str(exc))
            self.spool.move(queue_id, "active", "deferred")
            return None
        assert isinstance(result, OpenEntry)
        return result

    async def _record(
        self,
        env: Envelope,
        head: Callable[[], Awaitable[bytes]],
        results: list[RecipientResult],
        relay: str,
    ) -> None:
        try:
            await self.recorder.record(env, head, results, relay)
        except Exception as exc:
            # Could not record the outcome (spool write error): put the entry back where the
            # queue runner finds it, and retry it later.
            reason = getattr(exc, "reply", None) or getattr(exc, "strerror", None) or repr(exc)
            log.error("queue_file_write_error", queue_id=env.queue_id, reason=reason)
            try:
                self.spool.move(env.queue_id, "active", "deferred")
            except OSError:
                pass  # still in active/: retried at the next start

    async def _attempt(
        self, env: Envelope, body: MessageBody, session: Session | None
    ) -> tuple[list[RecipientResult], str, Session | None]:
        pending = list(env.recipients)
        suspended = self.suspension.active()
        if suspended is not None:
            text = f"delivery temporarily suspended: {suspended.text}"
            return (
                [RecipientResult(r, Outcome.DEFERRED, suspended.status, text) for r in pending],
                ("none"),
                session,
            )
        reused = session is not None and session.client.is_connected
        relay = "none"
        for attempt in (1, 2):
            try:
                if session is None or not session.client.is_connected:
                    reused = False
                    session = await self.upstream.open()
                relay = session.relay
                results = await self.upstream.transaction(
                    session, env.sender, pending, body, smtputf8=env.smtputf8, eightbit=env.eightbit
                )
                self.suspension.clear()
                return results, relay, session
            except DeliveryError as exc:
                if session is not None:
                    session.client.close()
                session = None
                if reused and attempt == 1 and exc.kind == "connection":
                    # The upstream closed an idle cached connection; try a fresh one once.
                    continue
                self.metrics.upstream_errors.labels(kind=str(exc.kind)).inc()
                self.suspension.failed(exc)
                return (
                    [RecipientResult(r, Outcome.DEFERRED, exc.status, exc.text) for r in pending],
                    relay,
                    None,
                )
        raise AssertionError("unreachable")  # pragma: no cover
