"""pyrelay.logging: every line is byte for byte what structlog wrote for the same call (the
library pyrelay logged with until issue 10: the expected strings below were captured from
structlog 26.1 with the old configuration, timestamps masked), and loggers made at import time
follow whatever ``configure_logging`` said last."""

from __future__ import annotations

import asyncio
import io
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyrelay.logging import configure_logging, escape_value, get_logger

ROOT = Path(__file__).resolve().parents[1]
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z")

# Made before any configure_logging of this module, like every ``log`` of the code base.
log = get_logger("pyrelay.test")


class Case(NamedTuple):
    method: str
    event: str
    kw: dict[str, object]
    console: str
    json: str


CASES = [
    Case(
        "info",
        "sent",
        {
            "to": "<a@b.example>",
            "queue_id": "4F2A9C01",
            "relay": "[10.0.0.1]:25",
            "delay": 0.5,
            "status": "sent (250 2.0.0 ok)",
        },
        "timestamp=<TS> level=info event=sent queue_id=4F2A9C01 to=<a@b.example> "
        'relay=[10.0.0.1]:25 delay=0.5 status="sent (250 2.0.0 ok)"',
        '{"to": "<a@b.example>", "queue_id": "4F2A9C01", "relay": "[10.0.0.1]:25", '
        '"delay": 0.5, "status": "sent (250 2.0.0 ok)", "event": "sent", "level": '
        '"info", "timestamp": "<TS>"}',
    ),
    Case(
        "info",
        "started",
        {"version": "0.1.0", "workers": 1},
        "timestamp=<TS> level=info event=started version=0.1.0 workers=1",
        '{"version": "0.1.0", "workers": 1, "event": "started", "level": "info", '
        '"timestamp": "<TS>"}',
    ),
    Case(
        "info",
        "queued",
        {"queue_id": "Q1"},
        "timestamp=<TS> level=info event=queued queue_id=Q1",
        '{"queue_id": "Q1", "event": "queued", "level": "info", "timestamp": "<TS>"}',
    ),
    Case(
        "info",
        "empty",
        {},
        "timestamp=<TS> level=info event=empty",
        '{"event": "empty", "level": "info", "timestamp": "<TS>"}',
    ),
    Case(
        "info",
        "nones",
        {"queue_id": None, "reason": None, "relayhost_username": "", "n": 0},
        "timestamp=<TS> level=info event=nones reason= relayhost_username= n=0",
        '{"queue_id": null, "reason": null, "relayhost_username": "", "n": 0, '
        '"event": "nones", "level": "info", "timestamp": "<TS>"}',
    ),
    Case(
        "info",
        "flags",
        {"ok": True, "bad": False, "queue_id": True},
        "timestamp=<TS> level=info event=flags queue_id=true ok=true bad=false",
        '{"ok": true, "bad": false, "queue_id": true, "event": "flags", "level": '
        '"info", "timestamp": "<TS>"}',
    ),
    Case(
        "info",
        "numbers",
        {"a": 0, "b": -7, "c": 2**70, "d": 1.25, "e": 1e-07, "f": float("inf"), "g": float("nan")},
        "timestamp=<TS> level=info event=numbers a=0 b=-7 c=1180591620717411303424 "
        "d=1.25 e=1e-07 f=inf g=nan",
        '{"a": 0, "b": -7, "c": 1180591620717411303424, "d": 1.25, "e": 1e-07, '
        '"f": Infinity, "g": NaN, "event": "numbers", "level": "info", '
        '"timestamp": "<TS>"}',
    ),
    Case(
        "warning",
        "quoting",
        {
            "space": "a b",
            "eq": "a=b",
            "quote": 'say "hi"',
            "backslash": "C:\\dir",
            "both": 'x= "y"',
        },
        'timestamp=<TS> level=warning event=quoting space="a b" eq="a=b" '
        'quote="say \\"hi\\"" backslash=C:\\\\dir both="x= \\"y\\""',
        '{"space": "a b", "eq": "a=b", "quote": "say \\"hi\\"", "backslash": '
        '"C:\\\\dir", "both": "x= \\"y\\"", "event": "quoting", "level": '
        '"warning", "timestamp": "<TS>"}',
    ),
    Case(
        "error",
        "lines",
        {"crlf": "a\r\nb", "tab": "a\tb", "lf": "forged\nevent=sent"},
        'timestamp=<TS> level=error event=lines crlf=a\\r\\nb tab=a\\tb lf="forged\\nevent=sent"',
        '{"crlf": "a\\r\\nb", "tab": "a\\tb", "lf": "forged\\nevent=sent", '
        '"event": "lines", "level": "error", "timestamp": "<TS>"}',
    ),
    Case(
        "info",
        "controls",
        {
            "nul": "\x00",
            "esc": "\x1b[31mred",
            "bel": "\x07",
            "de": "\x7f",
            "c1": "\x80\x85\x9b\x9f",
            "nbsp": "a\xa0b",
        },
        "timestamp=<TS> level=info event=controls nul=\\x00 esc=\\x1b[31mred "
        "bel=\\x07 de=\\x7f c1=\\x80\\x85\\x9b\\x9f nbsp=a\xa0b",
        '{"nul": "\\u0000", "esc": "\\u001b[31mred", "bel": "\\u0007", "de": '
        '"\\u007f", "c1": "\\u0080\\u0085\\u009b\\u009f", "nbsp": "a\\u00a0b", '
        '"event": "controls", "level": "info", "timestamp": "<TS>"}',
    ),
    Case(
        "info",
        "separators",
        {"ls": "a\u2028b", "ps": "a\u2029b", "nel": "a\x85b"},
        "timestamp=<TS> level=info event=separators ls=a\\u2028b ps=a\\u2029b nel=a\\x85b",
        '{"ls": "a\\u2028b", "ps": "a\\u2029b", "nel": "a\\u0085b", "event": '
        '"separators", "level": "info", "timestamp": "<TS>"}',
    ),
    Case(
        "info",
        "surrogates",
        {
            "escaped_bytes": "H\udcc3\udca9LO \udc80\udcff",
            "lone_high": "\ud800",
            "lone_low": "\udfff",
            "dc7f": "\udc7f",
        },
        'timestamp=<TS> level=info event=surrogates escaped_bytes="H\\xc3\\xa9LO '
        '\\x80\\xff" lone_high=\\ud800 lone_low=\\udfff dc7f=\\udc7f',
        '{"escaped_bytes": "H\\udcc3\\udca9LO \\udc80\\udcff", "lone_high": '
        '"\\ud800", "lone_low": "\\udfff", "dc7f": "\\udc7f", "event": '
        '"surrogates", "level": "info", "timestamp": "<TS>"}',
    ),
    Case(
        "info",
        "unicode",
        {"helo": "\u00e9l\u00e8ve.example", "emoji": "\U0001f4e7", "cjk": "\u90ae\u4ef6"},
        "timestamp=<TS> level=info event=unicode helo=élève.example emoji=📧 cjk=邮件",
        '{"helo": "\\u00e9l\\u00e8ve.example", "emoji": "\\ud83d\\udce7", "cjk": '
        '"\\u90ae\\u4ef6", "event": "unicode", "level": "info", "timestamp": '
        '"<TS>"}',
    ),
    Case(
        "info",
        "event with spaces=and equals",
        {"queue_id": "Q 2"},
        'timestamp=<TS> level=info event="event with spaces=and equals" queue_id="Q 2"',
        '{"queue_id": "Q 2", "event": "event with spaces=and equals", "level": '
        '"info", "timestamp": "<TS>"}',
    ),
    Case(
        "info",
        "containers",
        {
            "rcpts": ["a@x", "b@y"],
            "d": {"k": 1},
            "t": (1, "two"),
            "p": PurePosixPath("/var/spool/x"),
            "b": b"\x00raw",
        },
        "timestamp=<TS> level=info event=containers rcpts=\"['a@x', 'b@y']\" "
        "d=\"{'k': 1}\" t=\"(1, 'two')\" p=/var/spool/x b=b'\\\\x00raw'",
        '{"rcpts": ["a@x", "b@y"], "d": {"k": 1}, "t": [1, "two"], "p": '
        '"PurePosixPath(\'/var/spool/x\')", "b": "b\'\\\\x00raw\'", "event": '
        '"containers", "level": "info", "timestamp": "<TS>"}',
    ),
    Case(
        "info",
        "reserved",
        {"level": "custom", "timestamp": "custom", "we ird=": "v"},
        'timestamp=<TS> level=info event=reserved "we ird="=v',
        '{"level": "info", "timestamp": "<TS>", "we ird=": "v", "event": "reserved"}',
    ),
    Case(
        "debug",
        "debugging",
        {"queue_id": "Q3", "step": "mail_from"},
        "timestamp=<TS> level=debug event=debugging queue_id=Q3 step=mail_from",
        '{"queue_id": "Q3", "step": "mail_from", "event": "debugging", "level": '
        '"debug", "timestamp": "<TS>"}',
    ),
    Case(
        "warning",
        "exc_info_given",
        {"queue_id": "Q6", "exc_info": ValueError("given")},
        "timestamp=<TS> level=warning event=exc_info_given queue_id=Q6 "
        'exception="ValueError: given"',
        '{"queue_id": "Q6", "event": "exc_info_given", "level": "warning", '
        '"timestamp": "<TS>", "exception": "ValueError: given"}',
    ),
    Case(
        "exception",
        "no_exception_active",
        {"queue_id": "Q4"},
        "timestamp=<TS> level=error event=no_exception_active queue_id=Q4",
        '{"queue_id": "Q4", "event": "no_exception_active", "level": "error", "timestamp": "<TS>"}',
    ),
]

# log.exception inside an ``except``: the traceback (of code without a source file, so that it
# is the same wherever the test runs) goes under ``exception``, last.
FAIL = compile(
    "def fail(log):\n"
    "    try:\n"
    "        raise ValueError('bad \"value\"\\nsecond line')\n"
    "    except ValueError:\n"
    "        log.exception('delivery_crashed', queue_id='Q5', attempt=2)\n",
    "<case>",
    "exec",
)
EXCEPTION = {
    "console": "timestamp=<TS> level=error event=delivery_crashed queue_id=Q5 attempt=2 "
    'exception="Traceback (most recent call last):\\n  File \\"<case>\\", line 3, in fail'
    '\\nValueError: bad \\"value\\"\\nsecond line"',
    "json": '{"queue_id": "Q5", "attempt": 2, "event": "delivery_crashed", "level": "error", '
    '"timestamp": "<TS>", "exception": "Traceback (most recent call last):\\n  File '
    '\\"<case>\\", line 3, in fail\\nValueError: bad \\"value\\"\\nsecond line"}',
}


@pytest.fixture(autouse=True)
def _default_logging() -> Iterator[None]:
    yield
    configure_logging("console", "info")


def render(fmt: str, level: str, call: Callable[[], object]) -> str:
    out = io.StringIO()
    configure_logging(fmt, level, stream=out)
    call()
    return TIMESTAMP.sub("<TS>", out.getvalue())


@pytest.mark.parametrize("fmt", ["console", "json"])
@pytest.mark.parametrize("case", CASES, ids=[case.event for case in CASES])
def test_lines_are_what_structlog_wrote(case: Case, fmt: str) -> None:
    text = render(fmt, "debug", lambda: getattr(log, case.method)(case.event, **case.kw))
    assert text == getattr(case, fmt) + "\n"


@pytest.mark.parametrize("fmt", ["console", "json"])
def test_exception_adds_the_traceback(fmt: str) -> None:
    namespace: dict[str, object] = {}
    exec(FAIL, namespace)
    fail = namespace["fail"]
    assert callable(fail)
    assert render(fmt, "info", lambda: fail(log)) == EXCEPTION[fmt] + "\n"


@pytest.mark.parametrize(
    ("level", "shown"),
    [
        ("debug", ["debug", "info", "warning", "error", "exception"]),
        ("info", ["info", "warning", "error", "exception"]),
        ("warning", ["warning", "error", "exception"]),
        ("error", ["error", "exception"]),
    ],
)
def test_levels_below_the_configured_one_are_dropped(level: str, shown: list[str]) -> None:
    def call() -> None:
        for method in ["debug", "info", "warning", "error", "exception"]:
            getattr(log, method)(method)

    events = [line.split(" ")[2] for line in render("console", level, call).splitlines()]
    assert events == [f"event={method}" for method in shown]


def test_a_dropped_line_is_not_rendered() -> None:
    class Explosive:
        def __str__(self) -> str:
            raise AssertionError("rendered")

        __repr__ = __str__

    for fmt in ["console", "json"]:
        assert render(fmt, "info", lambda: log.debug("quiet", value=Explosive())) == ""


def test_loggers_follow_the_latest_configuration() -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging("console", "info", stream=first)
    log.info("one", n=1)
    log.debug("hidden")
    configure_logging("json", "debug", stream=second)
    log.debug("two", n=2)
    assert TIMESTAMP.sub("<TS>", first.getvalue()) == ("timestamp=<TS> level=info event=one n=1\n")
    assert TIMESTAMP.sub("<TS>", second.getvalue()) == (
        '{"n": 2, "event": "two", "level": "debug", "timestamp": "<TS>"}\n'
    )


def test_timestamps_are_utc_iso_8601() -> None:
    import datetime

    before = datetime.datetime.now(datetime.UTC)
    out = io.StringIO()
    configure_logging("json", "info", stream=out)
    log.info("now")
    after = datetime.datetime.now(datetime.UTC)
    (stamp,) = re.findall(r'"timestamp": "([^"]*)"', out.getvalue())
    assert TIMESTAMP.fullmatch(stamp)
    assert before <= datetime.datetime.fromisoformat(stamp) <= after


def test_lines_logged_in_one_loop_pass_are_one_write() -> None:
    class Sink(io.StringIO):
        writes = 0

        def write(self, text: str) -> int:
            self.writes += 1
            return super().write(text)

    sink = Sink()
    configure_logging("console", "info", stream=sink)

    async def main() -> None:
        for i in range(3):
            log.info("line", i=i)
        await asyncio.sleep(0)
        await asyncio.sleep(0)

    asyncio.run(main())
    assert sink.writes == 1
    assert [line.split(" ", 2)[2] for line in sink.getvalue().splitlines()] == [
        f"event=line i={i}" for i in range(3)
    ]


def _escape_reference(value: str) -> str:
    """escape_value as it was written first (one translate, then the quoting rule)."""
    table = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F, *range(0x80, 0xA0)]}
    table.update({0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r", 0x5C: "\\\\", 0x22: '\\"'})
    table.update({0x2028: "\\u2028", 0x2029: "\\u2029"})
    table.update({c: f"\\x{c - 0xDC00:02x}" for c in range(0xDC80, 0xDD00)})
    table.update({c: f"\\u{c:04x}" for c in range(0xD800, 0xE000) if c not in table})
    escaped = value.translate(table)
    if " " in value or "=" in value or '"' in value:
        return f'"{escaped}"'
    return escaped


def test_every_escaped_character_but_backslash_and_quote_is_unprintable() -> None:
    """escape_value skips the translation for printable values without ``\\`` or ``"``."""
    from pyrelay.logging import _ESCAPES

    assert [hex(c) for c in _ESCAPES if c not in (0x5C, 0x22) and chr(c).isprintable()] == []


@given(st.text(alphabet=st.characters(exclude_categories=())))  # surrogates included
def test_escape_value_is_the_reference(value: str) -> None:
    assert escape_value(value) == _escape_reference(value)


@given(
    st.text(
        alphabet=st.sampled_from(' =\\"a\t\r\n\x00\x1b\x7f\x85\xa0\u2028\u2029\ud800\udc80\udfffé')
    )
)
def test_escape_value_is_the_reference_on_special_characters(value: str) -> None:
    assert escape_value(value) == _escape_reference(value)


def test_a_timestamp_on_the_second_has_no_fraction(monkeypatch: pytest.MonkeyPatch) -> None:
    """As datetime.isoformat (and so structlog's TimeStamper) writes it."""
    import datetime

    import pyrelay.logging

    micros = iter([417674, 5, 0])

    class Clock(datetime.datetime):
        @classmethod
        def now(cls, tz: datetime.tzinfo | None = None) -> Clock:
            return cls(2026, 12, 1, 21, 20, 19, next(micros), tzinfo=tz)

    monkeypatch.setattr(pyrelay.logging, "datetime", Clock)
    out = io.StringIO()
    configure_logging("console", "info", stream=out)
    for _ in range(3):
        log.info("tick")
    assert [line.split(" ")[0] for line in out.getvalue().splitlines()] == [
        "timestamp=2026-12-01T21:20:19.417674Z",
        "timestamp=2026-12-01T21:20:19.000005Z",
        "timestamp=2026-12-01T21:20:19Z",
    ]


def test_unconfigured_loggers_write_console_lines_to_stderr() -> None:
    """Before configure_logging (commands that log without running the relay): info and above,
    to stderr, so that a command's own output (``--json``) stays clean."""
    code = (
        "from pyrelay.logging import get_logger\n"
        "log = get_logger('pyrelay.x')\n"
        "log.debug('hidden')\n"
        "log.info('handoff_started', to='127.0.0.1:25', messages=3)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert TIMESTAMP.sub("<TS>", done.stderr) == (
        "timestamp=<TS> level=info event=handoff_started to=127.0.0.1:25 messages=3\n"
    )


def test_the_relay_does_not_import_structlog() -> None:
    """structlog is no longer a dependency (issue 10); an installed copy must stay unloaded."""
    code = "import pyrelay.app, pyrelay.cli, sys; assert 'structlog' not in sys.modules"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
