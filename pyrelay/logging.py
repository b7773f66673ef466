"""structlog setup: one event per line, ``key=value`` (logfmt) by default or JSON."""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

from pyrelay.config import LogFormat

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
    renderer: Any
    if LogFormat(fmt) is LogFormat.JSON:
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.processors.LogfmtRenderer(
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
        logger_factory=structlog.PrintLoggerFactory(file=stream or sys.stderr),
        cache_logger_on_first_use=False,
    )
    # aiosmtpd and asyncio log through stdlib logging; keep their chatter out of our stream
    # unless debugging, and route what remains through the same renderer.
    logging.basicConfig(
        level=logging.WARNING if level != "debug" else logging.DEBUG,
        stream=stream or sys.stderr,
        format="level=%(levelname)s logger=%(name)s event=%(message)r",
    )
    logging.getLogger("mail.log").setLevel(logging.WARNING if level != "debug" else logging.DEBUG)


def get_logger(name: str = "pyrelay") -> Any:
    return structlog.get_logger(name)
