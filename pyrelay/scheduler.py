"""The queue manager (qmgr): who is delivered when, retries with backoff, bounces.

Fresh messages come from the listener with their bytes still in memory and go straight to a
worker.  Deferred ones wait in a heap keyed by due time and are re-read from disk when due.
Each worker owns one upstream session and reuses it for the next message.
"""

from __future__ import annotations

import asyncio
import heapq
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime

from pyrelay.bounce import FailedRecipient, build_bounce
from pyrelay.config import Settings
from pyrelay.delivery import Outcome, RecipientResult, Session, Upstream
from pyrelay.errors import DeliveryError, SpoolError
from pyrelay.logging import get_logger
from pyrelay.metrics import Metrics
from pyrelay.rewrite import masquerade_address
from pyrelay.spool import CorruptEntry, Envelope, Spool, worker_of
from pyrelay.wire import dot_stuff, header_block

log = get_logger("pyrelay.scheduler")

# Keep at most this many message bytes in memory for messages waiting for a worker; beyond
# it they are re-read from the spool, so a slow upstream cannot exhaust memory.
MEMORY_BUDGET = 64 * 1024 * 1024


def retry_delay(
    attempts: int, min_backoff: float, max_backoff: float, rand: Callable[[], float] = random.random
) -> float:
    """Seconds until the next attempt after ``attempts`` failed ones (Postfix doubling), ±10 %
    jitter so that a burst deferred together does not retry together."""
    base = min(max_backoff, min_backoff * (2 ** max(0, attempts - 1)))
    return float(min(max_backoff, base * (0.9 + 0.2 * rand())))


class Scheduler:
    def __init__(
        self,
        settings: Settings,
        spool: Spool,
        metrics: Metrics,
        *,
        upstream: Upstream | None = None,
    ) -> None:
        self.settings = settings
        self.spool = spool
        self.metrics = metrics
        self.upstream = upstream or Upstream(settings)
        self._ready: asyncio.Queue[tuple[Envelope, bytes | None]] = asyncio.Queue()
        self._heap: list[tuple[float, int, str]] = []
        self._seq = 0
        self._known: set[str] = set()
        self._in_memory = 0
        self._wake = asyncio.Event()
        self._workers: list[asyncio.Task[None]] = []
        self._busy: dict[asyncio.Task[None], str] = {}
        self._inflight: dict[asyncio.Task[None], asyncio.Future[Session | None]] = {}
        self._timer: asyncio.Task[None] | None = None
        self._closing = False
        self._suspended_until = 0.0
        self._suspend_reason: DeliveryError | None = None
        self.arrivals: dict[str, float] = {}
        # Set in secondary worker processes: deferred entries are handed to the primary
        # process, which alone schedules retries (one owner per deferred entry).
        self.handoff: Callable[[Envelope], None] | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def scan(self) -> list[tuple[str, float, float]]:
        """Read every queue entry left by a previous run: ``(queue_id, due_in, arrival)``.

        Needs no event loop, so a multi-worker relay runs it before forking its workers (their
        new entries must not be mistaken for leftovers)."""
        removed = self.spool.clean_tmp()
        if removed:
            log.info("spool_cleanup", removed_partial=removed)
        deferred = set(self.spool.ids("deferred"))
        found: list[tuple[str, float, float]] = []
        for state in ("incoming", "deferred"):
            for queue_id in self.spool.ids(state):
                if state == "incoming" and queue_id in deferred:
                    # Crash between writing deferred/ID and unlinking incoming/ID: the deferred
                    # copy carries the newer per-recipient state.
                    self.spool._unlink("incoming", queue_id)
                    continue
                try:
                    env, _ = self.spool.read(state, queue_id)
                except CorruptEntry as exc:
                    log.error("corrupt_queue_file", queue_id=queue_id, state=state, reason=str(exc))
                    self.spool.quarantine(state, queue_id)
                    continue
                except OSError as exc:
                    log.error("unreadable_queue_file", queue_id=queue_id, reason=str(exc))
                    continue
                due_in = 0.0 if state == "incoming" else self._clamp(env.next_attempt - time.time())
                found.append((queue_id, due_in, env.arrival))
        return found

    def recover(self, found: list[tuple[str, float, float]] | None = None) -> int:
        """Schedule the entries of a previous run (scanning now unless ``found`` is given)."""
        if found is None:
            found = self.scan()
        for queue_id, due_in, arrival in found:
            self._schedule(queue_id, due_in)
            self.arrivals[queue_id] = arrival
        return len(found)

    def _clamp(self, seconds: float) -> float:
        # A wall clock that jumped backwards must not push retries out beyond the longest backoff.
        return max(0.0, min(seconds, self.settings.max_backoff))

    def start(self) -> None:
        self._timer = asyncio.create_task(self._run_timer(), name="pyrelay-timer")
        for i in range(self.settings.concurrency):
            self._workers.append(
                asyncio.create_task(self._run_worker(), name=f"pyrelay-worker-{i}")
            )

    async def stop(self, grace: float) -> None:
        """Stop taking work; let in-flight deliveries finish within ``grace`` seconds.  Whatever
        is not finished stays in the spool for the next start."""
        self._closing = True
        if self._timer:
            self._timer.cancel()
        idle = [t for t in self._workers if t not in self._busy]
        for task in idle:
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
                # The deliveries run shielded from their workers; stop them too.  A cancel can
                # be lost (Python 3.11's wait_for swallows it when the reply arrives in the same
                # loop iteration) and the delivery would then wait out the upstream's reply, so
                # also close the connections: every wait on the upstream ends now, and the
                # messages stay queued (delivered again later if the upstream had them already:
                # the at-least-once window).
                for fut in inner:
                    fut.cancel()
                self.upstream.abort_all()
                await asyncio.wait(inner, timeout=1.0)
        for task in self._workers:
            task.cancel()
        await asyncio.gather(
            *self._workers, *([self._timer] if self._timer else []), return_exceptions=True
        )

    # -- intake ----------------------------------------------------------------------------

    def submit(self, env: Envelope, message: bytes) -> None:
        """A message just became durable: deliver it as soon as a worker is free."""
        self._known.add(env.queue_id)
        self.arrivals[env.queue_id] = env.arrival
        if self._in_memory + len(message) <= MEMORY_BUDGET:
            self._in_memory += len(message)
            self._ready.put_nowait((env, message))
        else:
            self._ready.put_nowait((env, None))

    def _schedule(self, queue_id: str, due_in: float) -> None:
        self._known.add(queue_id)
        self._seq += 1
        due = asyncio.get_running_loop().time() + due_in
        heapq.heappush(self._heap, (due, self._seq, queue_id))
        self._wake.set()

    def flush(self) -> int:
        """Make every deferred message due now (``postqueue -f``), including ones the CLI
        released from hold since the relay last looked."""
        self._suspend_reason = None
        self._heap = [(0.0, seq, queue_id) for _, seq, queue_id in self._heap]
        heapq.heapify(self._heap)
        count = self.adopt_unknown_deferred(0.0)
        self._wake.set()
        return count

    def adopt(self, queue_id: str, next_attempt: float, arrival: float) -> None:
        """Take over a deferred entry from a secondary worker process."""
        if queue_id in self._known:
            return
        self.arrivals[queue_id] = arrival
        self._schedule(queue_id, self._clamp(next_attempt - time.time()))

    def adopt_unknown_deferred(self, due_in: float) -> int:
        """Schedule the ``deferred/`` entries this process does not know (released from hold by
        the CLI, or a lost hand-off) in ``due_in`` seconds.  Returns how many are deferred."""
        ids = set(self.spool.ids("deferred"))
        for queue_id in ids - self._known:
            self._schedule(queue_id, due_in)
        return len(ids)

    def adopt_orphans(self, worker: int) -> int:
        """Take over the ``incoming/`` entries of a worker process that died, before a
        replacement (which reuses the index) can create new ones."""
        count = 0
        for queue_id in self.spool.ids("incoming"):
            if worker_of(queue_id) == worker and queue_id not in self._known:
                self._schedule(queue_id, 0.0)
                count += 1
        return count

    def queue_stats(self) -> tuple[int, float]:
        now = time.time()
        size = len(self.arrivals)
        oldest = min(self.arrivals.values(), default=now)
        return size, now - oldest

    async def _run_timer(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            while self._heap and self._heap[0][0] <= now:
                _, _, queue_id = heapq.heappop(self._heap)
                self._ready.put_nowait((_Placeholder.envelope(queue_id), None))
            timeout = (self._heap[0][0] - now) if self._heap else None
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                pass

    # -- delivery --------------------------------------------------------------------------

    async def _run_worker(self) -> None:
        session: Session | None = None
        idle = self.settings.upstream_idle_timeout
        task = asyncio.current_task()
        assert task is not None
        try:
            while not self._closing:
                try:
                    if session is None:
                        env, message = await self._ready.get()
                    else:
                        env, message = await asyncio.wait_for(self._ready.get(), idle)
                except TimeoutError:
                    if session is not None:
                        await self.upstream.close(session)
                    session = None
                    continue
                if self._closing:
                    break  # durable on disk; the next start picks it up
                self._busy[task] = env.queue_id
                inner = asyncio.ensure_future(self._deliver_one(env, message, session))
                self._inflight[task] = inner
                try:
                    session = await asyncio.shield(inner)
                finally:
                    self._busy.pop(task, None)
                    self._inflight.pop(task, None)
        finally:
            if session is not None:
                session.client.close()

    async def _deliver_one(
        self, env: Envelope, message: bytes | None, session: Session | None
    ) -> Session | None:
        if message is not None:
            self._in_memory -= len(message)
        else:
            loaded = await self._load(env)
            if loaded is None:
                return session
            env, message = loaded
        try:
            return await self._attempt(env, message, session)
        except SpoolError as exc:
            # Could not record the outcome; the entry stays where it was and is retried later.
            log.error("queue_file_write_error", queue_id=env.queue_id, reason=exc.reply)
            self._schedule(env.queue_id, self.settings.min_backoff)
            return session
        except Exception as exc:
            # A bug must not turn into endless immediate retries: record it as a deferral, so
            # that attempts are counted, backoff applies and the queue lifetime still ends it.
            log.exception("delivery_crashed", queue_id=env.queue_id)
            reason = f"internal error during delivery ({type(exc).__name__}), see delivery_crashed"
            results = [
                RecipientResult(r, Outcome.DEFERRED, "4.3.0", reason) for r in env.recipients
            ]
            try:
                await self._record(env, message, results, "none")
            except Exception:
                log.exception("delivery_crashed", queue_id=env.queue_id, stage="record")
                self._schedule(env.queue_id, self.settings.max_backoff)
            return None

    async def _load(self, stub: Envelope) -> tuple[Envelope, bytes] | None:
        queue_id = stub.queue_id
        state = "deferred" if stub.state == "placeholder" else stub.state
        for candidate in (state, "incoming", "deferred"):
            try:
                return await self.spool.read_async(candidate, queue_id)
            except FileNotFoundError:
                continue
            except CorruptEntry as exc:
                log.error("corrupt_queue_file", queue_id=queue_id, state=candidate, reason=str(exc))
                self.spool.quarantine(candidate, queue_id)
                break
        # Deleted or put on hold by the operator since it was scheduled.
        self._forget(queue_id)
        return None

    def _forget(self, queue_id: str) -> None:
        self._known.discard(queue_id)
        self.arrivals.pop(queue_id, None)

    async def _attempt(
        self, env: Envelope, message: bytes, session: Session | None
    ) -> Session | None:
        pending = list(env.recipients)
        results: list[RecipientResult] = []
        relay = "none"
        if self._suspend_reason is not None and time.monotonic() < self._suspended_until:
            reason = self._suspend_reason
            results = [
                RecipientResult(
                    r,
                    Outcome.DEFERRED,
                    reason.status,
                    f"delivery temporarily suspended: {reason.text}",
                )
                for r in pending
            ]
        else:
            reused = session is not None and session.client.is_connected
            for attempt in (1, 2):
                try:
                    if session is None or not session.client.is_connected:
                        reused = False
                        session = await self.upstream.open()
                    relay = session.relay
                    results = await self.upstream.transaction(
                        session,
                        env.sender,
                        pending,
                        message,
                        smtputf8=env.smtputf8,
                        eightbit=env.eightbit,
                    )
                    self._suspend_reason = None
                    break
                except DeliveryError as exc:
                    session = None
                    if reused and attempt == 1 and exc.kind == "connection":
                        # The upstream closed an idle cached connection; try a fresh one once.
                        continue
                    self._connection_failed(exc)
                    results = [
                        RecipientResult(
                            r,
                            Outcome.BOUNCED if exc.permanent else Outcome.DEFERRED,
                            exc.status,
                            exc.text,
                        )
                        for r in pending
                    ]
                    break
        await self._record(env, message, results, relay)
        return session

    def _connection_failed(self, exc: DeliveryError) -> None:
        self.metrics.upstream_errors.labels(kind=str(exc.kind)).inc()
        if exc.kind in ("dns", "tcp", "greeting", "tls", "auth"):
            # Like qmgr's dead-destination marking: do not hammer a broken upstream with every
            # queued message; they are deferred with the same reason until it is retried.
            self._suspend_reason = exc
            self._suspended_until = time.monotonic() + min(60.0, self.settings.min_backoff)

    async def _record(
        self, env: Envelope, message: bytes, results: list[RecipientResult], relay: str
    ) -> None:
        now = time.time()
        delay = round(now - env.arrival, 2)
        still: list[RecipientResult] = []
        bounced: list[RecipientResult] = []
        for res in results:
            if res.outcome is Outcome.SENT:
                env.delivered.append(res.recipient)
                self.metrics.delivered.inc()
                _log_result(env, res, relay, delay)
            elif res.outcome is Outcome.BOUNCED:
                bounced.append(res)
            else:
                still.append(res)
        if still and now - env.arrival >= self.settings.queue_lifetime:
            for res in still:
                bounced.append(
                    RecipientResult(
                        res.recipient,
                        Outcome.BOUNCED,
                        res.dsn,
                        f"message delivery time expired; last error: {res.reply}",
                    )
                )
            still = []
        for res in bounced:
            self.metrics.bounced.inc()
            _log_result(env, res, relay, delay)
        if bounced:
            await self._bounce(env, message, bounced, relay)
        if still:
            env.attempts += 1
            wait = retry_delay(env.attempts, self.settings.min_backoff, self.settings.max_backoff)
            env.recipients = [r.recipient for r in still]
            env.next_attempt = now + wait
            env.last_error = still[0].reply
            if not self.spool.path(env.state, env.queue_id).exists():
                # Held or deleted by the operator during this attempt: record the outcome in
                # the held copy, or not at all, but never resurrect it in deferred/.
                where = "deleted"
                if self.spool.path("hold", env.queue_id).exists():
                    where = env.state = "hold"
                    await self.spool.rewrite(env, message, "hold")
                log.info("operator_moved_during_delivery", queue_id=env.queue_id, now=where)
                self._forget(env.queue_id)
                return
            await self.spool.rewrite(env, message, "deferred")
            for res in still:
                self.metrics.deferred.inc()
                _log_result(env, res, relay, delay, next_attempt_in=round(wait))
            if self.handoff is not None:
                self.handoff(env)
                self._forget(env.queue_id)
            else:
                self._schedule(env.queue_id, wait)
        else:
            self.metrics.latency.observe(now - env.arrival)
            self._remove(env, 0.0)

    def _remove(self, env: Envelope, waited: float) -> None:
        """Unlink a finished entry.  When the spool refuses (read-only, I/O error), retry only
        the unlink: the message must not be delivered again and again by this process.  It
        stays in ``_known`` meanwhile so that ``flush`` does not pick it up; a restart before
        the unlink succeeds re-delivers it (the documented at-least-once window)."""
        try:
            self.spool.remove(env)
        except OSError as exc:
            if not waited:
                log.error(
                    "queue_file_remove_failed",
                    queue_id=env.queue_id,
                    reason=exc.strerror or str(exc),
                    note="delivered; retrying the unlink only",
                )
            self.arrivals.pop(env.queue_id, None)
            if not self._closing:
                wait = min(max(0.5, waited * 2), max(0.5, self.settings.max_backoff))
                asyncio.get_running_loop().call_later(wait, self._remove, env, wait)
            return
        self._forget(env.queue_id)
        log.info("removed", queue_id=env.queue_id)

    async def _bounce(
        self, env: Envelope, message: bytes, bounced: list[RecipientResult], relay: str
    ) -> None:
        if env.sender == "":
            # RFC 5321 6.1: never bounce a bounce; Postfix logs and drops it the same way.
            log.info("bounce_suppressed", queue_id=env.queue_id, reason="null sender")
            return
        bounce_id = self.spool.new_id()
        now = datetime.now(UTC)
        remote = None if relay == "none" else relay.split("[", 1)[0]
        body = build_bounce(
            hostname=self.settings.hostname,
            queue_id=env.queue_id,
            bounce_queue_id=bounce_id,
            sender=env.sender,
            recipients=[FailedRecipient(r.recipient, r.dsn, r.reply, remote) for r in bounced],
            original_headers=header_block(message),
            arrival=datetime.fromtimestamp(env.arrival, UTC),
            now=now,
            from_address=masquerade_address(
                self.settings.bounce_from, self.settings.masquerade_domains
            ),
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


def _log_result(
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


class _Placeholder:
    """A due deferred entry; its envelope is read from disk by the worker."""

    @staticmethod
    def envelope(queue_id: str) -> Envelope:
        return Envelope(
            queue_id=queue_id, sender="", recipients=[], arrival=0.0, state="placeholder"
        )
