"""The queue manager (qmgr): which entries are delivered when.

Like Postfix's qmgr it keeps a bounded *active set* in memory and leaves the rest of the queue
on disk, so memory does not grow with the queue:

- fresh messages come from the listener (a small one with its bytes) straight into the active
  queue; when it is full they stay in ``incoming/`` and are picked up by a scan later;
- the primary process's queue runner scans ``deferred/`` every ``queue_run_delay`` (and when the
  soonest known retry is due, or on ``flush``), taking the entries whose mtime (their next
  attempt) has passed, at most as many as there is room for;
- delivery agents (``pyrelay.agents``) take items from the active queue; what happens after an
  attempt is ``pyrelay.outcome``.

Secondary worker processes run the same scheduler without the ``deferred/`` scan: their
deferrals land in ``deferred/``, which belongs to the primary.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass

from pyrelay.agents import DeliveryAgents, DueEntry, FreshMessage, WorkItem
from pyrelay.config import Settings
from pyrelay.delivery import Upstream
from pyrelay.logging import get_logger
from pyrelay.metrics import Metrics
from pyrelay.outcome import OutcomeRecorder, retry_delay
from pyrelay.queuefile import Envelope
from pyrelay.reaper import Reaper
from pyrelay.spool import Spool, arrival_of, worker_of

__all__ = ["ACTIVE_LIMIT", "Scheduler", "retry_delay"]

log = get_logger("pyrelay.scheduler")

# Work items in memory at once (Postfix qmgr_message_active_limit is 20000; an item here is a
# queue ID, or a fresh message's envelope).
ACTIVE_LIMIT = 10_000
# Fresh messages waiting with their envelope (and small ones with their bytes); past it a fresh
# message waits as its queue ID and is read back from the spool when its turn comes.  A backlog
# (an upstream that is down) then costs about 150 bytes per waiting message, not 1-6 KB.
FRESH_LIMIT = 200
# Bytes of small fresh messages kept in memory for their first attempt; past it they are read
# back from the spool.
PAYLOAD_BUDGET = 2 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class _Scan:
    due: list[str]
    more: bool  # due entries that did not fit
    count: int
    oldest: float
    soonest: float


class Scheduler:
    def __init__(
        self,
        settings: Settings,
        spool: Spool,
        metrics: Metrics,
        *,
        upstream: Upstream | None = None,
        primary: bool = True,
    ) -> None:
        self.settings = settings
        self.spool = spool
        self.metrics = metrics
        self.primary = primary
        self.upstream = upstream or Upstream(settings)
        self.queue: asyncio.Queue[WorkItem] = asyncio.Queue()
        self._queued: set[str] = set()
        self._payload = 0
        self.reaper = Reaper(spool, max_wait=lambda: settings.max_backoff)
        self.recorder = OutcomeRecorder(settings, spool, metrics, self.submit, self.reaper)
        self.recorder.on_deferred = self._deferred_until
        self.agents = DeliveryAgents(
            settings, spool, metrics, self.upstream, self.recorder, self._take, self.reaper
        )
        self._runner: asyncio.Task[None] | None = None
        self._running = False
        self._wake = asyncio.Event()
        self._flushed_at: float | None = None
        self._overflow = False
        self._more = False
        self._soonest = math.inf
        # Queue size for metrics without keeping the queue in memory: the last scan's count of
        # deferred/, corrected by what moved since, plus the work in memory.
        self._deferred_count = 0
        self._deferred_delta = 0
        self._not_deferred = 0  # items in the active queue that are not in deferred/
        self._scans = 0
        self._oldest = time.time()
        # Postfix queue_run_delay: how often deferred/ is scanned (it defaults to the minimal
        # backoff, so a retry happens between one and two backoffs after a failure at worst).
        self.run_delay = max(0.05, min(settings.min_backoff, 300.0))
        # A deferral due before the next regular scan (rate limits, throttling, a busy
        # destination: pyrelay.routes) sets a timer for an earlier scan, at most one a second.
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._last_scan = 0.0

    # -- lifecycle -------------------------------------------------------------------------

    def recover(self) -> int:
        """Before serving: drop half-written files and move what a previous run left in
        ``incoming/`` and ``active/`` to ``deferred/``, due now.  Only renames (no entry is
        read), so start-up time does not depend on the queue size."""
        removed = self.spool.clean_tmp()
        if removed:
            log.info("spool_cleanup", removed_partial=removed)
        return self.spool.requeue()

    def start(self) -> None:
        self._runner = asyncio.create_task(self._run_queue(), name="pyrelay-queue-runner")
        self._running = True
        self.agents.start()
        self._wake.set()  # the first scan is the recovery of the deferred queue

    async def stop(self, grace: float) -> None:
        self._running = False
        if self._timer is not None:
            self._timer.cancel()
        if self._runner is not None:
            self._runner.cancel()
        await self.agents.stop(grace)
        await self.reaper.wait()  # the unlinks of what was delivered, before the executor goes
        if self._runner is not None:
            await asyncio.gather(self._runner, return_exceptions=True)

    # -- intake ----------------------------------------------------------------------------

    def takes_fresh(self) -> bool:
        """Whether a message accepted now would be queued in memory for its first attempt (so
        the listener may write it straight into ``active/``, claimed)."""
        return self._running and self.queue.qsize() < FRESH_LIMIT

    def submit(self, env: Envelope, payload: bytes | None) -> None:
        """A message just became durable in ``incoming/`` (or ``active/``, when ``takes_fresh``
        said so): deliver it as soon as an agent is free.  When the active queue is full an
        ``incoming/`` one waits on disk for a later scan; an ``active/`` one is ours already
        and always queued (at most one per session past the limit)."""
        waiting = self.queue.qsize()
        # Other sessions may have filled the queue between takes_fresh and now (the commit
        # waits for the disk): an active/ entry is queued all the same, or nobody would claim
        # it before the next start.
        if env.state != "active":
            if waiting >= ACTIVE_LIMIT:
                self._overflow = True
                return
            if waiting >= FRESH_LIMIT:
                self._enqueue([env.queue_id], "incoming")
                return
        if payload is not None:
            if self._payload + len(payload) > PAYLOAD_BUDGET:
                payload = None
            else:
                self._payload += len(payload)
        self._queued.add(env.queue_id)
        self._not_deferred += 1
        self.queue.put_nowait(FreshMessage(env, payload))

    async def _take(self) -> WorkItem:
        item = await self.queue.get()
        self._queued.discard(item.queue_id)
        if item.state == "deferred":
            self._deferred_delta -= 1
        else:
            self._not_deferred -= 1
        if isinstance(item, FreshMessage) and item.payload is not None:
            self._payload -= len(item.payload)
        if (self._overflow or self._more) and self.queue.qsize() <= ACTIVE_LIMIT // 2:
            self._wake.set()
        return item

    def _enqueue(self, ids: list[str], state: str) -> None:
        for queue_id in ids:
            if queue_id not in self._queued:
                self._queued.add(queue_id)
                if state != "deferred":
                    self._not_deferred += 1
                self.queue.put_nowait(DueEntry(queue_id, state))

    # -- commands --------------------------------------------------------------------------

    def flush(self) -> int:
        """Make every deferred message due now (``postqueue -f``); returns how many the last
        scan saw."""
        self._flushed_at = time.time()
        self.agents.clear_suspensions()
        self._wake.set()
        return self._deferred_count

    def scan_now(self) -> None:
        """Look for due entries now (after ``queue release``)."""
        self._wake.set()

    def adopt_orphans(self, worker: int) -> int:
        """A worker process died: its ``incoming/`` and ``active/`` entries go to ``deferred/``
        (due now) before a replacement, which reuses its index, can create new ones."""
        moved = self.spool.requeue(worker=worker)
        self._wake.set()
        return moved

    def _deferred_until(self, when: float) -> None:
        self._deferred_delta += 1
        if when < self._soonest:
            self._soonest = when
        self._plan_scan(when)

    def _plan_scan(self, when: float) -> None:
        if self.primary and when < min(self._timer_at, self._last_scan + self.run_delay):
            at = max(when, self._last_scan + 1.0)
            if at < self._timer_at:
                if self._timer is not None:
                    self._timer.cancel()
                loop = asyncio.get_running_loop()
                self._timer = loop.call_later(max(0.0, at - time.time()), self._timer_fired)
                self._timer_at = at

    def _timer_fired(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        self._wake.set()

    def queue_stats(self) -> tuple[int, float]:
        now = time.time()
        deferred = self._deferred_count + self._deferred_delta
        size = max(0, deferred) + self._not_deferred + self.agents.busy
        return size, max(0.0, now - self._oldest) if size else 0.0

    # -- the queue runner ------------------------------------------------------------------

    def _next_wait(self, last_scan: float) -> float | None:
        if not self.primary:
            return None
        now = time.time()
        regular = last_scan + self.run_delay
        soonest = max(self._soonest, last_scan + self.run_delay / 10)
        return max(0.0, min(regular, soonest) - now)

    async def _run_queue(self) -> None:
        last_scan = 0.0
        while True:
            timeout = self._next_wait(last_scan)
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                if self._overflow:
                    await self._scan_incoming()
                if self.primary:
                    last_scan = self._last_scan = time.time()
                    await self._scan_deferred()
            except OSError as exc:
                log.error("queue_scan_failed", reason=exc.strerror or str(exc))
                await asyncio.sleep(1.0)

    def _room(self) -> int:
        return max(0, ACTIVE_LIMIT - self.queue.qsize())

    async def _scan_incoming(self) -> None:
        room = self._room()
        if not room:
            return
        queued = frozenset(self._queued)
        me = self.spool.worker

        def scan() -> tuple[list[str], bool]:
            found: list[str] = []
            for queue_id in self.spool.ids("incoming"):
                if worker_of(queue_id) == me and queue_id not in queued:
                    if len(found) >= room:
                        return found, True
                    found.append(queue_id)
            return found, False

        result = await self.spool.run(scan)
        assert isinstance(result, tuple)
        found, more = result
        self._overflow = more
        self._enqueue(found, "incoming")

    async def _scan_deferred(self) -> None:
        # A flush (postqueue -f) makes the whole deferred queue due, including the entries
        # that do not fit in the active set this time: it lasts until a scan took them all.
        flushed_at = self._flushed_at
        room = self._room()
        queued = frozenset(self._queued)
        horizon = self.settings.max_backoff * 1.2 + 1.0

        def scan() -> _Scan:
            now = time.time()
            due: list[str] = []
            more = False
            count = 0
            oldest = now
            soonest = math.inf
            for queue_id, when in self.spool.due(now, flushed_at=flushed_at, horizon=horizon):
                count += 1
                oldest = min(oldest, arrival_of(queue_id))
                if when > now:
                    soonest = min(soonest, when)
                elif queue_id in queued:
                    continue
                elif len(due) < room:
                    due.append(queue_id)
                else:
                    more = True
            return _Scan(due, more, count, oldest, soonest)

        result = await self.spool.run(scan)
        assert isinstance(result, _Scan)
        if not self._scans and result.count:
            log.info("queue_recovered", messages=result.count, due=len(result.due))
        self._scans += 1
        if not result.more and self._flushed_at == flushed_at:
            # Only the flush this scan honoured ends: one that came while it ran still stands
            # (and its wake-up runs the next scan).
            self._flushed_at = None
        self._deferred_count = result.count
        self._deferred_delta = 0
        self._oldest = result.oldest
        self._soonest = result.soonest
        self._more = result.more
        self._enqueue(result.due, "deferred")
        self._plan_scan(result.soonest)
