"""Property tests of pyrelay.wire: whatever a client sends, the upstream sees the message boundary
pyrelay saw (no lone "." line, no bare CR/LF), and dot-stuffing round-trips."""

from __future__ import annotations

import re

from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from pyrelay.wire import (
    TERMINATOR,
    WireNormalizer,
    dot_stuff,
    dot_unstuff,
    has_bare_eol,
    header_block,
    normalize_wire,
)

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Payloads built from the pieces that matter for line structure, plus arbitrary bytes.
TOKENS = [b"\r", b"\n", b"\r\n", b".", b"..", b"a", b" ", b"\x00", b"\xff", b"MAIL FROM:<x@y.z>"]
shaped = st.lists(st.sampled_from(TOKENS), max_size=40).map(b"".join)
payloads = st.one_of(shaped, st.binary(max_size=200))
# Any "." line ended by CRLF, LF or CR: what a lax (vulnerable) next hop would stop at.
LAX_END = re.compile(rb"(?:\r\n|\n|\r)\.(?:\r\n|\n|\r)")
BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")


def relayed_form(content: bytes) -> bytes:
    """What the listener spools for a DATA payload (see ``Listener.accept``)."""
    return normalize_wire(content) if has_bare_eol(content) else content


@SETTINGS
@given(payloads)
def test_has_bare_eol_matches_reference(data: bytes) -> None:
    assert has_bare_eol(data) == bool(BARE.search(data))


@SETTINGS
@given(payloads)
@example(b".\n")
@example(b"\n.\n")
@example(b"a\r.\r")
@example(b".")
def test_normalize_wire_output_is_clean(data: bytes) -> None:
    out = normalize_wire(data)
    assert not has_bare_eol(out)
    assert TERMINATOR not in b"\r\n" + out  # no lone "." line, not even the first one
    assert not LAX_END.search(b"\r\n" + out)
    assert out == b"" or out.endswith(b"\r\n")
    assert normalize_wire(out) == out  # idempotent
    # Only line endings change and "." lines get stuffed: the text is otherwise the same.
    assert out.replace(b"\r\n", b"").replace(b".", b"") == re.sub(
        rb"\r\n|\r|\n", b"", data
    ).replace(b".", b"")


@SETTINGS
@given(payloads)
def test_received_payload_keeps_its_boundary(data: bytes) -> None:
    """For any DATA payload the listener can receive (its first terminator is the real one),
    the relayed form ends exactly where pyrelay saw it end, for strict and lax next hops."""
    content = data + b"\r\n"
    stream = b"\r\n" + content + b".\r\n"
    assume(stream.find(TERMINATOR) == len(stream) - len(TERMINATOR))
    wire = relayed_form(content)
    out = b"\r\n" + wire + b".\r\n"
    assert out.find(TERMINATOR) == len(out) - len(TERMINATOR)
    first = LAX_END.search(out)
    assert first is not None and first.end() == len(out)


@SETTINGS
@given(payloads)
def test_clean_payload_is_relayed_byte_for_byte(data: bytes) -> None:
    content = data + b"\r\n"
    assume(not has_bare_eol(content))
    assume(TERMINATOR not in b"\r\n" + content)  # receivable: no earlier end of data
    assert relayed_form(content) == content


lines = st.lists(
    st.binary(max_size=20).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")), max_size=15
)


@SETTINGS
@given(lines)
@example([b"."])
@example([b"", b"."])
@example([b"..", b".x"])
def test_dot_stuff_round_trip(parts: list[bytes]) -> None:
    message = b"".join(p + b"\r\n" for p in parts)
    wire = dot_stuff(message)
    assert dot_unstuff(wire) == message
    assert TERMINATOR not in b"\r\n" + wire
    stream = b"\r\n" + wire + b".\r\n"
    assert stream.find(TERMINATOR) == len(stream) - len(TERMINATOR)
    # Every line that starts with "." got exactly one extra ".".
    for original, stuffed in zip(parts, wire.split(b"\r\n"), strict=False):
        assert stuffed == (b"." + original if original.startswith(b".") else original)


@SETTINGS
@given(payloads)
def test_header_block_never_crashes(data: bytes) -> None:
    head = header_block(relayed_form(data + b"\r\n"))
    assert head == b"" or head.endswith(b"\r\n")


# -- the streaming normaliser the listener uses (pyrelay.wire.WireNormalizer) ----------------


def _stream(data: bytes, cuts: list[int]) -> bytes:
    norm = WireNormalizer()
    out = []
    prev = 0
    for cut in sorted(set(c % (len(data) + 1) for c in cuts)):
        out.append(norm.feed(data[prev:cut]))
        prev = cut
    out.append(norm.feed(data[prev:]))
    out.append(norm.end())
    return b"".join(out)


@SETTINGS
@given(payloads, st.lists(st.integers(min_value=0, max_value=400), max_size=8))
@example(b"a\r", [1])
@example(b"\n.\n", [1, 2])
@example(b"S: x\rX-Evil: 1\r\n\r\nbody\r.\r", [3, 9])
def test_streaming_normaliser_is_clean_and_independent_of_chunking(
    data: bytes, cuts: list[int]
) -> None:
    assume(TERMINATOR not in b"\r\n" + data)  # the listener stops at the first one
    whole = _stream(data, [])
    assert _stream(data, cuts) == whole
    assert not has_bare_eol(whole)
    assert TERMINATOR not in b"\r\n" + whole
    assert not LAX_END.search(b"\r\n" + whole)
    if not has_bare_eol(data) and data.endswith(b"\r\n"):
        assert whole == data  # clean input (DATA ends with CRLF) passes through untouched


@SETTINGS
@given(payloads)
def test_streaming_normaliser_matches_normalize_wire_in_the_body(data: bytes) -> None:
    # After a blank line the header rule (bare CR -> space) no longer applies.
    data += b"\r\n"  # DATA payloads always end with CRLF (the one before the terminator)
    message = b"Subject: x\r\n\r\n" + data
    assume(TERMINATOR not in message)  # the listener never passes one on
    out = _stream(message, [])
    assert out == b"Subject: x\r\n\r\n" + normalize_wire(data)


def test_bare_cr_in_a_header_never_starts_a_header_line() -> None:
    out = _stream(b"Subject: hi\rX-Evil: 1\r\nTo: a@b.c\n\r\nbody\rline\r\n", [5, 17])
    assert out == b"Subject: hi X-Evil: 1\r\nTo: a@b.c\r\n\r\nbody\r\nline\r\n"
