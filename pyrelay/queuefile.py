"""The on-disk format of one queue entry, and the mutable delivery status kept beside it.

A queue file is written once and never changed afterwards::

    PYRELAY2 <envelope length:8> <message size:12> <flags:1>\\n
    <envelope JSON>\\n
    <message in wire form: CRLF line endings, dot-stuffed, no terminating ".">

The envelope may carry ``prepend``: header fields computed after the message was streamed into
the file (DKIM signatures need the whole body), sent before the message's bytes.  The writer
reserves room for them by padding the envelope JSON with spaces (JSON allows trailing
whitespace) and fills them in with the same ``pwrite`` as the size; the message size in the
preamble does not count them.

The first line has a fixed width, so the writer can stream the message into the file and fill in
its size and flags (SMTPUTF8, 8-bit) at the end with one ``pwrite``.  Keeping the wire form means
a delivery sends the file's bytes as they are.

What changes between attempts (remaining recipients, attempts, next attempt, last error) lives in
a small status file (``status/<ID>``, JSON), so a deferral writes O(envelope) bytes and the
message bytes are never copied.  An entry without a status file is at its first attempt.

``PYRELAY1`` files (pyrelay 0.1: a variable-length header line and the whole envelope, mutable
fields included, in the same file) are still read, so a spool survives an upgrade.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

MAGIC_V1 = b"PYRELAY1 "
MAGIC = b"PYRELAY2 "
# "PYRELAY2 " + 8 digits + " " + 12 digits + " " + 1 digit + "\n"
PREAMBLE_SIZE = len(MAGIC) + 8 + 1 + 12 + 1 + 1 + 1
FLAG_SMTPUTF8 = 1
FLAG_8BIT = 2
# Enough to hold the preamble and any envelope (1000 recipients of 256 octets, JSON-escaped).
MAX_ENVELOPE = 2 * 1024 * 1024


class CorruptEntry(Exception):
    """A queue file that cannot be parsed."""


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
    prepend: str = ""  # header fields sent before the message (ASCII, CRLF-terminated)

    def immutable_json(self) -> bytes:
        # Explicit dict: dataclasses.asdict deep-copies recursively and was visible in profiles.
        data = {
            "queue_id": self.queue_id,
            "sender": self.sender,
            "recipients": self.recipients,
            "arrival": self.arrival,
            "client": self.client,
        }
        if self.prepend:
            data["prepend"] = self.prepend
        return _ENCODER.encode(data).encode("ascii")

    def status_json(self) -> bytes:
        data = {
            "v": 1,
            "recipients": self.recipients,
            "attempts": self.attempts,
            "next_attempt": self.next_attempt,
            "last_error": self.last_error,
            "delivered": self.delivered,
        }
        return _ENCODER.encode(data).encode("ascii")

    def apply_status(self, raw: bytes) -> None:
        """Overlay a status file's fields; ``CorruptEntry`` if it is not one."""
        try:
            data: Any = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise CorruptEntry(f"bad status file: {exc}") from None
        if not isinstance(data, dict) or data.get("v") != 1:
            raise CorruptEntry("bad status file: not a version 1 status object")
        try:
            recipients = _strings(data["recipients"], "recipients")
            delivered = _strings(data.get("delivered", []), "delivered")
            attempts = data["attempts"]
            next_attempt = data["next_attempt"]
            last_error = data["last_error"]
        except KeyError as exc:
            raise CorruptEntry(f"bad status file: missing {exc}") from None
        if not isinstance(attempts, int) or isinstance(attempts, bool):
            raise CorruptEntry("bad status file: attempts")
        if not _finite(next_attempt) or not isinstance(last_error, str):
            raise CorruptEntry("bad status file: next_attempt or last_error")
        self.recipients = recipients
        self.delivered = delivered
        self.attempts = attempts
        self.next_attempt = float(next_attempt)
        self.last_error = last_error


_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True)


def _strings(value: object, name: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise CorruptEntry(f"{name} must be a list of strings")
    return value


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def preamble(envelope_length: int, size: int, flags: int) -> bytes:
    return b"%s%08d %012d %d\n" % (MAGIC, envelope_length, size, flags)


def encode_header(env: Envelope) -> bytes:
    """Preamble and envelope of a complete entry whose message is ``env.size`` bytes."""
    body = env.immutable_json()
    flags = (FLAG_SMTPUTF8 if env.smtputf8 else 0) | (FLAG_8BIT if env.eightbit else 0)
    return preamble(len(body), env.size, flags) + body + b"\n"


@dataclass(frozen=True, slots=True)
class Header:
    """A parsed queue file header: the envelope, and where the message starts."""

    envelope: Envelope
    offset: int


def parse_header(head: bytes, queue_id: str, state: str, file_size: int) -> Header:
    """Parse the start of a queue file (at least the preamble and envelope must be in
    ``head``); check that the file is as long as the header says."""
    if head.startswith(MAGIC):
        return _parse_v2(head, queue_id, state, file_size)
    if head.startswith(MAGIC_V1):
        return _parse_v1(head, queue_id, state, file_size)
    raise CorruptEntry("bad magic")


def header_length(head: bytes) -> int:
    """How many bytes of the file the header needs (to read the rest when ``head`` was short);
    ``CorruptEntry`` if the first line is not a queue file's."""
    if head.startswith(MAGIC):
        if len(head) < PREAMBLE_SIZE or not head[len(MAGIC) : len(MAGIC) + 8].isdigit():
            raise CorruptEntry("bad header line")
        return PREAMBLE_SIZE + int(head[len(MAGIC) : len(MAGIC) + 8]) + 1
    if head.startswith(MAGIC_V1):
        nl = head.find(b"\n", len(MAGIC_V1), len(MAGIC_V1) + 12)
        if nl < 0 or not head[len(MAGIC_V1) : nl].isdigit():
            raise CorruptEntry("bad header line")
        return nl + 1 + int(head[len(MAGIC_V1) : nl]) + 1
    raise CorruptEntry("bad magic")


def _parse_v2(head: bytes, queue_id: str, state: str, file_size: int) -> Header:
    line = head[:PREAMBLE_SIZE]
    parts = line[len(MAGIC) : -1].split(b" ")
    if len(line) != PREAMBLE_SIZE or line[-1:] != b"\n" or len(parts) != 3:
        raise CorruptEntry("bad header line")
    if not all(p.isdigit() for p in parts):
        raise CorruptEntry("bad header line")
    length, size, flags = (int(p) for p in parts)
    end = PREAMBLE_SIZE + length
    env = _envelope(_json_at(head, PREAMBLE_SIZE, end), state)
    env.size = size
    env.smtputf8 = bool(flags & FLAG_SMTPUTF8)
    env.eightbit = bool(flags & FLAG_8BIT)
    return _checked(env, queue_id, end + 1, file_size)


def _parse_v1(head: bytes, queue_id: str, state: str, file_size: int) -> Header:
    nl = head.find(b"\n", len(MAGIC_V1), len(MAGIC_V1) + 12)
    if nl < 0 or not head[len(MAGIC_V1) : nl].isdigit():
        raise CorruptEntry("bad header line")
    start = nl + 1
    end = start + int(head[len(MAGIC_V1) : nl])
    env = _envelope(_json_at(head, start, end), state)
    return _checked(env, queue_id, end + 1, file_size)


def _json_at(head: bytes, start: int, end: int) -> object:
    """The envelope JSON between ``start`` and the newline at ``end``."""
    if head[end : end + 1] != b"\n":
        raise CorruptEntry("truncated envelope")
    try:
        return json.loads(head[start:end])
    except (ValueError, RecursionError) as exc:
        raise CorruptEntry(f"bad envelope: {exc}") from None


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
    "prepend": str,
}


def _envelope(data: object, state: str) -> Envelope:
    if not isinstance(data, dict):
        raise CorruptEntry("bad envelope: not a JSON object")
    unknown = set(data) - set(_FIELD_TYPES)
    if unknown or not {"queue_id", "sender", "recipients", "arrival"} <= set(data):
        raise CorruptEntry("bad envelope: unexpected or missing fields")
    # Well-formed JSON of the wrong types must be quarantined here, not crash start-up or loop
    # in delivery.
    for name, value in data.items():
        kind = _FIELD_TYPES[name]
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise CorruptEntry(f"bad envelope: {name} has the wrong type")
    env = Envelope(**data)
    _strings(env.recipients, "recipients")
    _strings(env.delivered, "delivered")
    if not (math.isfinite(env.arrival) and math.isfinite(env.next_attempt)):
        raise CorruptEntry("bad envelope: arrival and next_attempt must be finite")
    env.state = state
    return env


def _checked(env: Envelope, queue_id: str, offset: int, file_size: int) -> Header:
    if env.queue_id != queue_id:
        raise CorruptEntry("queue id does not match file name")
    if file_size - offset != env.size:
        raise CorruptEntry(f"message is {file_size - offset} bytes, envelope says {env.size}")
    return Header(env, offset)


def read_header(fd: int, queue_id: str, state: str) -> Header:
    """Read and parse the header of an open queue file (the message is not read)."""
    size = os.fstat(fd).st_size
    head = os.pread(fd, 4096, 0)
    need = header_length(head)
    if need > MAX_ENVELOPE:
        raise CorruptEntry("envelope too large")
    if need > len(head):
        head = os.pread(fd, need, 0)
    return parse_header(head, queue_id, state, size)
