"""Removing finished queue entries off the event loop, in batches.

Unlinking a queue file and its status file (which frees the inode) is journal
work for the file system: tens of microseconds each.  Done on the event loop after every
delivery it was a third of the loop's time while a queue drained (py-spy, 20 000 entries), time
in which no client was served and no reply read.  The reaper collects the entries finished while
one batch runs in a spool thread and removes them all in the next batch: one thread hand-off
for many entries.

A crash before an entry's batch runs leaves it in ``active/``; it is retried at the next start.
That is the at-least-once window Postfix has between the upstream's ``250`` and the unlink,
longer by the time a batch waits.  That wait is bounded: past ``BACKLOG`` entries waiting for
their unlink, the agents that finish wait for room (backpressure), so that neither the
re-delivery window after a crash nor the memory grows when the disk is slower than the upstream.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from pyrelay.logging import get_logger
from pyrelay.spool import Spool

log = get_logger("pyrelay.reaper")

# Retry of an unlink the spool refused (read-only, I/O error): from this delay, doubling.
FIRST_RETRY = 0.5
# Entries waiting for their unlink before ``room()`` makes finishing deliveries wait.
BACKLOG = 256


@dataclass(slots=True)
class _Removal:
    queue_id: str
    why: str
    wait: float = 0.0  # before the next try, if this one fails (0: not failed yet)


class Reaper:
    """Removes entries from ``active/`` (see the module docstring).  Loop-side methods only."""

    def __init__(self, spool: Spool, *, max_wait: Callable[[], float]) -> None:
        self.spool = spool
        self.max_wait = max_wait
        self.closing = False
        self._removals: list[_Removal] = []
        self._batch: asyncio.Future[list[tuple[_Removal, OSError | None]]] | None = None
        self._in_batch = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._room = asyncio.Event()
        self._room.set()

    def remove(self, queue_id: str, why: str = "") -> None:
        """Unlink a delivered (or dropped) entry in ``active/`` soon; logs ``removed``."""
        self._removals.append(_Removal(queue_id, why))
        if self.backlog >= BACKLOG:
            self._room.clear()
        self._kick()

    @property
    def backlog(self) -> int:
        return len(self._removals) + self._in_batch

    async def room(self) -> None:
        """Until fewer than ``BACKLOG`` entries wait for their unlink."""
        await self._room.wait()

    async def wait(self) -> None:
        """Until everything handed over so far is done (shutdown)."""
        while self._batch is not None or self._removals:
            self._kick()
            await self._idle.wait()

    # -- batches -----------------------------------------------------------------------------

    def _kick(self) -> None:
        if self._batch is not None or not self._removals:
            return
        removals, self._removals = self._removals, []
        self._in_batch = len(removals)
        loop = asyncio.get_running_loop()
        self._idle.clear()
        self._batch = loop.run_in_executor(self.spool.executor, self._run, removals)
        self._batch.add_done_callback(self._done)

    def _run(self, removals: list[_Removal]) -> list[tuple[_Removal, OSError | None]]:
        """In a spool thread: the unlinks."""
        results: list[tuple[_Removal, OSError | None]] = []
        for item in removals:
            try:
                self.spool.remove(item.queue_id, "active")
                results.append((item, None))
            except FileNotFoundError:
                results.append((item, None))  # already gone (an operator delete)
            except OSError as exc:
                results.append((item, exc))
        return results

    def _done(self, batch: asyncio.Future[list[tuple[_Removal, OSError | None]]]) -> None:
        self._batch = None
        self._in_batch = 0
        try:
            results = batch.result()
        except BaseException as exc:  # noqa: BLE001 - the executor is gone (shutdown)
            log.error("queue_file_remove_failed", reason=repr(exc))
            results = []
        for item, error in results:
            if error is None:
                log.info(
                    "removed", queue_id=item.queue_id, **({"reason": item.why} if item.why else {})
                )
            else:
                self._retry(item, error)
        if self.backlog < BACKLOG:
            self._room.set()
        if self._removals:
            self._kick()
        else:
            self._idle.set()

    def _retry(self, item: _Removal, error: OSError) -> None:
        """The message was delivered: retry only the unlink (never deliver it again here).  A
        restart before it succeeds delivers it again: the documented at-least-once window."""
        if not item.wait:  # once per entry, not at every retry
            log.error(
                "queue_file_remove_failed",
                queue_id=item.queue_id,
                reason=error.strerror or str(error),
                note="delivered; retrying the unlink only",
            )
        if self.closing:
            return
        wait = item.wait or FIRST_RETRY
        item.wait = min(wait * 2, max(FIRST_RETRY, self.max_wait()))

        def again() -> None:
            self._removals.append(item)
            self._kick()

        asyncio.get_running_loop().call_later(wait, again)
