"""Secondary worker processes (``PYRELAY_WORKERS`` > 1): a second core for the hot path.

Every worker listens on the same addresses (``SO_REUSEPORT``; the kernel spreads connections),
spools what it accepts and delivers it at once over its own upstream connections.  Ownership
keeps the queue consistent without locks or messages between processes:

- an ``incoming/`` entry belongs to the worker whose index ends its queue ID;
- ``deferred/`` belongs to the primary process (index 0): a secondary's deferral is a rename
  into it, and the primary's queue runner finds it by its mtime like any other; the primary
  alone retries, flushes, recovers at start-up, and requeues a dead worker's ``incoming/`` and
  ``active/`` entries before replacing it;
- every claim is a rename into ``active/``, so two processes can never deliver one entry.

Why secondaries deliver instead of handing each new entry to one queue manager: the first
attempt of a fresh message then needs no read back from disk and no cross-process message, and
each process keeps its own upstream connections warm.  A hand-off design needs a socket whose
input must be validated (0.1 had one: a datagram naming a file outside the spool was delivered)
and costs a second process wake-up per message; with deferrals found by scanning, the simpler
design is also the one with nothing to trust.

Measured (issue 8, 2026-12-01, 2 workers, ``shared/bench/relay_bench.sh`` 2000 x 5 KB, 5
interleaved repeats): a prototype in which the secondary only accepted and sent each new queue
ID to the primary over a datagram socketpair (the primary claimed and delivered everything)
relayed 0.97x (0.83-1.00) of this design's e2e rate at 10 clients and 1.05x (0.80-1.33) at 50,
with the same CPU per message (2.9 against 2.8 s per 1000 at 10 clients).  Within the 5 % that
would justify the extra moving part, so it was not kept.

The first workers are forked before the event loop starts, sharing the imported code with the
primary (``gc.freeze`` keeps the collector from un-sharing it); a replacement for a worker that
died is a fresh ``pyrelay worker N`` process, because forking a process with a running event
loop and threads is not safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

from pyrelay.config import Settings
from pyrelay.logging import flush_logs, get_logger
from pyrelay.scheduler import Scheduler

log = get_logger("pyrelay.workers")


def die_with_parent(parent: int) -> None:
    """Ask Linux to SIGTERM this worker when the primary dies (even by SIGKILL), so that no
    orphan keeps serving the port; the graceful shutdown still finishes sessions in DATA."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        return
    if os.getppid() != parent:  # the primary died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def fork_workers(settings: Settings, serve: Callable[[Settings, int], None]) -> dict[int, int]:
    """Fork workers 1..N-1 (call before any event loop or thread exists).  Returns index -> pid."""
    gc.collect()
    gc.freeze()
    pids: dict[int, int] = {}
    primary = os.getpid()
    for index in range(1, settings.workers):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            code = 0
            try:
                die_with_parent(primary)
                serve(settings, index)
            except BaseException:
                code = 1
            finally:
                flush_logs()
                os._exit(code)
        pids[index] = pid
    gc.unfreeze()
    return pids


class WorkerPool:
    """Run in the primary process: watch, replace and stop the secondary workers."""

    def __init__(self, settings: Settings, scheduler: Scheduler, pids: dict[int, int]) -> None:
        self.settings = settings
        self.scheduler = scheduler
        self.pids = dict(pids)
        self.pidfds: dict[int, int] = {}
        self.started_at: dict[int, float] = {i: time.monotonic() for i in pids}
        self.closing = False

    def start(self) -> None:
        for index, pid in self.pids.items():
            self._watch(index, pid)
            log.info("worker_started", worker=index, pid=pid)

    def _watch(self, index: int, pid: int) -> None:
        fd = os.pidfd_open(pid)
        self.pidfds[index] = fd
        asyncio.get_running_loop().add_reader(fd, self._exited, index)

    def _unwatch(self, index: int) -> None:
        fd = self.pidfds.pop(index, None)
        if fd is not None:
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(fd)
            os.close(fd)

    def _signal(self, index: int, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self.pidfds[index], sig)

    def _reap(self, index: int) -> int | None:
        try:
            _, status = os.waitpid(self.pids[index], os.WNOHANG)
        except ChildProcessError:
            return None
        return os.waitstatus_to_exitcode(status) if status else 0

    def _spawn(self, index: int) -> None:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pyrelay", "worker", str(index), "--parent", str(os.getpid())],
            close_fds=True,
        )
        self.pids[index] = proc.pid
        self.started_at[index] = time.monotonic()
        self._watch(index, proc.pid)
        log.info("worker_started", worker=index, pid=proc.pid)

    def _exited(self, index: int) -> None:
        self._unwatch(index)
        code = self._reap(index)
        if self.closing:
            return
        log.error("worker_died", worker=index, pid=self.pids[index], exitcode=code)
        adopted = self.scheduler.adopt_orphans(index)
        if adopted:
            log.info("worker_orphans_adopted", worker=index, messages=adopted)
        # Do not spin if the worker cannot start at all (e.g. its port is taken).
        delay = 0.0 if time.monotonic() - self.started_at[index] > 10 else 5.0
        asyncio.get_running_loop().call_later(delay, self._respawn, index)

    def _respawn(self, index: int) -> None:
        if not self.closing:
            self._spawn(index)

    async def stop(self, grace: float) -> None:
        self.closing = True
        # Signalled through their pidfds, never by PID: a worker that died and was reaped
        # (its replacement not started yet) has a PID the system may have given to any
        # other process since.
        for index in list(self.pidfds):
            self._signal(index, signal.SIGTERM)
        deadline = time.monotonic() + grace + 2
        while self.pidfds and time.monotonic() < deadline:  # noqa: ASYNC110 - pidfd callbacks
            await asyncio.sleep(0.05)
        for index in list(self.pidfds):
            log.warning("worker_killed", worker=index, pid=self.pids[index])
            self._signal(index, signal.SIGKILL)
            self._unwatch(index)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pids[index], 0)  # noqa: ASYNC222 - just SIGKILLed
