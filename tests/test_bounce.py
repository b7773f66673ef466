from __future__ import annotations

import datetime
import email
import email.message
import email.policy
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyrelay import bounce
from pyrelay.bounce import FailedRecipient, build_bounce

ARRIVAL = datetime.datetime(2026, 11, 26, 22, 16, 50, tzinfo=datetime.UTC)
NOW = ARRIVAL + datetime.timedelta(days=5)
ORIGINAL = (
    b"Received: from app.local (unknown [172.18.0.5])\r\n"
    b"\tby relay.example (pyrelay) with ESMTP id 4F2A9C1B0E\r\n"
    b"From: app@example.com\r\n"
    b"To: x@y.example\r\n"
    b"Subject: Welcome\r\n"
    b"\r\n"
)
UNKNOWN = FailedRecipient(
    address="x@y.example",
    status="5.1.1",
    diagnostic="550 5.1.1 <x@y.example>: Recipient address rejected: User unknown",
    remote_mta="smtp.sendgrid.net",
)
EXPIRED = FailedRecipient(
    address="z@slow.example",
    status="4.4.7",
    diagnostic="delivery time expired: connection timed out",
    remote_mta=None,
)


def make(
    recipients: list[FailedRecipient] | None = None,
    original: bytes = ORIGINAL,
    sender: str = "app@example.com",
) -> bytes:
    return build_bounce(
        hostname="relay.example",
        queue_id="4F2A9C1B0E",
        bounce_queue_id="5B3C0D2E1F",
        sender=sender,
        recipients=[UNKNOWN, EXPIRED] if recipients is None else recipients,
        original_headers=original,
        arrival=ARRIVAL,
        now=NOW,
    )


def parse(raw: bytes) -> email.message.EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    return msg


def status_blocks(part: email.message.EmailMessage) -> list[email.message.Message]:
    blocks = part.get_payload()
    assert isinstance(blocks, list)
    return [b for b in blocks if isinstance(b, email.message.Message)]


def check_structure(raw: bytes) -> list[email.message.EmailMessage]:
    assert b"\r\n" in raw and raw.endswith(b"--\r\n")
    # Only CRLF line endings, every line within the SMTP limit.
    assert re.search(rb"[^\r]\n|\r[^\n]", raw) is None
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))
    msg = parse(raw)
    assert not msg.defects
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    return parts  # type: ignore[return-value]


def test_top_level_headers() -> None:
    raw = make()
    assert raw.startswith(b"From: MAILER-DAEMON@relay.example (Mail Delivery System)\r\n")
    msg = parse(raw)
    assert msg["From"].addresses[0].addr_spec == "MAILER-DAEMON@relay.example"
    assert msg["To"] == "app@example.com"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["Message-ID"] == "<5B3C0D2E1F@relay.example>"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["MIME-Version"] == "1.0"
    assert msg["Date"].datetime == NOW


def test_structure_and_text_part() -> None:
    parts = check_structure(make())
    text = parts[0].get_content()
    assert "This is the mail system at host relay.example." in text
    assert "I'm sorry to have to inform you that your message could not" in text
    assert "<x@y.example>: host smtp.sendgrid.net said: 550 5.1.1" in text
    assert "<z@slow.example>: delivery time expired: connection timed out" in text


def test_delivery_status_fields() -> None:
    raw = make()
    parts = check_structure(raw)
    blocks = status_blocks(parts[1])
    assert len(blocks) == 3
    per_message, first, second = blocks
    assert per_message["Reporting-MTA"] == "dns; relay.example"
    assert per_message["X-Pyrelay-Queue-ID"] == "4F2A9C1B0E"
    assert per_message["Arrival-Date"] == "Thu, 26 Nov 2026 22:16:50 +0000"
    assert first["Final-Recipient"] == "rfc822; x@y.example"
    assert first["Original-Recipient"] == "rfc822; x@y.example"
    assert first["Action"] == "failed"
    assert first["Status"] == "5.1.1"
    assert first["Remote-MTA"] == "dns; smtp.sendgrid.net"
    assert first["Diagnostic-Code"] == (
        "smtp; 550 5.1.1 <x@y.example>: Recipient address rejected: User unknown"
    )
    assert second["Status"] == "4.4.7"
    assert second["Remote-MTA"] is None
    assert second["Diagnostic-Code"] == "smtp; delivery time expired: connection timed out"


def test_empty_diagnostic_omitted() -> None:
    rcpt = FailedRecipient("a@b.example", "5.0.0", "", None)
    parts = check_structure(make([rcpt]))
    block = status_blocks(parts[1])[1]
    assert block["Diagnostic-Code"] is None
    assert "<a@b.example>: delivery failed (status 5.0.0)" in parts[0].get_content()


def test_invalid_status_falls_back() -> None:
    rcpt = FailedRecipient("a@b.example", "550\r\nX: y", "x", None)
    parts = check_structure(make([rcpt]))
    assert status_blocks(parts[1])[1]["Status"] == "5.0.0"


def test_original_headers_part() -> None:
    parts = check_structure(make())
    payload = parts[2].get_payload(decode=True)
    assert isinstance(payload, bytes)
    assert payload.replace(b"\r\n", b"\n") == ORIGINAL[:-2].replace(b"\r\n", b"\n")


def test_original_body_never_included() -> None:
    raw = make(original=b"Subject: x\r\n\r\nSECRET BODY\r\n")
    assert b"SECRET BODY" not in raw
    check_structure(raw)


def test_hostile_diagnostic() -> None:
    hostile = (
        "550 nope\r\n\r\n--=_pyrelay_0\r\nContent-Type: text/html\r\n\r\n<script>"
        "\nX-Injected: 1\rBcc: victim@example.com\x00\x1b[31m" + "A" * 5000 + " tail"
    )
    rcpt = FailedRecipient("x@y.example", "5.7.1", hostile, "mx\r\nX-Evil: 1")
    raw = make([rcpt])
    parts = check_structure(raw)
    block = status_blocks(parts[1])[1]
    assert "\n" not in block["Diagnostic-Code"]
    assert block["Diagnostic-Code"].startswith("smtp; 550 nope --=_pyrelay_0 Content-Type:")
    assert block["Remote-MTA"] == "dns; mxX-Evil:1"
    assert b"\x00" not in raw and b"\x1b" not in raw
    assert not any(line.startswith(b"X-Injected") for line in raw.split(b"\r\n"))
    assert not any(line.startswith(b"Bcc:") for line in raw.split(b"\r\n"))


def test_hostile_original_headers() -> None:
    original = (
        b"Subject: x\nX-Bare-LF: y\rX-Bare-CR: z\r\n"
        b"X-Long: " + b"B" * 3000 + b"\r\n"
        b"X-Null: a\x00b\r\n"
        b"X-Bin: \xff\xfe\r\n"
    )
    raw = make(original=original)
    parts = check_structure(raw)
    payload = parts[2].get_payload(decode=True)
    assert isinstance(payload, bytes)
    assert b"X-Bare-LF: y\r\nX-Bare-CR: z\r\n" in payload
    assert b"\x00" not in payload
    assert b"B" * 800 in payload


def test_boundary_regenerated_on_collision(monkeypatch: pytest.MonkeyPatch) -> None:
    candidates = iter(["=_pyrelay_clash", "=_pyrelay_clash", "=_pyrelay_fresh"])
    monkeypatch.setattr(bounce, "_new_boundary", lambda: next(candidates))
    raw = make(original=b"Subject: --=_PYRELAY_CLASH\r\n")
    assert b'boundary="=_pyrelay_fresh"' in raw
    check_structure(raw)


def test_non_ascii_recipient_and_sender() -> None:
    rcpt = FailedRecipient("jörg@bücher.example", "5.1.1", "550 unknown user", None)
    raw = make([rcpt], original="Subject: Grüße\r\n".encode(), sender="ädmin@example.com")
    parts = check_structure(raw)
    assert parts[0].get_content_charset() == "utf-8"
    assert "<jörg@bücher.example>: 550 unknown user" in parts[0].get_content()
    block = status_blocks(parts[1])[1]
    assert block["Final-Recipient"] == "utf-8; j\\x{F6}rg@b\\x{FC}cher.example"
    assert b"Content-Transfer-Encoding: 8bit" in raw
    assert "To: ädmin@example.com\r\n".encode() in raw


def test_ascii_report_is_seven_bit() -> None:
    raw = make()
    assert raw.isascii()
    assert b"Content-Transfer-Encoding" not in raw


def test_null_sender_and_no_recipients_rejected() -> None:
    with pytest.raises(ValueError, match="null envelope sender"):
        make(sender="")
    with pytest.raises(ValueError, match="at least one"):
        make(recipients=[])


@given(
    diagnostic=st.text(max_size=3000),
    address=st.text(min_size=1, max_size=300),
    remote=st.none() | st.text(max_size=300),
    original=st.binary(max_size=2000),
)
@settings(max_examples=60, deadline=None)
def test_random_input_keeps_structure(
    diagnostic: str, address: str, remote: str | None, original: bytes
) -> None:
    rcpt = FailedRecipient(address, "5.1.1", diagnostic, remote)
    check_structure(make([rcpt, EXPIRED], original=original))
