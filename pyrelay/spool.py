"""Durable on-disk queue.

A message's state is the directory its file is in::

    tmp/        being written; never read back (removed at start-up)
    incoming/   accepted and fsync'd; waiting for (or in) its first delivery attempt
    deferred/   waiting for a retry
    hold/       parked by the operator until released
    corrupt/    unreadable entries kept for inspection

One file per message: a header line ``PYRELAY1 <n>\\n``, ``n`` bytes of JSON envelope, ``\\n``,
then the message exactly as it will be sent after ``DATA`` (CRLF line endings, dot-stuffed, no
terminating ``.``).  Keeping the wire form means a delivery writes the file's bytes as they are.

A file appears in ``incoming/`` only by ``rename`` from ``tmp/`` after ``fsync``, and the directory
is fsync'd before the client hears ``250``: a crash leaves a complete entry or none.  Concurrent
sessions share one directory fsync (group commit).
"""

from __future__ import annotations

import asyncio
import errno
import functools
import itertools
import json
import math
import os
import secrets
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyrelay.errors import SpoolFullError, SpoolWriteError

MAGIC = b"PYRELAY1 "
STATES = ("incoming", "deferred", "hold")
DIRS = ("tmp", *STATES, "corrupt")
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
Chunk = bytes | bytearray | memoryview


_sequence = itertools.count(secrets.randbits(20))


def new_queue_id(worker: int = 0) -> str:
    """16 hex digits: milliseconds (sortable, like Postfix long IDs), a per-process sequence
    number (random start, so a restart does not replay it), and the index of the worker process
    that accepted the message (it owns the entry in incoming/).  Unique within a process unless
    it makes over a million IDs in one millisecond; ``Spool.store`` refuses to overwrite anyway."""
    seq = next(_sequence) & 0xFFFFF
    return f"{int(time.time() * 1000) & 0xFFFFFFFFFF:010X}{seq:05X}{worker & 15:X}"


def worker_of(queue_id: str) -> int:
    """The worker process that owns a queue ID made by ``new_queue_id``."""
    try:
        return int(queue_id[-1], 16)
    except (IndexError, ValueError):
        return 0


@dataclass(slots=True)
class Envelope:
    """What the queue knows about a message besides its content."""

    queue_id: str
    sender: str
    recipients: list[str]
    arrival: float
    size: int = 0
    client: str = ""
    smtputf8: bool = False
    eightbit: bool = False
    attempts: int = 0
    next_attempt: float = 0.0
    last_error: str = ""
    delivered: list[str] = field(default_factory=list)
    state: str = "incoming"

    def to_json(self) -> bytes:
        # Explicit dict: dataclasses.asdict deep-copies recursively and was visible in profiles.
        data = {
            "queue_id": self.queue_id,
            "sender": self.sender,
            "recipients": self.recipients,
            "arrival": self.arrival,
            "size": self.size,
            "client": self.client,
            "smtputf8": self.smtputf8,
            "eightbit": self.eightbit,
            "attempts": self.attempts,
            "next_attempt": self.next_attempt,
            "last_error": self.last_error,
            "delivered": self.delivered,
        }
        return _ENCODER.encode(data).encode("ascii")

    @classmethod
    def from_json(cls, raw: bytes, state: str) -> Envelope:
        data: dict[str, Any] = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("envelope must be a JSON object")
        env = cls(**data)
        # Well-formed JSON of the wrong types must be quarantined here, not crash start-up
        # (``next_attempt - time.time()``) or loop in delivery.
        for name, kind in _FIELD_TYPES.items():
            value = getattr(env, name)
            if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
                raise ValueError(f"{name} has the wrong type")
        for name in ("recipients", "delivered"):
            if not all(isinstance(r, str) for r in getattr(env, name)):
                raise ValueError(f"{name} must be a list of strings")
        if not (math.isfinite(env.arrival) and math.isfinite(env.next_attempt)):
            raise ValueError("arrival and next_attempt must be finite")
        env.state = state
        return env


_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "queue_id": str,
    "sender": str,
    "recipients": list,
    "arrival": (int, float),
    "size": int,
    "client": str,
    "smtputf8": bool,
    "eightbit": bool,
    "attempts": int,
    "next_attempt": (int, float),
    "last_error": str,
    "delivered": list,
}


_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True)


class CorruptEntry(Exception):
    """A queue file that cannot be parsed."""


def encode_header(env: Envelope) -> bytes:
    body = env.to_json()
    return MAGIC + str(len(body)).encode() + b"\n" + body + b"\n"


def parse_entry(raw: bytes, state: str, queue_id: str) -> tuple[Envelope, int]:
    """Return the envelope and the offset where the message starts."""
    if not raw.startswith(MAGIC):
        raise CorruptEntry("bad magic")
    nl = raw.find(b"\n", len(MAGIC), len(MAGIC) + 12)
    if nl < 0 or not raw[len(MAGIC) : nl].isdigit():
        raise CorruptEntry("bad header line")
    length = int(raw[len(MAGIC) : nl])
    start = nl + 1
    end = start + length
    if raw[end : end + 1] != b"\n":
        raise CorruptEntry("truncated envelope")
    try:
        env = Envelope.from_json(raw[start:end], state)
    except (ValueError, TypeError, RecursionError) as exc:
        raise CorruptEntry(f"bad envelope: {exc}") from None
    if env.queue_id != queue_id:
        raise CorruptEntry("queue id does not match file name")
    offset = end + 1
    if len(raw) - offset != env.size:
        raise CorruptEntry(f"message is {len(raw) - offset} bytes, envelope says {env.size}")
    return env, offset


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
            fd = os.open(self._path, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            done = True
        finally:
            # On failure nobody is marked covered: each waiter retries (and sees the error).
            with self._cond:
                self._syncing = False
                if done:
                    self._completed = max(self._completed, target)
                self._cond.notify_all()


class Spool:
    """The queue directories under ``root``."""

    def __init__(self, root: Path, *, threads: int = 8, worker: int = 0) -> None:
        self.root = Path(root)
        self.worker = worker
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="spool")
        self._dirsync = {state: _DirSync(self.root / state) for state in STATES}

    def new_id(self) -> str:
        return new_queue_id(self.worker)

    def path(self, state: str, queue_id: str) -> Path:
        return self.root / state / queue_id

    def prepare(self) -> None:
        """Create the directories and prove the spool is writable (raises ``OSError``)."""
        for name in DIRS:
            (self.root / name).mkdir(parents=True, exist_ok=True, mode=0o700)
        probe_writable(self.root)

    def close(self) -> None:
        self._executor.shutdown(wait=True)

    # -- writing ---------------------------------------------------------------------------

    def _write_file(
        self, env: Envelope, chunks: Sequence[Chunk], state: str, *, new: bool = False
    ) -> None:
        tmp = self.root / "tmp" / f"{env.queue_id}.{state}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                parts = [encode_header(env), *chunks]
                total = sum(len(p) for p in parts)
                written = os.writev(fd, parts)
                if written != total:
                    _write_rest(fd, parts, written)
                os.fsync(fd)
            finally:
                os.close(fd)
            final = self.path(state, env.queue_id)
            if new:
                # link() fails instead of replacing: an ID clash (a clock set back to a time
                # whose IDs are still queued) must not overwrite an accepted message.
                os.link(tmp, final)
                os.unlink(tmp)
            else:
                os.rename(tmp, final)
            try:
                self._dirsync[state].sync()
            except OSError:
                # Not durable, so not accepted: the client is told to retry.
                final.unlink(missing_ok=True)
                raise
        except OSError as exc:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            if exc.errno in _FULL_ERRNOS:
                raise SpoolFullError() from exc
            raise SpoolWriteError() from exc

    async def store(self, env: Envelope, chunks: Sequence[Chunk]) -> None:
        """Write a new entry into ``incoming/`` durably; raise ``SpoolError`` (with its reply)."""
        env.size = sum(len(c) for c in chunks)
        env.state = "incoming"
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(
            self._executor, functools.partial(self._write_file, env, chunks, "incoming", new=True)
        )

    async def rewrite(self, env: Envelope, message: bytes, state: str) -> None:
        """Persist a changed envelope (after an attempt) under ``state``, replacing the old file."""
        old_state = env.state
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._write_file, env, [message], state)
        env.state = state
        if old_state != state:
            # Losing this unlink in a crash leaves two copies; recovery keeps the later state.
            self._unlink(old_state, env.queue_id)

    def remove(self, env: Envelope) -> None:
        """Drop a finished entry.  Not fsync'd: a crash may resurrect it (at-least-once)."""
        try:
            os.unlink(self.path(env.state, env.queue_id))
        except FileNotFoundError:
            # The operator held it during its delivery; a release would deliver it twice.
            if self.path("hold", env.queue_id).exists():
                self._unlink("hold", env.queue_id)

    def _unlink(self, state: str, queue_id: str) -> None:
        try:
            os.unlink(self.path(state, queue_id))
        except FileNotFoundError:
            pass

    # -- reading ---------------------------------------------------------------------------

    def read(self, state: str, queue_id: str) -> tuple[Envelope, bytes]:
        """Envelope and wire-form message of one entry; ``CorruptEntry`` if unparsable."""
        with open(self.path(state, queue_id), "rb") as f:
            raw = f.read()
        env, offset = parse_entry(raw, state, queue_id)
        return env, raw[offset:]

    async def read_async(self, state: str, queue_id: str) -> tuple[Envelope, bytes]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.read, state, queue_id)

    def quarantine(self, state: str, queue_id: str) -> None:
        try:
            os.replace(self.path(state, queue_id), self.root / "corrupt" / queue_id)
        except FileNotFoundError:
            pass

    def ids(self, state: str) -> Iterator[str]:
        try:
            names = os.listdir(self.root / state)
        except FileNotFoundError:
            return
        for name in names:
            if not name.startswith("."):
                yield name

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

    def find(self, queue_id: str) -> str | None:
        for state in STATES:
            if self.path(state, queue_id).exists():
                return state
        return None

    def move(self, queue_id: str, src: str, dst: str, *, due_now: bool = False) -> bool:
        """Operator moves (hold/release).  Returns False when the entry is not in ``src``."""
        try:
            env, message = self.read(src, queue_id)
        except FileNotFoundError:
            return False
        if due_now:
            env.next_attempt = 0.0
        env.state = dst
        self._write_file(env, [message], dst)
        self._unlink(src, queue_id)
        return True


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


def _write_rest(fd: int, parts: Sequence[Chunk], written: int) -> None:
    """Finish a short ``writev`` (rare: signals, very large writes)."""
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
