"""The durable queue: a state machine on disk, like Postfix's queue directories.

A message's state is the directory its queue file is in::

    tmp/        being written; never read back (removed at start-up)
    incoming/   accepted and fsync'd; waiting for its first attempt (owned by the worker process
                whose index ends the queue ID)
    active/     claimed by a delivery attempt that is running now
    deferred/   waiting for a retry; the file's mtime is the time of the next attempt (as in
                Postfix), so the queue runner finds due entries with one stat each
    hold/       parked by the operator until released
    corrupt/    unreadable entries kept for inspection

Beside them, ``status/<ID>`` holds the mutable part of an entry's envelope (see
``pyrelay.queuefile``) and ``requests/<ID>`` an operator's ``hold`` or ``delete`` of an entry
that is in ``active/``, honoured when its attempt ends.

Every transition is one ``rename`` (or the final ``unlink``), so an entry is in exactly one state
at any moment, and a rename that fails with ENOENT tells the loser of a race (a delivery claiming
an entry, an operator holding it) that someone else moved it first.

A file appears in ``incoming/`` only by ``link`` from ``tmp/`` after ``fsync``, and the directory
is fsync'd before the client hears ``250``: a crash leaves a complete entry or none.  Concurrent
sessions share one directory fsync (group commit).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import itertools
import os
import re
import secrets
import stat
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from pyrelay import quickio
from pyrelay.errors import SpoolFullError, SpoolWriteError
from pyrelay.queuefile import (
    FLAG_8BIT,
    FLAG_SMTPUTF8,
    CorruptEntry,
    Envelope,
    Header,
    encode_header,
    preamble,
    read_header,
)

__all__ = [
    "CorruptEntry",
    "Envelope",
    "EntryWriter",
    "OpenEntry",
    "Spool",
    "SpoolBody",
    "new_queue_id",
    "valid_queue_id",
    "worker_of",
]

STATES = ("incoming", "active", "deferred", "hold")
DIRS = ("tmp", *STATES, "corrupt", "status", "requests")
REQUESTS = ("hold", "delete")
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
_QUEUE_ID = re.compile(r"[0-9A-F]{16}\Z")
Chunk = bytes | bytearray | memoryview

_sequence = itertools.count(secrets.randbits(20))

# Crash injection for tests/test_transitions.py: ``PYRELAY_CRASH_AT=<point>[:<n>]`` SIGKILLs the
# process the n-th time (default 1st) it reaches that point between two steps of a transition.
# Unset (always, outside that test) it costs one comparison.
_CRASH_AT = os.environ.get("PYRELAY_CRASH_AT") or None
_crash_counts: dict[str, int] = {}


def crash_point(name: str) -> None:
    if _CRASH_AT is None:
        return
    point, _, nth = _CRASH_AT.partition(":")
    if point != name:
        return
    _crash_counts[name] = _crash_counts.get(name, 0) + 1
    if _crash_counts[name] >= int(nth or 1):
        os.kill(os.getpid(), 9)


def new_queue_id(worker: int = 0) -> str:
    """16 hex digits: milliseconds (sortable, like Postfix long IDs), a per-process sequence
    number (random start, so a restart does not replay it), and the index of the worker process
    that accepted the message (it owns the entry in incoming/).  Unique within a process unless
    it makes over a million IDs in one millisecond; ``Spool`` refuses to overwrite anyway."""
    seq = next(_sequence) & 0xFFFFF
    return f"{int(time.time() * 1000) & 0xFFFFFFFFFF:010X}{seq:05X}{worker & 15:X}"


def valid_queue_id(name: str) -> bool:
    return _QUEUE_ID.match(name) is not None


def worker_of(queue_id: str) -> int:
    """The worker process that owns a queue ID made by ``new_queue_id``."""
    try:
        return int(queue_id[-1], 16)
    except (IndexError, ValueError):
        return 0


def arrival_of(queue_id: str) -> float:
    """The arrival time encoded in a queue ID (seconds), for queue age without reading it."""
    try:
        return int(queue_id[:10], 16) / 1000.0
    except ValueError:
        return time.time()


class _DirSync:
    """Group commit of directory fsyncs, run in the writer threads.

    A writer whose rename is done takes a ticket and returns once an fsync of the directory
    that *started after* it took the ticket has completed; writers arriving while one fsync runs
    share the next.  Doing it in the same thread job as the file write saves a second hand-off
    between the event loop and the thread pool per message.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._cond = threading.Condition()
        self._requested = 0
        self._completed = 0
        self._syncing = False

    def sync(self) -> None:
        with self._cond:
            self._requested += 1
            ticket = self._requested
            while self._completed < ticket and self._syncing:
                self._cond.wait()
            if self._completed >= ticket:
                return
            self._syncing = True
            target = self._requested
        done = False
        try:
            fsync_dir(self._path)
            done = True
        finally:
            # On failure nobody is marked covered: each waiter retries (and sees the error).
            with self._cond:
                self._syncing = False
                if done:
                    self._completed = max(self._completed, target)
                self._cond.notify_all()


class _Publisher:
    """Makes small new entries durable in batches, from one spool thread at a time.

    A message written from the event loop needs only its fsync, its link into ``incoming/`` or
    ``active/`` and its directory's fsync.  As one thread job per message that cost a hand-off
    to the thread, a GIL hand-over around each of those system calls while the loop ran Python,
    and a wake-up of the loop.  Here the messages whose DATA ended while a batch was on disk go
    together in the next one: each file's fsync (after the first, the journal commit has
    usually covered the rest), their links, one fsync per directory, one wake-up of the loop.
    Nothing waits for a batch to fill: with nothing on disk, a message's batch starts at once.
    """

    def __init__(self, spool: Spool) -> None:
        self._spool = spool
        self._lock = threading.Lock()
        self._pending: list[tuple[EntryWriter, asyncio.Future[None]]] = []
        self._busy = False

    def submit(self, writer: EntryWriter) -> asyncio.Future[None]:
        """Queue an entry written from the loop; the future ends once it is durable, or with
        the ``OSError`` that kept it from being so.  The file is the thread's until then."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        with self._lock:
            self._pending.append((writer, done))
            start, self._busy = not self._busy, True
        if start:
            try:
                self._spool.executor.submit(self._run, loop)
            except RuntimeError:  # the executor is shut down: later commits must not wait
                with self._lock:
                    self._pending.clear()
                    self._busy = False
                raise
        return done

    def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            with self._lock:
                batch, self._pending = self._pending, []
                if not batch:
                    self._busy = False
                    return
            try:
                errors = self._publish([writer for writer, _ in batch])
            except BaseException as exc:  # a bug must not leave every later commit waiting
                errors = [exc] * len(batch)
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(_settle, batch, errors)

    def _publish(self, writers: list[EntryWriter]) -> list[BaseException | None]:
        errors: list[BaseException | None] = [None] * len(writers)
        for i, writer in enumerate(writers):
            try:
                assert writer._fd is not None
                os.fsync(writer._fd)
            except OSError as exc:
                errors[i] = exc
        linked: dict[str, dict[int, Path]] = {}
        for i, writer in enumerate(writers):
            if errors[i] is None:
                try:
                    final = self._spool._link(writer.tmp, writer.env.queue_id, writer.env.state)
                    linked.setdefault(writer.env.state, {})[i] = final
                except OSError as exc:
                    errors[i] = exc
        for state, finals in linked.items():
            try:
                self._spool._make_durable(state, list(finals.values()))
            except OSError as exc:
                for i in finals:
                    errors[i] = exc
        return errors


T = TypeVar("T")


async def outlive_cancel(job: asyncio.Future[T]) -> T:
    """Await a spool thread job to its end even if the caller is cancelled meanwhile (a client
    gone while its message goes to disk), then re-raise the cancellation.  The job's files are
    the thread's until it ends, and whether the entry was published is known only then."""
    cancelled = False
    while not job.done():
        try:
            await asyncio.shield(job)
        except asyncio.CancelledError:
            cancelled = True
    result = job.result()
    if cancelled:
        raise asyncio.CancelledError
    return result


def _settle(
    batch: list[tuple[EntryWriter, asyncio.Future[None]]], errors: list[BaseException | None]
) -> None:
    for (_, done), error in zip(batch, errors, strict=True):
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ClaimError(Exception):
    """An entry could not be moved into ``active/`` (a read-only or broken spool)."""


@dataclass(slots=True)
class OpenEntry:
    """A claimed entry opened for delivery: its envelope (status applied) and the message's
    place in the file.  The descriptor stays valid across renames."""

    envelope: Envelope
    fd: int
    offset: int
    # The whole message, when it was small enough to read with the envelope (one thread job
    # instead of two per delivery).
    preload: bytes | None = None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


class SpoolBody:
    """The message of an open entry, read in bounded chunks for delivery (a ``MessageBody``)."""

    CHUNK = 64 * 1024

    def __init__(self, spool: Spool, entry: OpenEntry) -> None:
        self.spool = spool
        self.entry = entry

    @property
    def size(self) -> int:
        """What is sent: the prepended fields (see ``pyrelay.queuefile``) and the message."""
        return len(self.entry.envelope.prepend) + self.entry.envelope.size

    async def chunks(self) -> AsyncIterator[bytes]:
        prepend = self.entry.envelope.prepend
        if prepend:
            yield prepend.encode("ascii")
        if self.entry.preload is not None:
            if self.entry.preload:
                yield self.entry.preload
            return
        pos = 0
        size = self.entry.envelope.size
        while pos < size:
            n = min(self.CHUNK, size - pos)
            chunk = await self.spool.run(self.spool.read_message, self.entry, pos, n)
            assert isinstance(chunk, bytes)
            if not chunk:
                raise OSError(errno.EIO, "queue file shorter than its envelope says")
            pos += len(chunk)
            yield chunk

    async def head(self, limit: int) -> bytes:
        """The first ``limit`` bytes (the header block, for a bounce)."""
        prepend = self.entry.envelope.prepend.encode("ascii")
        want = min(limit, self.size) - len(prepend)
        if want <= 0:
            return prepend[:limit]
        if self.entry.preload is not None:
            return prepend + self.entry.preload[:want]
        data = await self.spool.run(self.spool.read_message, self.entry, 0, want)
        assert isinstance(data, bytes)
        return prepend + data


class Spool:
    """The queue directories under ``root``."""

    def __init__(self, root: Path, *, threads: int = 8, worker: int = 0) -> None:
        self.root = Path(root)
        self.worker = worker
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="spool")
        self._dirsync = {name: _DirSync(self.root / name) for name in (*STATES, "status")}
        self.publisher = _Publisher(self)

    def new_id(self) -> str:
        return new_queue_id(self.worker)

    def path(self, state: str, queue_id: str) -> Path:
        return self.root / state / queue_id

    def prepare(self) -> None:
        """Create the directories and prove the spool is writable (raises ``OSError``)."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        # The queue holds other people's mail: never readable by others, whatever the umask.
        os.chmod(self.root, 0o700)
        for name in DIRS:
            (self.root / name).mkdir(exist_ok=True, mode=0o700)
        probe_writable(self.root)

    def close(self) -> None:
        self.executor.shutdown(wait=True)

    async def run(self, func: functools.partial[object] | object, *args: object) -> object:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, func, *args)  # type: ignore[arg-type]

    # -- accepting ---------------------------------------------------------------------------

    def writer(self, env: Envelope) -> EntryWriter:
        """A streaming writer for a new entry in ``incoming/``."""
        return EntryWriter(self, env)

    async def store(self, env: Envelope, chunks: Sequence[Chunk]) -> None:
        """Write a small new entry (a bounce) durably; raise ``SpoolError``."""
        writer = self.writer(env)
        for chunk in chunks:
            await writer.write(chunk)
        await writer.commit(smtputf8=env.smtputf8, eightbit=env.eightbit)

    def _link_new(self, tmp: Path, queue_id: str, state: str) -> None:
        """Publish a complete, fsync'd file in ``state`` (``incoming/``, or ``active/`` when
        this process delivers it at once) and make that durable."""
        final = self._link(tmp, queue_id, state)
        os.unlink(tmp)
        self._make_durable(state, [final])

    def _make_durable(self, state: str, finals: list[Path]) -> None:
        """fsync ``state``'s directory after new entries were linked into it; if that fails,
        unlink them again and raise (not durable, so not accepted: the clients retry)."""
        try:
            self._dirsync[state].sync()
        except OSError:
            for final in finals:
                with contextlib.suppress(OSError):
                    final.unlink(missing_ok=True)
            raise
        for _ in finals:
            crash_point("accept-after-dirsync")

    def _link(self, tmp: Path, queue_id: str, state: str) -> Path:
        """Give a complete, fsync'd ``tmp/`` file its name in ``state`` (not yet durable)."""
        final = self.path(state, queue_id)
        crash_point("accept-before-link")
        # link() fails instead of replacing: an ID clash (a clock set back to a time whose IDs
        # are still queued) must not overwrite an accepted message.
        os.link(tmp, final)
        crash_point("accept-after-link")
        return final

    # -- transitions -------------------------------------------------------------------------

    def move(self, queue_id: str, src: str, dst: str) -> bool:
        """Rename ``src/ID`` to ``dst/ID``; False when it is not in ``src`` (someone else moved
        it first).  Not fsync'd: losing a move in a crash leaves the entry in its old state,
        which is always safe to redo."""
        try:
            os.rename(self.path(src, queue_id), self.path(dst, queue_id))
        except FileNotFoundError:
            return False
        crash_point(f"move-{src}-{dst}")
        return True

    def claim(self, queue_id: str, src: str) -> bool:
        """Take an entry for a delivery attempt (``src`` -> ``active/``)."""
        return self.move(queue_id, src, "active")

    def defer(self, env: Envelope, dst: str = "deferred", *, durable: bool = True) -> None:
        """End an attempt that left recipients pending: persist the status, then move the entry
        from ``active/`` to ``dst`` with its next attempt time as mtime.  Raises ``OSError``.

        ``durable=False`` when the attempt changed no recipient's state (the common deferral:
        an upstream that is down): then neither directory is fsync'd.  A crash can only lose
        the new attempt count (or leave the entry in ``active/``, which is retried at start-up);
        the status file itself is still fsync'd before it replaces the old one, so it is never
        found empty."""
        src = self.path("active", env.queue_id)
        if not src.exists():
            raise FileNotFoundError(errno.ENOENT, "entry vanished from active/", str(src))
        self.write_status(env, sync_dir=durable)
        crash_point("defer-after-status")
        when = env.next_attempt
        os.utime(src, (when, when))
        crash_point("defer-after-utime")
        os.rename(src, self.path(dst, env.queue_id))
        crash_point("defer-after-rename")
        if durable:
            self._dirsync[dst].sync()
        env.state = dst

    def write_status(self, env: Envelope, *, sync_dir: bool = True) -> None:
        """Replace ``status/ID`` (write, fsync, rename, and a directory fsync unless told
        otherwise)."""
        tmp = self.root / "tmp" / f"{env.queue_id}.status"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            _write_all(fd, [env.status_json()])
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, self.root / "status" / env.queue_id)
        if sync_dir:
            self._dirsync["status"].sync()

    def remove(self, queue_id: str, state: str) -> None:
        """Drop a finished entry.  The entry goes first: a status file without an entry is
        harmless garbage, an entry without its status would be retried to every recipient.
        Not fsync'd: a crash may resurrect it (the at-least-once window)."""
        os.unlink(self.path(state, queue_id))
        crash_point("remove-after-unlink")
        # Usually neither exists: a failed lookup is too short to hand the GIL over for.
        for name in ("status", "requests"):
            with contextlib.suppress(FileNotFoundError):
                quickio.unlink(f"{self.root}/{name}/{queue_id}")

    def delete(self, queue_id: str, state: str) -> bool:
        try:
            self.remove(queue_id, state)
        except FileNotFoundError:
            return False
        return True

    def quarantine(self, state: str, queue_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.replace(self.path(state, queue_id), self.root / "corrupt" / queue_id)

    # -- operator requests for entries in delivery ---------------------------------------------

    def request(self, queue_id: str, action: str) -> None:
        """Record ``hold``/``delete`` for an entry in ``active/`` (durably: the command returns
        success only once the relay is certain to honour it)."""
        assert action in REQUESTS
        tmp = self.root / "tmp" / f"{queue_id}.request"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, action.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, self.root / "requests" / queue_id)
        fsync_dir(self.root / "requests")

    def pending_request(self, queue_id: str) -> str | None:
        try:
            with open(self.root / "requests" / queue_id, "rb") as f:
                action = f.read(16).decode("ascii", "replace").strip()
        except FileNotFoundError:
            return None
        return action if action in REQUESTS else None

    def honour_request(self, queue_id: str, action: str) -> None:
        """Carry out an operator request for an entry this process holds in ``active/``."""
        if action == "delete":
            self.remove(queue_id, "active")
            return
        os.rename(self.path("active", queue_id), self.path("hold", queue_id))
        self.clear_request(queue_id)

    def clear_request(self, queue_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.root / "requests" / queue_id)

    # -- reading -----------------------------------------------------------------------------

    def open_entry(self, state: str, queue_id: str, *, preload: int = 0) -> OpenEntry:
        """Open an entry and read its envelope (with the status applied), not its message.
        ``FileNotFoundError`` if it is gone, ``CorruptEntry`` if unparsable."""
        path = self.path(state, queue_id)
        # O_NOFOLLOW, O_NONBLOCK (a FIFO must not hang us) and the regular-file check: only
        # ever read our own queue files, never what a planted link points at.
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise CorruptEntry("a symbolic link, not a queue file") from None
            raise
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise CorruptEntry("not a regular file")
            header: Header = read_header(fd, queue_id, state)
            env = header.envelope
            try:
                with open(self.root / "status" / queue_id, "rb") as f:
                    env.apply_status(f.read(1 << 22))
            except FileNotFoundError:
                pass
        except BaseException:
            os.close(fd)
            raise
        entry = OpenEntry(env, fd, header.offset)
        if env.size <= preload:
            data = self.read_message(entry, 0, env.size)
            if len(data) == env.size:
                entry.preload = data
        return entry

    def claim_checked(self, src: str, queue_id: str) -> str | bool:
        """Claim an entry and look for an operator request (blocking).  False when it is no
        longer in ``src``; the action when a request is pending (the entry is then in
        ``active/``, for ``honour_request``); True otherwise.  ``ClaimError`` when the rename
        failed (the entry stays in ``src``)."""
        try:
            if not self.claim(queue_id, src):
                return False
        except OSError as exc:
            raise ClaimError(exc.strerror or str(exc)) from exc
        action = self.pending_request(queue_id)
        return True if action is None else action

    def take(self, src: str, queue_id: str, *, preload: int = 0) -> OpenEntry | str | None:
        """``claim_checked`` and ``open_entry`` in one thread job per delivery (blocking): None
        when the entry is no longer in ``src``, the action of a pending request, or the open
        entry."""
        if src != "active":  # else claimed already (accepted straight into active/)
            claimed = self.claim_checked(src, queue_id)
            if claimed is not True:
                return claimed or None
        return self.open_entry("active", queue_id, preload=preload)

    def read_envelope(self, state: str, queue_id: str) -> Envelope:
        entry = self.open_entry(state, queue_id)
        entry.close()
        return entry.envelope

    def read_message(self, entry: OpenEntry, start: int, length: int) -> bytes:
        """Up to ``length`` bytes of the message from ``start`` (blocking; use the executor)."""
        return os.pread(entry.fd, length, entry.offset + start)

    def find(self, queue_id: str) -> str | None:
        for state in (*STATES, "corrupt"):
            if self.path(state, queue_id).exists():
                return state
        return None

    def ids(self, state: str) -> Iterator[str]:
        try:
            it = os.scandir(self.root / state)
        except FileNotFoundError:
            return
        with it:
            for entry in it:
                if valid_queue_id(entry.name):
                    yield entry.name

    def due(
        self, now: float, *, flushed_at: float | None, horizon: float
    ) -> Iterator[tuple[str, float]]:
        """``(queue ID, next attempt)`` of every ``deferred/`` entry, one stat each; the caller
        picks the due ones.  A flush at ``flushed_at`` makes every entry due that was deferred
        before it (its ctime, set by the rename into ``deferred/``, is older), once: an entry
        deferred again since then keeps its new time.  A next attempt further than ``horizon``
        ahead comes from a clock that jumped back: due now."""
        try:
            it = os.scandir(self.root / "deferred")
        except FileNotFoundError:
            return
        with it:
            for entry in it:
                if not valid_queue_id(entry.name):
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                when = st.st_mtime
                if (flushed_at is not None and st.st_ctime < flushed_at) or when > now + horizon:
                    when = now
                yield entry.name, when

    # -- recovery ----------------------------------------------------------------------------

    def clean_tmp(self) -> int:
        """Remove half-written files left by a crash; their clients never got ``250``."""
        removed = 0
        for name in os.listdir(self.root / "tmp"):
            try:
                os.unlink(self.root / "tmp" / name)
                removed += 1
            except OSError:
                pass
        return removed

    def requeue(self, *, worker: int | None = None) -> int:
        """Move entries left in ``incoming/`` and ``active/`` (by a previous run, or by the
        dead worker ``worker``) to ``deferred/``, due now: their mtime is in the past, and the
        queue runner takes them from there.  Returns how many were moved."""
        moved = 0
        for state in ("active", "incoming"):
            for queue_id in list(self.ids(state)):
                if worker is not None and worker_of(queue_id) != worker:
                    continue
                if state == "incoming" and self.path("deferred", queue_id).exists():
                    # pyrelay 0.1 could crash between writing deferred/ID and unlinking
                    # incoming/ID; the deferred copy carries the newer per-recipient state.
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.path(state, queue_id))
                    continue
                if self.move(queue_id, state, "deferred"):
                    moved += 1
        if moved:
            fsync_dir(self.root / "deferred")
        return moved

    def sweep_orphans(self) -> int:
        """Remove status and request files whose entry is gone (a crash between the unlinks of
        a finished entry).  Streams the directory: memory does not grow with the queue."""
        removed = 0
        for name in ("status", "requests"):
            # Unlinking while scandir iterates is fine on Linux (an entry may be seen twice or
            # not at all; either is harmless here).
            for queue_id in self.ids(name):
                if self.find(queue_id) is None:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.root / name / queue_id)
                        removed += 1
        return removed


class EntryWriter:
    """Streams one new message into ``tmp/`` while it arrives, then publishes it.

    A message up to ``SPILL`` bytes (the common case) stays in memory until ``commit``, which
    creates and writes its file from the event loop (a write into the page cache takes
    microseconds; ``quickio`` keeps the GIL for it) and leaves to the spool's publisher only the
    calls that wait for the disk: each system call a thread makes while the loop holds the GIL
    costs a GIL hand-over and two or more context switches (with the whole commit in a thread
    that was ~40 switches per message; perf: a third of the relay's CPU at 10 clients).  Past
    ``SPILL`` the file is opened and every further chunk is written as it comes, in a spool
    thread, so memory per session stays bounded.
    """

    SPILL = 128 * 1024

    def __init__(self, spool: Spool, env: Envelope) -> None:
        self.spool = spool
        self.env = env
        self.tmp = spool.root / "tmp" / f"{env.queue_id}.new"
        self._head = env.immutable_json()
        self._buffer: list[Chunk] = []
        self._buffered = 0
        self._fd: int | None = None
        self.size = 0
        self.failed: OSError | None = None
        # The whole message when it never spilled: kept for its first delivery attempt.
        self.payload: bytes | None = None
        # Durable in the spool: accepted, even if the client is gone before hearing so.
        self.published = False

    async def write(self, chunk: Chunk) -> None:
        """Append message bytes.  A write error is remembered and reported by ``commit`` (the
        client still has to send the rest of DATA before it can hear the error)."""
        if not chunk or self.failed is not None:
            return
        self.size += len(chunk)
        self._buffer.append(chunk)
        self._buffered += len(chunk)
        if self._buffered >= self.SPILL:
            parts = self._take()
            try:
                await self.spool.run(self._spill, parts)
            except OSError as exc:
                self.failed = exc

    def reserve(self, size: int) -> None:
        """Keep ``size`` bytes in the envelope for ``set_prepend`` (before the first write)."""
        if self._fd is None:
            self._head = self.env.immutable_json() + b" " * size

    def set_prepend(self, prepend: bytes) -> bool:
        """Header fields to send before the message (computed once the message is written);
        False when they do not fit in the room ``reserve`` kept (then nothing is prepended)."""
        self.env.prepend = prepend.decode("ascii")
        if self._fd is not None and len(self.env.immutable_json()) > len(self._head):
            self.env.prepend = ""
            return False
        return True

    def _take(self) -> list[Chunk]:
        parts, self._buffer, self._buffered = self._buffer, [], 0
        return parts

    def _spill(self, parts: list[Chunk]) -> None:
        if self._fd is None:
            self._fd = os.open(self.tmp, quickio.NEW_FILE, 0o600)
            parts = [preamble(len(self._head), 0, 0), self._head, b"\n", *parts]
        _write_all(self._fd, parts)

    async def commit(self, *, smtputf8: bool, eightbit: bool, claimed: bool = False) -> None:
        """Make the entry durable in ``incoming/``, or in ``active/`` when ``claimed`` (this
        process delivers it at once: the claim's rename and its thread hand-off are saved);
        raise ``SpoolError`` (with its reply).  A caller cancelled meanwhile gets its
        ``CancelledError`` once the outcome is known, with ``published`` saying whether the
        entry is accepted all the same."""
        env = self.env
        env.size = self.size
        env.smtputf8 = smtputf8
        env.eightbit = eightbit
        env.state = "active" if claimed else "incoming"
        inline = False
        try:
            if self.failed is not None:
                raise self.failed
            parts = self._take()
            inline = self._fd is None  # never spilled: written from the loop
            if inline:
                self._create(parts)
                job = self.spool.publisher.submit(self)
            else:
                loop = asyncio.get_running_loop()
                job = loop.run_in_executor(self.spool.executor, self._commit, parts)
            await outlive_cancel(job)
        except OSError as exc:
            await self.spool.run(self._discard)
            if exc.errno in _FULL_ERRNOS:
                raise SpoolFullError() from exc
            raise SpoolWriteError() from exc
        except asyncio.CancelledError:
            self._published(inline)
            raise
        self._published(inline)

    def _published(self, inline: bool) -> None:
        self.published = True
        if inline:  # created from the loop: its close and tmp/ name too
            fd, self._fd = self._fd, None
            assert fd is not None
            # Published and durable already: neither may turn the 250 into an error (a
            # leftover tmp/ name is removed at the next start).
            with contextlib.suppress(OSError):
                quickio.close(fd)
            with contextlib.suppress(OSError):
                quickio.unlink(str(self.tmp))

    def _create(self, parts: list[Chunk]) -> None:
        """Create and write the file of a message that never spilled (from the event loop)."""
        payload = bytes(parts[0] if len(parts) == 1 else b"".join(parts))
        self.payload = payload
        fd = self._fd = quickio.open_new(str(self.tmp))
        quickio.write_all(fd, encode_header(self.env) + payload)

    def _commit(self, parts: list[Chunk]) -> None:
        """In a spool thread, for a message that spilled: the rest, the final header, fsync,
        publish."""
        flags = (FLAG_SMTPUTF8 if self.env.smtputf8 else 0) | (
            FLAG_8BIT if self.env.eightbit else 0
        )
        fd = self._fd
        assert fd is not None
        _write_all(fd, parts)
        head = self._head
        if self.env.prepend:
            head = self.env.immutable_json().ljust(len(head))
        os.pwrite(fd, preamble(len(head), self.size, flags) + head, 0)
        os.fsync(fd)
        # The bytes are on disk now; do not let a large message's page cache count against
        # the container's memory limit.
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        self._fd = None
        os.close(fd)
        self.spool._link_new(self.tmp, self.env.queue_id, self.env.state)

    def _discard(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        with contextlib.suppress(OSError):
            self.tmp.unlink(missing_ok=True)

    async def abort(self) -> None:
        """Throw away a message that will not be accepted (too big, refused, connection lost)."""
        self._take()
        if self._fd is not None or self.tmp.exists():
            await self.spool.run(self._discard)


def probe_writable(root: Path) -> None:
    """Create, fsync and remove a file in ``root/tmp``; raise ``OSError`` if that fails."""
    probe = root / "tmp" / f".probe-{os.getpid()}"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, b"ok")
        os.fsync(fd)
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)


def _write_all(fd: int, parts: Sequence[Chunk]) -> None:
    """``writev`` and finish a short write (signals, very large writes)."""
    total = sum(len(p) for p in parts)
    written = os.writev(fd, parts) if len(parts) <= 512 else 0
    if written == total:
        return
    for part in parts:
        view = memoryview(part)
        if written >= len(view):
            written -= len(view)
            continue
        view = view[written:]
        written = 0
        while view:
            n = os.write(fd, view)
            view = view[n:]
