"""File system calls too short to be worth releasing the GIL (the spool's small files).

``os.open``, ``os.write``, ``os.close`` and ``os.unlink`` release the GIL around the system
call, and take it back afterwards.  While a spool thread is waiting for the GIL (its fsync or
unlink has returned), every such call of the event loop hands the GIL over to that thread and
waits to get it back: two context switches and a scheduler wake-up each, for a call that takes
a few microseconds.  With four of them per message on the loop (create, write, close and unlink
of a small message's ``tmp/`` file) and two in the reaper's thread (the status and request files
a delivered entry usually does not have), that was a visible part of the relay's CPU at 10
clients: with these, ``bench/threads.py`` (4 interleaved pairs) went from 21-23 to 16-18
voluntary context switches and from 2.2 to 2.0 ms of CPU per message (medians).

These functions make the same calls through ``ctypes.PyDLL``, which keeps the GIL, and raise
the same ``OSError`` subclasses as ``os``.  They are only for regular files and calls that do
not wait for the disk: no other thread can run Python while one of them runs (on a pipe whose
reader is a thread of this process, a write could wait forever).  The spool's fsyncs, and the
unlinks of delivered entries (journal work, in batches), still release the GIL in their
threads.  Where the C library cannot be loaded, these are the ``os`` functions.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Callable

# How the spool creates a new file (also with os.open, in its threads).
NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC


def _bind() -> tuple[Callable[..., int], ...] | None:
    try:
        libc = ctypes.PyDLL(None, use_errno=True)
        c_open, c_write, c_close, c_unlink = libc.open, libc.write, libc.close, libc.unlink
    except (OSError, AttributeError):  # pragma: no cover - no C library to bind to
        return None
    c_open.argtypes = (ctypes.c_char_p, ctypes.c_int, ctypes.c_uint)
    c_open.restype = ctypes.c_int
    c_write.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t)
    c_write.restype = ctypes.c_ssize_t
    c_close.argtypes = (ctypes.c_int,)
    c_close.restype = ctypes.c_int
    c_unlink.argtypes = (ctypes.c_char_p,)
    c_unlink.restype = ctypes.c_int
    return c_open, c_write, c_close, c_unlink


_C = _bind()


def _error(path: str | None = None) -> OSError:
    code = ctypes.get_errno()
    # OSError(errno, ...) picks the subclass (FileNotFoundError, PermissionError, ...) as os does.
    if path is None:
        return OSError(code, os.strerror(code))
    return OSError(code, os.strerror(code), path)


def open_new(path: str, mode: int = 0o600) -> int:
    """``os.open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode)``."""
    if _C is None:  # pragma: no cover
        return os.open(path, NEW_FILE, mode)
    encoded = os.fsencode(path)
    while True:
        fd = _C[0](encoded, NEW_FILE, mode)
        if fd >= 0:
            return fd
        if ctypes.get_errno() != errno.EINTR:
            raise _error(path)


def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` (a short write is continued, EINTR retried)."""
    if _C is None:  # pragma: no cover
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        return
    while data:
        n = _C[1](fd, data, len(data))
        if n < 0:
            if ctypes.get_errno() == errno.EINTR:
                continue
            raise _error()
        data = data[n:]


def close(fd: int) -> None:
    """``os.close(fd)`` (EINTR is not retried: on Linux the descriptor is closed anyway)."""
    if _C is None:  # pragma: no cover
        os.close(fd)
        return
    if _C[2](fd) < 0:
        raise _error()


def unlink(path: str) -> None:
    """``os.unlink(path)``."""
    if _C is None:  # pragma: no cover
        os.unlink(path)
        return
    if _C[3](os.fsencode(path)) < 0:
        raise _error(path)
