"""structlog setup: one event per line, ``key=value`` (logfmt) by default or JSON.

Values come from clients (HELO names, addresses, header fields): in the console format every
control character is escaped, so that a value can neither start a new line nor drive a terminal
(a forged ``event=sent`` line behind a CR or an escape sequence).  JSON escapes them already.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import sys
import threading
from typing import Any, TextIO

import structlog

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
    escaped = value.translate(_ESCAPES)
    if " " in value or "=" in value or '"' in value:
        return f'"{escaped}"'
    return escaped


class ConsoleRenderer(structlog.processors.LogfmtRenderer):
    """structlog's logfmt with every value escaped by ``escape_value``."""

    def __call__(self, logger: Any, name: str, event_dict: Any) -> str:
        elements: list[str] = []
        for key, value in self._ordered_items(event_dict):
            if value is None:
                elements.append(f"{key}=")
                continue
            if isinstance(value, bool):
                value = "true" if value else "false"
            elements.append(f"{escape_value(str(key))}={escape_value(str(value))}")
        return " ".join(elements)


class CoalescedStream:
    """The log stream: lines logged by the event loop's thread during one pass of the loop are
    written together when the pass ends (one ``write`` for all of them).

    A relay logs three to five lines per message; written one by one (structlog's PrintLogger
    flushes every line) that was a seventh of the event loop's time while a queue drained
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

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def configure_logging(
    fmt: LogFormat | str = LogFormat.CONSOLE, level: str = "info", *, stream: TextIO | None = None
) -> None:
    """Configure structlog for the whole process.

    Keys come first in a fixed order so that a line reads like Postfix's maillog:
    ``event=sent queue_id=… to=<…> relay=… status=sent (…)``.
    """
    global _stream
    flush_logs()
    out = _stream = CoalescedStream(stream or sys.stderr)
    renderer: Any
    if LogFormat(fmt) is LogFormat.JSON:
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = ConsoleRenderer(
            key_order=["timestamp", "level", "event", "queue_id"], drop_missing=True
        )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=out),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )
    # aiosmtpd and asyncio log through stdlib logging; keep their chatter out of our stream
    # unless debugging, and route what remains through the same renderer.
    logging.basicConfig(
        level=logging.WARNING if level != "debug" else logging.DEBUG,
        stream=out,
        format="level=%(levelname)s logger=%(name)s event=%(message)r",
    )
    logging.getLogger("mail.log").setLevel(logging.WARNING if level != "debug" else logging.DEBUG)


def get_logger(name: str = "pyrelay") -> Any:
    return structlog.get_logger(name)
