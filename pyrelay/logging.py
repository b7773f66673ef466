"""Logging: one event per line, ``key=value`` (logfmt) by default or JSON.

Values come from clients (HELO names, addresses, header fields): in the console format every
control character is escaped, so that a value can neither start a new line nor drive a terminal
(a forged ``event=sent`` line behind a CR or an escape sequence).  JSON escapes them already.

A logger of our own: until issue 10 this was structlog, which cost 1.5-2 MB of modules in every
process and ran a processor chain for every line.  The lines are byte for byte what structlog
wrote with pyrelay's configuration (tests/test_logging.py holds lines captured from it):

- console: ``timestamp=… level=… event=… queue_id=…`` first (queue_id only when given and not
  None), then the other keys in call order; None as ``key=``, bools as ``true``/``false``, the
  rest as ``str(value)`` through ``escape_value``;
- JSON: ``json.dumps`` of the call's keys, then ``event``, ``level``, ``timestamp`` (and
  ``exception``), ``repr`` for what JSON cannot hold.

The timestamp is UTC ISO 8601 with a ``Z``, microseconds included unless they are zero (as
``datetime.isoformat`` writes it).  ``log.exception`` (or ``exc_info=`` on any call: True, an
exception or an ``exc_info`` tuple) adds the traceback under ``exception``.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import sys
import threading
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from types import TracebackType
from typing import TextIO

from pyrelay.config import LogFormat


def _escape_table() -> dict[int, str]:
    table = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F, *range(0x80, 0xA0)]}
    table.update({0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r", 0x5C: "\\\\", 0x22: '\\"'})
    # Not control characters, but line breaks to str.splitlines() and some log viewers.
    table.update({0x2028: "\\u2028", 0x2029: "\\u2029"})
    # Lone surrogates: bytes that were not UTF-8 (aiosmtpd decodes with surrogateescape) are
    # shown as the byte, other surrogates by code point; neither can be written as UTF-8.
    table.update({c: f"\\x{c - 0xDC00:02x}" for c in range(0xDC80, 0xDD00)})
    table.update({c: f"\\u{c:04x}" for c in range(0xD800, 0xE000) if c not in table})
    return table


_ESCAPES = _escape_table()


def escape_value(value: str) -> str:
    """One logfmt value: C0, DEL and C1 controls, backslash and quote escaped; quoted when it
    holds a space or ``=`` (or is empty after a non-empty input)."""
    # Every character escaped but backslash and quote is unprintable to str.isprintable (which
    # is fast): most values skip the translation.
    if value.isprintable() and "\\" not in value and '"' not in value:
        return f'"{value}"' if " " in value or "=" in value else value
    escaped = value.translate(_ESCAPES)
    if " " in value or "=" in value or '"' in value:
        return f'"{escaped}"'
    return escaped


class CoalescedStream:
    """The log stream: lines logged by the event loop's thread during one pass of the loop are
    written together when the pass ends (one ``write`` for all of them).

    A relay logs three to five lines per message; written one by one (each flushed, as
    structlog's PrintLogger did) that was a seventh of the event loop's time while a queue drained
    (py-spy).  Code outside a running loop (start-up, other threads, exit) writes through, after
    whatever is buffered.  A ``kill -9`` loses at most the lines of the pass it interrupts."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._lines: list[str] = []
        self._scheduled = False
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            with self._lock:
                self._drain_locked()
                self.stream.write(text)
                self.stream.flush()
            return len(text)
        # Under the lock too: a write from another thread drains the buffer, and a line
        # appended between its join and its clear would be lost.
        with self._lock:
            self._lines.append(text)
            schedule, self._scheduled = not self._scheduled, True
        if schedule:
            loop.call_soon(self.drain)
        return len(text)

    def flush(self) -> None:
        """Called by ``print(..., flush=True)`` after every line: inside the loop the end of the
        pass writes them; outside, now."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            self.drain()

    def drain(self) -> None:
        with self._lock:
            self._drain_locked()

    def _drain_locked(self) -> None:
        self._scheduled = False
        if self._lines:
            text = "".join(self._lines)
            self._lines.clear()
            self.stream.write(text)
            self.stream.flush()


_stream: CoalescedStream | None = None


def flush_logs() -> None:
    """Write out buffered log lines (before ``os._exit``)."""
    if _stream is not None:
        _stream.drain()


atexit.register(flush_logs)

_DEBUG, _INFO, _WARNING, _ERROR = logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR
_LEVELS = {"debug": _DEBUG, "info": _INFO, "warning": _WARNING, "error": _ERROR}

_ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]


def _exc_info(value: object) -> _ExcInfo | None:
    """What ``exc_info=`` names: an exception, an ``exc_info`` tuple, or (any other true value)
    the exception being handled, if there is one."""
    if isinstance(value, BaseException):
        return type(value), value, value.__traceback__
    if isinstance(value, tuple) and len(value) == 3:
        kind, exc, tb = value
        if (
            isinstance(kind, type)
            and issubclass(kind, BaseException)
            and isinstance(exc, BaseException)
            and (tb is None or isinstance(tb, TracebackType))
        ):
            return kind, exc, tb
    if value:
        kind, exc, tb = sys.exc_info()
        if kind is not None and exc is not None:
            return kind, exc, tb
    return None


def _pair(key: str, value: object) -> str:
    if value is None:
        return f"{key}="
    if value is True or value is False:
        return f"{escape_value(key)}={'true' if value else 'false'}"
    return f"{escape_value(key)}={escape_value(value if type(value) is str else str(value))}"


def _console(event_dict: dict[str, object]) -> str:
    # timestamp and level are ours (set last by _emit) and need no escaping; queue_id is left
    # out when None, as structlog's key_order with drop_missing did.
    pop = event_dict.pop
    event, queue_id = pop("event", None), pop("queue_id", None)
    pairs = [f"timestamp={pop('timestamp')} level={pop('level')}"]
    if event is not None:
        pairs.append(_pair("event", event))
    if queue_id is not None:
        pairs.append(_pair("queue_id", queue_id))
    pairs += [_pair(key, value) for key, value in event_dict.items()]
    return " ".join(pairs)


_json: Callable[[dict[str, object]], str] = json.JSONEncoder(default=repr).encode

# What configure_logging set; before it is called, console lines of level info and above to
# (the then current) sys.stderr.
_min_level = _INFO
_render: Callable[[dict[str, object]], str] = _console


def _emit(level: str, event: str, kw: dict[str, object]) -> None:
    # The keys in the order structlog's processors added them: the call's, event, level,
    # timestamp, exception.
    exc = _exc_info(kw.pop("exc_info")) if "exc_info" in kw else None
    kw["event"] = event
    kw["level"] = level
    kw["timestamp"] = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    if exc is not None:
        kw["exception"] = "".join(traceback.format_exception(*exc)).removesuffix("\n")
    (_stream or sys.stderr).write(_render(kw) + "\n")


class Logger:
    """``log.info("sent", queue_id=…, to=…)``: one line, rendered and written as configured at
    the time of the call.  A level below the configured one returns at once."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name  # not written (structlog's logger name was not either)

    def debug(self, event: str, **kw: object) -> None:
        if _min_level <= _DEBUG:
            _emit("debug", event, kw)

    def info(self, event: str, **kw: object) -> None:
        if _min_level <= _INFO:
            _emit("info", event, kw)

    def warning(self, event: str, **kw: object) -> None:
        if _min_level <= _WARNING:
            _emit("warning", event, kw)

    def error(self, event: str, **kw: object) -> None:
        if _min_level <= _ERROR:
            _emit("error", event, kw)

    def exception(self, event: str, **kw: object) -> None:
        """``error`` with the traceback of the exception being handled."""
        if _min_level <= _ERROR:
            kw.setdefault("exc_info", True)
            _emit("error", event, kw)


def get_logger(name: str = "pyrelay") -> Logger:
    return Logger(name)


def configure_logging(
    fmt: LogFormat | str = LogFormat.CONSOLE, level: str = "info", *, stream: TextIO | None = None
) -> None:
    """Configure logging for the whole process; loggers made before follow it.

    Keys come first in a fixed order so that a line reads like Postfix's maillog:
    ``event=sent queue_id=… to=<…> relay=… status=sent (…)``.
    """
    global _stream, _render, _min_level
    render = _json if LogFormat(fmt) is LogFormat.JSON else _console
    min_level = _LEVELS[level]
    flush_logs()
    out = _stream = CoalescedStream(stream or sys.stderr)
    _render, _min_level = render, min_level
    # aiosmtpd and asyncio log through stdlib logging; keep their chatter out of our stream
    # unless debugging, and route what remains through the same renderer.
    logging.basicConfig(
        level=logging.WARNING if level != "debug" else logging.DEBUG,
        stream=out,
        format="level=%(levelname)s logger=%(name)s event=%(message)r",
    )
    logging.getLogger("mail.log").setLevel(logging.WARNING if level != "debug" else logging.DEBUG)
