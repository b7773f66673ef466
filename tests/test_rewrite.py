from __future__ import annotations

import datetime
import email.utils

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyrelay.config import normalize_domain
from pyrelay.rewrite import (
    MASQUERADE_HEADERS,
    Rewritten,
    build_received,
    masquerade_address,
    rewrite_message,
)

NOW = datetime.datetime(2026, 11, 26, 22, 16, 50, tzinfo=datetime.UTC)
DATE = email.utils.format_datetime(NOW).encode()
RECEIVED = b"Received: from app.local (unknown [172.18.0.5])\r\n\tby relay.example; x\r\n"
MSGID = b"Message-ID: <20261126221650.Q1@relay.example>\r\n"
DATE_FIELD = b"Date: " + DATE + b"\r\n"
DOMAINS = ("example.com",)
FIXED = b"Message-ID: <m@x>\r\nDate: Thu, 1 Jan 2026 00:00:00 +0000\r\n"


def rewrite(message: bytes, domains: tuple[str, ...] = DOMAINS) -> Rewritten:
    return rewrite_message(
        message,
        masquerade_domains=domains,
        received=RECEIVED,
        hostname="relay.example",
        queue_id="Q1",
        now=NOW,
    )


def relayed(message: bytes, domains: tuple[str, ...] = DOMAINS) -> bytes:
    result = rewrite(message, domains)
    return result.headers + message[result.body_start :]


def header_of(message: bytes, domains: tuple[str, ...] = DOMAINS) -> bytes:
    """Rewrite one header field (plus fixed Message-ID/Date) and return it rewritten."""
    out = relayed(FIXED + message + b"\r\nbody\r\n", domains)
    assert out.startswith(RECEIVED + FIXED)
    assert out.endswith(b"\r\n\r\nbody\r\n")
    return out[len(RECEIVED + FIXED) : -len(b"\r\n\r\nbody\r\n")]


# ---------------------------------------------------------------------------------------------
# masquerade_address
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("u@mail.example.com", "u@example.com"),
        ("u@a.b.example.com", "u@example.com"),
        ("u@example.com", "u@example.com"),
        ("u@evil-example.com", "u@evil-example.com"),
        ("u@example.com.evil.net", "u@example.com.evil.net"),
        ("u@mail.EXAMPLE.Com", "u@example.com"),
        ("U.Ser+Tag@MAIL.example.com", "U.Ser+Tag@example.com"),
        ('"a@b"@mail.example.com', '"a@b"@example.com'),
        ("", ""),
        ("nodomain", "nodomain"),
        ("u@", "u@"),
        ("u@[192.0.2.1]", "u@[192.0.2.1]"),
    ],
)
def test_masquerade_address(address: str, expected: str) -> None:
    assert masquerade_address(address, DOMAINS) == expected


def test_masquerade_exclusion_first_match_wins() -> None:
    domains = ("!sub.example.com", "example.com")
    assert masquerade_address("u@host.sub.example.com", domains) == "u@host.sub.example.com"
    assert masquerade_address("u@sub.example.com", domains) == "u@sub.example.com"
    assert masquerade_address("u@a.example.com", domains) == "u@example.com"
    # Exclusion after the match is never reached.
    assert masquerade_address("u@h.sub.example.com", ("example.com", "!sub.example.com")) == (
        "u@example.com"
    )


def test_masquerade_exact_match_stops_search() -> None:
    domains = ("a.example.com", "example.com")
    assert masquerade_address("u@a.example.com", domains) == "u@a.example.com"
    assert masquerade_address("u@x.a.example.com", domains) == "u@a.example.com"


def test_masquerade_unicode_domain_matches_punycode_entry() -> None:
    domains = (normalize_domain("bücher.example"),)  # as Settings stores MASQUERADED_DOMAINS
    assert masquerade_address("jörg@mail.bücher.example", domains) == ("jörg@xn--bcher-kva.example")
    assert masquerade_address("u@mail.bucher.example", domains) == "u@mail.bucher.example"


def test_masquerade_undecodable_domain_does_not_raise() -> None:
    assert masquerade_address("u@\udcff.com", DOMAINS) == "u@\udcff.com"


def test_masquerade_headers_constant() -> None:
    assert MASQUERADE_HEADERS == frozenset(
        "from sender reply-to resent-from resent-sender to cc resent-to resent-cc".split()
    )


# ---------------------------------------------------------------------------------------------
# rewrite_message: header masquerading
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        (b"From: u@mail.example.com", b"From: u@example.com"),
        (b"To: u@evil-example.com", b"To: u@evil-example.com"),
        (b"To: u@example.com.evil.net", b"To: u@example.com.evil.net"),
        (b"Cc: U@MAIL.EXAMPLE.COM", b"Cc: U@example.com"),
        (b"from: u@a.example.com", b"from: u@example.com"),
        (b"FROM : u@a.example.com", b"FROM : u@example.com"),
        (b"Reply-To: <u@a.example.com>", b"Reply-To: <u@example.com>"),
        (b"Sender: u@a.example.com", b"Sender: u@example.com"),
        (b"Resent-From: u@a.example.com", b"Resent-From: u@example.com"),
        (b"Resent-Sender: u@a.example.com", b"Resent-Sender: u@example.com"),
        (b"Resent-To: u@a.example.com", b"Resent-To: u@example.com"),
        (b"Resent-Cc: u@a.example.com", b"Resent-Cc: u@example.com"),
        # Quoted display names may contain '@', ',' and '<'; they are never touched.
        (
            b'From: "x@a.example.com, <y" <u@a.example.com>',
            b'From: "x@a.example.com, <y" <u@example.com>',
        ),
        (
            b'From: "Doe, John \\"JD\\"" <u@a.example.com>',
            b'From: "Doe, John \\"JD\\"" <u@example.com>',
        ),
        # Comments (nested) survive byte-for-byte.
        (
            b"From: u@a.example.com (Jo (x@a.example.com) Doe)",
            b"From: u@example.com (Jo (x@a.example.com) Doe)",
        ),
        (b"From: (c)u(d)@a.example.com", b"From: (c)u(d)@example.com"),
        # Groups.
        (
            b"To: Undisclosed: a@x.example.com, Bob <b@y.example.com>;",
            b"To: Undisclosed: a@example.com, Bob <b@example.com>;",
        ),
        (b"To: undisclosed-recipients:;", b"To: undisclosed-recipients:;"),
        (b"To: list:, u@a.example.com", b"To: list:, u@example.com"),
        # RFC 2047 encoded words, including sloppy Q-encoding with specials.
        (
            b"From: =?UTF-8?Q?J=C3=B6rg_M._<x@a.example.com>?= <j@a.example.com>",
            b"From: =?UTF-8?Q?J=C3=B6rg_M._<x@a.example.com>?= <j@example.com>",
        ),
        (
            b"From: =?utf-8?B?SsO2cmc=?= <j@a.example.com>",
            b"From: =?utf-8?B?SsO2cmc=?= <j@example.com>",
        ),
        # Spacing is preserved.
        (b"To:   a@b.example.com ,c@d.example.com  ", b"To:   a@example.com ,c@example.com  "),
        # 8-bit (SMTPUTF8) display name and local part.
        (
            "From: Jörg <jörg@a.example.com>".encode(),
            "From: Jörg <jörg@example.com>".encode(),
        ),
        # obs-route: only the final address is masqueraded.
        (b"To: <@a.example.com,@b.example.com:u@c.example.com>", None),
        # Null address and bare local part.
        (b"From: <>", b"From: <>"),
        (b"To: postmaster, u@a.example.com", b"To: postmaster, u@example.com"),
        # Not an address header.
        (b"Subject: u@a.example.com", b"Subject: u@a.example.com"),
        (b"X-Original-To: u@a.example.com", b"X-Original-To: u@a.example.com"),
        (b"Return-Path: <u@a.example.com>", b"Return-Path: <u@a.example.com>"),
        # Domain literal.
        (b"To: u@[192.0.2.1]", b"To: u@[192.0.2.1]"),
    ],
)
def test_masquerade_fields(field: bytes, expected: bytes | None) -> None:
    if expected is None:
        expected = field.replace(b"u@c.example.com", b"u@example.com")
    assert header_of(field) == expected


@pytest.mark.parametrize(
    "field",
    [
        b"To: John Smith u@a.example.com",  # words without dots: not an address
        b'To: "unterminated <u@a.example.com>',
        b"To: (unterminated <u@a.example.com>",
        b"To: <u@a.example.com",
        b"To: a <b <u@a.example.com>>",
        b"To: g1: g2: u@a.example.com;;",
        b"To: u@a.example.com; v@a.example.com",
        b"To: u@a .example.com",  # CFWS inside a domain
        b"To: u@a.example.com.",
        b"To: u@@a.example.com",
        b"To: DOMAIN\\u <u@a.example.com>",
        b"To: <u@a.example.com> trailing",
        b"To: u@a.example.com)",
    ],
)
def test_unparsable_fields_are_untouched(field: bytes) -> None:
    assert header_of(field) == field


def test_folded_to_is_masqueraded_and_folding_preserved() -> None:
    field = (
        b"To: Alice <alice@mail.example.com>,\r\n"
        b'\t"Bob, B." <bob@other.org>,\r\n'
        b"    carol@x.y.example.com (Carol)"
    )
    assert header_of(field) == (
        b"To: Alice <alice@example.com>,\r\n"
        b'\t"Bob, B." <bob@other.org>,\r\n'
        b"    carol@example.com (Carol)"
    )


def test_exclusions_in_headers() -> None:
    domains = ("!sub.example.com", "example.com")
    field = b"To: a@host.sub.example.com, b@a.example.com, c@sub.example.com"
    assert header_of(field, domains) == (
        b"To: a@host.sub.example.com, b@example.com, c@sub.example.com"
    )


def test_unchanged_headers_byte_identical_and_only_changed_field_reemitted() -> None:
    message = (
        b"Subject: =?utf-8?q?hello?= \xff\xfe raw\r\n"
        b"From: u@a.example.com\r\n"
        b"X-Weird:no-space\r\n"
        b"To: other@elsewhere.org,\r\n  more@elsewhere.org\r\n"
        b"Date: Thu, 1 Jan 2026 00:00:00 +0000\r\n"
        b"Message-ID: <m@x>\r\n"
        b"\r\n"
        b"body\r\n"
    )
    assert relayed(message) == RECEIVED + message.replace(b"u@a.example.com", b"u@example.com")


def test_body_never_rewritten() -> None:
    body = b"From: x@a.example.com\r\nTo: y@a.example.com\r\n\r\nMessage-ID: <z>\r\n" * 3
    message = FIXED + b"From: u@a.example.com\r\n\r\n" + body
    result = rewrite(message)
    assert message[result.body_start :] == body
    assert result.headers == RECEIVED + FIXED + b"From: u@example.com\r\n\r\n"


def test_empty_masquerade_list_changes_nothing() -> None:
    message = b"From: u@a.example.com\r\n" + FIXED + b"\r\nbody"
    assert relayed(message, ()) == RECEIVED + message


# ---------------------------------------------------------------------------------------------
# rewrite_message: Received, Message-ID, Date, structure
# ---------------------------------------------------------------------------------------------


def test_adds_message_id_and_date_before_blank_line() -> None:
    message = b"Subject: hi\r\n\r\nbody\r\n"
    result = rewrite(message)
    assert result.headers == RECEIVED + b"Subject: hi\r\n" + MSGID + DATE_FIELD + b"\r\n"
    assert result.body_start == message.index(b"body")


@pytest.mark.parametrize("name", [b"Message-ID", b"message-id", b"MESSAGE-ID"])
def test_existing_message_id_kept(name: bytes) -> None:
    message = name + b": <a@b>\r\nSubject: x\r\n\r\n"
    assert rewrite(message).headers == RECEIVED + message[:-2] + DATE_FIELD + b"\r\n"


@pytest.mark.parametrize("name", [b"Date", b"date", b"DATE"])
def test_existing_date_kept(name: bytes) -> None:
    message = name + b": Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\n"
    assert rewrite(message).headers == RECEIVED + message[:-2] + MSGID + b"\r\n"


def test_resent_fields_do_not_count() -> None:
    message = b"Resent-Message-ID: <a@b>\r\nResent-Date: x\r\n\r\n"
    assert rewrite(message).headers == RECEIVED + message[:-2] + MSGID + DATE_FIELD + b"\r\n"


def test_naive_date_formatting() -> None:
    naive = datetime.datetime(2026, 1, 2, 3, 4, 5)
    result = rewrite_message(
        b"\r\n",
        masquerade_domains=(),
        received=b"",
        hostname="h",
        queue_id="q",
        now=naive,
    )
    assert result.headers.startswith(b"Message-ID: <20260102030405.q@h>\r\nDate: Fri, 02 Jan")


def test_no_separator_all_headers() -> None:
    message = b"From: u@a.example.com\r\nSubject: x\r\n"
    result = rewrite(message)
    assert result.body_start == len(message)
    assert result.headers == (
        RECEIVED + b"From: u@example.com\r\nSubject: x\r\n" + MSGID + DATE_FIELD
    )


def test_no_separator_unterminated_last_line() -> None:
    message = b"Subject: x"
    result = rewrite(message)
    assert result.body_start == len(message)
    assert result.headers == RECEIVED + b"Subject: x\r\n" + MSGID + DATE_FIELD


def test_no_separator_nothing_added_keeps_bytes() -> None:
    message = FIXED + b"Subject: x"
    assert relayed(message) == RECEIVED + message


@pytest.mark.parametrize(
    "message",
    [b"Hello, this is body text\r\nmore\r\n", b" leading space: x\r\n\r\n", b"", b"x"],
)
def test_no_headers_at_all(message: bytes) -> None:
    result = rewrite(message)
    assert result.body_start == 0
    assert result.headers == RECEIVED + MSGID + DATE_FIELD + b"\r\n"


def test_message_starting_with_blank_line() -> None:
    message = b"\r\nFrom: x@a.example.com\r\n"
    result = rewrite(message)
    assert result.headers == RECEIVED + MSGID + DATE_FIELD + b"\r\n"
    assert message[result.body_start :] == b"From: x@a.example.com\r\n"


def test_non_header_line_ends_header_block() -> None:
    message = b"Subject: x\r\nFrom u@a.example.com  Thu Nov 26\r\nFrom: a@b.example.com\r\n\r\n"
    result = rewrite(message)
    assert result.headers == RECEIVED + b"Subject: x\r\n" + MSGID + DATE_FIELD + b"\r\n"
    assert message[result.body_start :] == message[len(b"Subject: x\r\n") :]


def test_large_body_is_not_copied() -> None:
    body = (b"From: x@a.example.com\r\n" + b"y" * 998 + b"\r\n") * 100
    message = FIXED + b"To: u@a.example.com\r\n\r\n" + body
    result = rewrite(message)
    assert result.body_start == len(message) - len(body)
    assert len(result.headers) < 300


# ---------------------------------------------------------------------------------------------
# build_received
# ---------------------------------------------------------------------------------------------


def received(**overrides: object) -> bytes:
    args: dict[str, object] = {
        "helo": "app.local",
        "client_ip": "172.18.0.5",
        "hostname": "relay.example",
        "queue_id": "4F2A9C1B0E",
        "recipient": "a@b.c",
        "protocol": "ESMTP",
        "now": NOW,
    }
    args.update(overrides)
    return build_received(**args)  # type: ignore[arg-type]


def test_received_format() -> None:
    assert received() == (
        b"Received: from app.local (unknown [172.18.0.5])\r\n"
        b"\tby relay.example (pyrelay) with ESMTP id 4F2A9C1B0E\r\n"
        b"\tfor <a@b.c>; Thu, 26 Nov 2026 22:16:50 +0000\r\n"
    )


def test_received_without_recipient() -> None:
    assert received(recipient=None, protocol="ESMTPS") == (
        b"Received: from app.local (unknown [172.18.0.5])\r\n"
        b"\tby relay.example (pyrelay) with ESMTPS id 4F2A9C1B0E;\r\n"
        b"\tThu, 26 Nov 2026 22:16:50 +0000\r\n"
    )


def test_received_ipv6() -> None:
    assert b"(unknown [IPv6:2001:db8::1])" in received(client_ip="2001:db8::1")


@pytest.mark.parametrize(
    "helo",
    ["evil\r\nX-Injected: yes", "evil\nX-Injected: yes", "evil\rX-Injected: yes", "a\x00\x7f\x1b"],
)
def test_received_helo_cannot_inject(helo: str) -> None:
    out = received(helo=helo, recipient="x\r\nBcc: y@z")
    assert out.count(b"\r\n") == 3
    assert b"\n\t" in out and out.count(b"\n") == 3 and out.count(b"\r") == 3
    for line in out.split(b"\r\n")[1:-1]:
        assert line.startswith(b"\t")
    assert all(b >= 0x20 or b in b"\t\r\n" for b in out)


def test_received_helo_capped_and_non_ascii() -> None:
    out = received(helo="h" * 1000)
    assert b"from " + b"h" * 255 + b" (" in out
    assert b"from b?cher.example " in received(helo="bücher.example")
    assert "from bücher.example ".encode() in received(helo="bücher.example", protocol="UTF8SMTP")
    assert b"from unknown (" in received(helo="\r\n")
    assert b"from h (" in received(helo="h\udcff")


@given(helo=st.text(max_size=300), rcpt=st.text(max_size=600))
@settings(max_examples=100)
def test_received_property_single_field(helo: str, rcpt: str) -> None:
    for protocol in ("ESMTP", "UTF8SMTPS"):
        out = received(helo=helo, recipient=rcpt, protocol=protocol)
        lines = out.split(b"\r\n")
        assert lines[-1] == b"" and len(lines) == 4
        assert lines[0].startswith(b"Received: from ")
        assert all(line.startswith(b"\t") for line in lines[1:3])
        assert b"\r" not in b"".join(lines) and b"\n" not in b"".join(lines)
        assert all(len(line) <= 998 for line in lines)


# ---------------------------------------------------------------------------------------------
# Property-based tests
# ---------------------------------------------------------------------------------------------

FRAGMENTS = [
    b"From: ",
    b"To: ",
    b"Cc:",
    b"Subject: ",
    b"\r\n",
    b"\r\n\r\n",
    b" ",
    b"\t",
    b"u@a.example.com",
    b"@",
    b".",
    b"<",
    b">",
    b'"',
    b"(",
    b")",
    b",",
    b";",
    b":",
    b"\\",
    b"[",
    b"]",
    b"\xff",
    "é".encode(),
    b"=?utf-8?q?x?=",
    b"\r",
    b"\n",
    b"example.com",
]

raw_messages = st.lists(st.sampled_from(FRAGMENTS) | st.binary(max_size=6), max_size=40).map(
    b"".join
)


@given(raw_messages)
@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
def test_random_bytes_never_raise(message: bytes) -> None:
    for domains in ((), ("!sub.example.com", "example.com")):
        result = rewrite(message, domains)
        assert 0 <= result.body_start <= len(message)
        assert result.headers.startswith(RECEIVED)
        sep = message.find(b"\r\n\r\n")
        head = message[: result.body_start]
        if message.startswith(b"\r\n"):
            assert result.body_start == 2
            head = b""
        elif sep >= 0 and result.body_start > sep:
            # The body after the first blank line is relayed as-is.
            assert result.body_start == sep + 4
            head = head[:-2]
        if not domains:
            # Without masquerading every original header byte is kept, in order.
            assert result.headers[len(RECEIVED) :].startswith(head)


LOCAL_PARTS = [b"u", b"first.last", b'"a@b, <c>"', b"j\xc3\xb6rg", b"x+tag"]
# (domain as written, domain after masquerading with MIXED_DOMAINS)
ADDR_DOMAINS = [
    (b"example.com", b"example.com"),
    (b"a.example.com", b"example.com"),
    (b"A.Example.COM", b"example.com"),
    (b"x.y.example.com", b"example.com"),
    (b"evil-example.com", b"evil-example.com"),
    (b"example.com.evil.net", b"example.com.evil.net"),
    (b"sub.example.com", b"sub.example.com"),
    (b"h.sub.example.com", b"h.sub.example.com"),
    (b"other.org", b"other.org"),
    (b"m.other.org", b"other.org"),
]
MIXED_DOMAINS = ("!sub.example.com", "example.com", "other.org")
DISPLAY = [
    b"",
    b"Bob ",
    b'"Doe, J. <j@a.example.com>" ',
    b"=?utf-8?q?J=C3=B6rg?= ",
    b"(c@a.example.com) ",
    b"J\xc3\xb6rg ",
]


@st.composite
def address_pair(draw: st.DrawFn) -> tuple[bytes, bytes]:
    local = draw(st.sampled_from(LOCAL_PARTS))
    written, masqueraded = draw(st.sampled_from(ADDR_DOMAINS))
    display = draw(st.sampled_from(DISPLAY))
    comment = draw(st.sampled_from([b"", b" (x@a.example.com)", b" (n (e) st)"]))
    if display or draw(st.booleans()):
        template = display + b"<%s@%s>" + comment
    else:
        template = b"%s@%s" + comment
    return template % (local, written), template % (local, masqueraded)


@st.composite
def field_pair(draw: st.DrawFn) -> tuple[bytes, bytes]:
    name = draw(st.sampled_from([b"From", b"to", b"CC", b"Reply-To", b"Subject", b"X-List"]))
    addresses = draw(st.lists(address_pair(), min_size=1, max_size=4))
    sep = draw(st.sampled_from([b", ", b",\r\n\t", b" ,\r\n  "]))
    original = sep.join(a for a, _ in addresses)
    expected = sep.join(b for _, b in addresses)
    if draw(st.booleans()):
        group = draw(st.sampled_from([b"Undisclosed: ", b'"a:b" :']))
        original, expected = group + original + b";", group + expected + b";"
    if name.lower() not in {b"from", b"to", b"cc", b"reply-to"}:
        expected = original
    return name + b": " + original + b"\r\n", name + b": " + expected + b"\r\n"


@given(
    fields=st.lists(field_pair(), max_size=6),
    body=st.binary(max_size=200),
    extra=st.sampled_from([b"", b"Date: x\r\n", b"Message-ID: <y>\r\n", FIXED]),
)
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_structured_headers(fields: list[tuple[bytes, bytes]], body: bytes, extra: bytes) -> None:
    original_headers = b"".join(f for f, _ in fields) + extra
    expected_headers = b"".join(e for _, e in fields) + extra
    added = b""
    if b"Message-ID" not in extra:
        added += MSGID
    if b"Date" not in extra:
        added += DATE_FIELD
    message = original_headers + b"\r\n" + body
    if not original_headers:
        expected = RECEIVED + added + b"\r\n" + message[2:]
    else:
        expected = RECEIVED + expected_headers + added + b"\r\n" + body

    result = rewrite(message, MIXED_DOMAINS)
    assert result.headers + message[result.body_start :] == expected
    assert message[result.body_start :] == (body if original_headers else message[2:])

    # With an empty list the output is the original plus Received and the missing fields.
    plain = rewrite(message, ())
    if original_headers:
        assert plain.headers == RECEIVED + original_headers + added + b"\r\n"

    # Masquerading is idempotent: a second pass changes nothing but the trace header.
    once = result.headers + message[result.body_start :]
    assert relayed(once, MIXED_DOMAINS) == RECEIVED + once


@given(st.lists(st.sampled_from(LOCAL_PARTS)), st.sampled_from(ADDR_DOMAINS))
@settings(max_examples=50)
def test_masquerade_address_idempotent(locals_: list[bytes], domain: tuple[bytes, bytes]) -> None:
    for local in locals_:
        address = (local + b"@" + domain[0]).decode()
        once = masquerade_address(address, MIXED_DOMAINS)
        assert once == (local + b"@" + domain[1]).decode()
        assert masquerade_address(once, MIXED_DOMAINS) == once
