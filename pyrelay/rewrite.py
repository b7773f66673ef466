"""Header rewriting with Postfix cleanup(8) semantics.

``rewrite_message`` gets the header block of a message in wire form (CRLF line endings, as
``pyrelay.cleanup`` collects it from DATA: a header line never starts with a stuffed dot, since a
field name cannot begin with "."; anything else is relayed as it is).  Only the header block is
inspected; what follows it is handed back by offset so the caller can write it without a copy.
"""

from __future__ import annotations

import datetime
import email.utils
import re
from collections.abc import Sequence
from dataclasses import dataclass

from pyrelay.domains import try_ascii

__all__ = [
    "MASQUERADE_HEADERS",
    "Rewritten",
    "build_received",
    "masquerade_address",
    "rewrite_message",
]

# Postfix's masquerade_classes default (envelope_sender, header_sender, header_recipient).
MASQUERADE_HEADERS: frozenset[str] = frozenset(
    {
        "from",
        "sender",
        "reply-to",
        "resent-from",
        "resent-sender",
        "to",
        "cc",
        "resent-to",
        "resent-cc",
    }
)

_CRLF = b"\r\n"


# --------------------------------------------------------------------------------------------
# masquerade_domains
# --------------------------------------------------------------------------------------------


_ASCII_LOWER = {c: c + 32 for c in range(ord("A"), ord("Z") + 1)}


def _domain_key(domain: str) -> str:
    if domain.isascii():
        return domain.lower()
    # SMTPUTF8 peers may send U-labels; configured domains are A-labels (UTS-46).
    key = try_ascii(domain)
    if key is not None:
        return key
    # Undecodable or invalid IDN: compare only the ASCII letters case-insensitively so
    # that it can never spuriously equal a configured (pure ASCII) domain.
    return domain.translate(_ASCII_LOWER)


def _masquerade_domain(domain: str, domains: Sequence[str]) -> str | None:
    """Return the replacement domain, or None when the domain stays as it is."""
    key = _domain_key(domain)
    for raw_entry in domains:
        entry = raw_entry.lower()
        if entry.startswith("!"):
            excluded = entry[1:]
            if key == excluded or key.endswith("." + excluded):
                return None
            continue
        if key.endswith("." + entry):
            return entry
        if key == entry:
            return None
    return None


def masquerade_address(address: str, domains: Sequence[str]) -> str:
    """Apply Postfix ``masquerade_domains`` to one address; the local part is kept verbatim."""
    local, at, domain = address.rpartition("@")
    if not at or not domain:
        return address
    replacement = _masquerade_domain(domain, domains)
    if replacement is None:
        return address
    return f"{local}@{replacement}"


# --------------------------------------------------------------------------------------------
# RFC 5322 address tokenizer working on byte offsets
# --------------------------------------------------------------------------------------------


class _Unparsable(Exception):
    """Raised when a field cannot be understood; the field is then relayed untouched."""


_ATOM = "atom"
_QUOTED = "qs"
_LITERAL = "dlit"

# A token is (kind, start, end); specials use the special character itself as kind.
_Token = tuple[str, int, int]

_ATOM_RE = re.compile(rb'[^ \t\r\n()<>\[\]:;@\\,."]+')
# Sloppy encoders put specials into Q-encoded words; keep such a word as one token.
_ENCODED_WORD_RE = re.compile(rb"=\?[^?\s]+\?[A-Za-z]\?[^?\s]*\?=")
_WHITESPACE = frozenset(b" \t\r\n")
_SIMPLE_SPECIALS = {c: chr(c) for c in b"<>:;@,."}
_STRAY = frozenset(b")]\\")


def _scan_delimited(buf: bytes, pos: int, end: int, close: int) -> int:
    i = pos + 1
    while i < end:
        c = buf[i]
        if c == 0x5C:  # backslash quotes the next byte
            i += 2
        elif c == close:
            return i + 1
        else:
            i += 1
    raise _Unparsable


def _skip_comment(buf: bytes, pos: int, end: int) -> int:
    depth = 0
    i = pos
    while i < end:
        c = buf[i]
        if c == 0x5C:
            i += 2
            continue
        if c == 0x28:
            depth += 1
        elif c == 0x29:
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    raise _Unparsable


# Postfix cleanup's header_address_token_limit: a field with more tokens is relayed as it is,
# not rewritten (it bounds the work one header can cause).
TOKEN_LIMIT = 10240


def _tokenize(buf: bytes, start: int, end: int) -> list[_Token]:
    tokens: list[_Token] = []
    i = start
    while i < end:
        if len(tokens) > TOKEN_LIMIT:
            raise _Unparsable
        c = buf[i]
        if c in _WHITESPACE:
            i += 1
        elif c == 0x28:
            i = _skip_comment(buf, i, end)
        elif c == 0x22:
            j = _scan_delimited(buf, i, end, 0x22)
            tokens.append((_QUOTED, i, j))
            i = j
        elif c == 0x5B:
            j = _scan_delimited(buf, i, end, 0x5D)
            tokens.append((_LITERAL, i, j))
            i = j
        elif c in _SIMPLE_SPECIALS:
            tokens.append((_SIMPLE_SPECIALS[c], i, i + 1))
            i += 1
        elif c in _STRAY:
            raise _Unparsable
        else:
            m = _ENCODED_WORD_RE.match(buf, i, end) or _ATOM_RE.match(buf, i, end)
            if m is None:  # pragma: no cover - the atom class covers every remaining byte
                raise _Unparsable
            tokens.append((_ATOM, i, m.end()))
            i = m.end()
    return tokens


_WORDS = frozenset({_ATOM, _QUOTED})
_PHRASE = frozenset({_ATOM, _QUOTED, "."})


def _check_phrase(tokens: Sequence[_Token]) -> None:
    for kind, _, _ in tokens:
        if kind not in _PHRASE:
            raise _Unparsable


def _addr_spec_domain(tokens: Sequence[_Token]) -> tuple[int, int] | None:
    """Return the byte span of the domain of an addr-spec, or None for a bare local part."""
    ats = [n for n, tok in enumerate(tokens) if tok[0] == "@"]
    if not ats:
        _check_phrase(tokens)
        return None
    if len(ats) != 1:
        raise _Unparsable
    local, domain = tokens[: ats[0]], tokens[ats[0] + 1 :]
    if not local or not domain:
        raise _Unparsable
    previous_word = False
    for kind, _, _ in local:
        # Leading, trailing and doubled dots occur in the wild (obs-local-part); two words
        # without a dot between them mean we are not looking at an address.
        is_word = kind in _WORDS
        if (is_word and previous_word) or kind not in _PHRASE:
            raise _Unparsable
        previous_word = is_word
    if len(domain) == 1 and domain[0][0] == _LITERAL:
        return None  # address literals are never masqueraded
    for n, (kind, start, _) in enumerate(domain):
        if kind != (_ATOM if n % 2 == 0 else "."):
            raise _Unparsable
        # CFWS inside the domain would be clobbered by a span replacement.
        if n and domain[n - 1][2] != start:
            raise _Unparsable
    if domain[-1][0] != _ATOM:
        raise _Unparsable
    return domain[0][1], domain[-1][2]


def _mailbox_domain(item: Sequence[_Token]) -> tuple[int, int] | None:
    angles = [n for n, tok in enumerate(item) if tok[0] == "<"]
    if not angles:
        return _addr_spec_domain(item)
    open_at = angles[0]
    if len(angles) != 1 or item[-1][0] != ">":
        raise _Unparsable
    _check_phrase(item[:open_at])
    inner = item[open_at + 1 : -1]
    if not inner:
        return None  # <> null address
    routes = [n for n, tok in enumerate(inner) if tok[0] == ":"]
    if routes:
        inner = inner[routes[-1] + 1 :]  # obs-route: only the final addr-spec is an address
    return _addr_spec_domain(inner)


def _address_domains(buf: bytes, start: int, end: int) -> list[tuple[int, int]]:
    """Byte spans of every addr-spec domain in an address-list field value."""
    items: list[list[_Token]] = []
    current: list[_Token] = []
    in_group = False
    in_angle = False
    for token in _tokenize(buf, start, end):
        kind = token[0]
        if in_angle:
            if kind == "<":
                raise _Unparsable
            current.append(token)
            in_angle = kind != ">"
        elif kind == "<":
            in_angle = True
            current.append(token)
        elif kind == ",":
            items.append(current)
            current = []
        elif kind == ":":
            if in_group:
                raise _Unparsable
            _check_phrase(current)
            current = []
            in_group = True
        elif kind == ";":
            if not in_group:
                raise _Unparsable
            items.append(current)
            current = []
            in_group = False
        else:
            current.append(token)
    if in_angle:
        raise _Unparsable
    # A group missing its closing ';' is common enough ("undisclosed-recipients:") to accept.
    items.append(current)
    spans: list[tuple[int, int]] = []
    for item in items:
        if item:
            span = _mailbox_domain(item)
            if span is not None:
                spans.append(span)
    return spans


def _masquerade_field(
    buf: bytes, value_start: int, end: int, domains: Sequence[str]
) -> list[bytes] | None:
    """Return the rewritten field as chunks, or None when nothing changes."""
    try:
        spans = _address_domains(buf, value_start, end)
    except _Unparsable:
        return None
    chunks: list[bytes] = []
    cursor = -1
    for dom_start, dom_end in spans:
        domain = buf[dom_start:dom_end].decode("utf-8", "surrogateescape")
        replacement = _masquerade_domain(domain, domains)
        if replacement is None:
            continue
        if cursor < 0:
            cursor = value_start
        chunks.append(buf[cursor:dom_start])
        chunks.append(replacement.encode("ascii"))
        cursor = dom_end
    if cursor < 0:
        return None
    chunks.append(buf[cursor:end])
    return chunks


# --------------------------------------------------------------------------------------------
# Message rewriting
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rewritten:
    """The relayed message is ``headers + original[body_start:]``; ``hops`` counts the
    ``Received:`` fields the message arrived with (Postfix ``hopcount_limit``)."""

    headers: bytes
    body_start: int
    hops: int = 0


# Field name: printable ASCII except ':'; whitespace before the colon is obsolete but accepted,
# as Postfix does.
_FIELD_NAME_RE = re.compile(rb"([!-9;-~]+)[ \t]*:")


@dataclass(slots=True)
class _Field:
    name: str
    start: int
    value_start: int
    end: int


@dataclass(slots=True)
class _HeaderBlock:
    fields: list[_Field]
    end: int  # where the header lines end in the original
    body_start: int
    separator: bool  # a blank line must follow the header lines in the output


def _scan_headers(message: bytes) -> _HeaderBlock:
    if message.startswith(_CRLF):
        return _HeaderBlock([], 0, 2, True)
    sep = message.find(b"\r\n\r\n")
    if sep < 0:
        region_end = body_start = len(message)
        separator = False
    else:
        region_end = sep + 2
        body_start = sep + 4
        separator = True
    fields: list[_Field] = []
    pos = 0
    while pos < region_end:
        nl = message.find(_CRLF, pos, region_end)
        line_end = region_end if nl < 0 else nl + 2
        if message[pos] in b" \t":
            if not fields:
                break
            fields[-1].end = line_end
        else:
            m = _FIELD_NAME_RE.match(message, pos, line_end)
            if m is None:
                break
            fields.append(_Field(m.group(1).decode("ascii").lower(), pos, m.end(), line_end))
        pos = line_end
    if pos < region_end or not fields:
        # A non-header line ends the headers early; like Postfix cleanup, insert the blank
        # line so that the fields we add, and the line itself, land on the right side of it.
        return _HeaderBlock(fields, pos, pos, True)
    return _HeaderBlock(fields, region_end, body_start, separator)


def _sanitise(text: str, *, utf8: bool, limit: int) -> str:
    """Keep printable characters only, at most ``limit`` octets once UTF-8 encoded."""
    out: list[str] = []
    size = 0
    for ch in text:
        if " " <= ch <= "~":
            pass
        elif ch.isascii() or not ch.isprintable():
            continue  # control characters (and lone surrogates) could break the header line
        elif not utf8:
            ch = "?"
        size += len(ch.encode("utf-8"))
        if size > limit:
            break
        out.append(ch)
    return "".join(out)


def rewrite_message(
    message: bytes,
    *,
    masquerade_domains: Sequence[str],
    received: bytes,
    hostname: str,
    queue_id: str,
    now: datetime.datetime,
) -> Rewritten:
    """Prepend ``received``, masquerade address headers and add Message-ID/Date if missing."""
    block = _scan_headers(message)
    chunks: list[bytes] = [received]
    cursor = 0
    have_message_id = have_date = False
    hops = 0
    for field in block.fields:
        name = field.name
        if name == "received":
            hops += 1
        elif name == "message-id":
            have_message_id = True
        elif name == "date":
            have_date = True
        elif masquerade_domains and name in MASQUERADE_HEADERS:
            new = _masquerade_field(message, field.value_start, field.end, masquerade_domains)
            if new is not None:
                chunks.append(message[cursor : field.value_start])
                chunks.extend(new)
                cursor = field.end
    chunks.append(message[cursor : block.end])
    added: list[bytes] = []
    if not have_message_id:
        stamp = now.strftime("%Y%m%d%H%M%S")
        added.append(f"Message-ID: <{stamp}.{queue_id}@{hostname}>\r\n".encode())
    if not have_date:
        added.append(f"Date: {email.utils.format_datetime(now)}\r\n".encode())
    if added and block.end and not message.endswith(_CRLF, 0, block.end):
        chunks.append(_CRLF)  # an unterminated last header line must not swallow our fields
    chunks.extend(added)
    if block.separator:
        chunks.append(_CRLF)
    return Rewritten(b"".join(chunks), block.body_start, hops)


def build_received(
    *,
    helo: str,
    client_ip: str,
    hostname: str,
    queue_id: str,
    recipient: str | None,
    protocol: str,
    now: datetime.datetime,
) -> bytes:
    """Build a Postfix-style folded ``Received:`` field, CRLF-terminated.

    HELO and recipient are peer-controlled, so they are stripped of anything that could end the
    line; non-ASCII survives only in SMTPUTF8 sessions.  pyrelay does no reverse DNS lookup, so
    the client's name is ``unknown``, as Postfix writes it for a client without a verified name.
    """
    utf8 = protocol.upper().startswith("UTF8")
    helo_text = _sanitise(helo, utf8=utf8, limit=255).strip() or "unknown"
    ip_text = _sanitise(client_ip, utf8=False, limit=64).strip()
    if ":" in ip_text and not ip_text.lower().startswith("ipv6:"):
        ip_text = "IPv6:" + ip_text
    proto_text = _sanitise(protocol, utf8=False, limit=32).strip() or "SMTP"
    date = email.utils.format_datetime(now)
    lines = [
        f"Received: from {helo_text} (unknown [{ip_text}])",
        f"\tby {hostname} (pyrelay) with {proto_text} id {queue_id}",
    ]
    if recipient is not None:
        rcpt_text = _sanitise(recipient, utf8=utf8, limit=400)
        lines.append(f"\tfor <{rcpt_text}>; {date}")
    else:
        lines[-1] += ";"
        lines.append(f"\t{date}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")
