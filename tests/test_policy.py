"""Property tests of pyrelay.policy: address parsing never crashes, and the sender-domain check
never allows a domain that is not an allowed domain or one of its subdomains (open relay)."""

from __future__ import annotations

import ipaddress
import re

import idna
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pyrelay.policy import (
    Policy,
    Reason,
    Rejection,
    is_fully_qualified,
    normalize_address_domain,
    split_address,
)

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ALLOWED = ("example.org", "xn--bcher-kva.example")  # the second is "bücher.example"
POLICY = Policy(
    mynetworks=(ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("fd00::/8")),
    allowed_sender_domains=ALLOWED,
    allow_any_sender_domain=False,
    max_recipients=10,
    size_limit=1000,
)
REPLY = re.compile(r"^[45]\d\d [45]\.\d{1,3}\.\d{1,3} ")

# Text that looks like mail addresses more often than pure noise would.
ADDR_CHARS = st.sampled_from(list('@."\\%:<>[]!-_ aZ0\u00fc\u0430\u3002\udcff') + ["example.org"])
addressish = st.one_of(
    st.text(max_size=60),
    st.lists(ADDR_CHARS, max_size=30).map("".join),
)


def oracle_domain(domain: str) -> str | None:
    """Independent normalisation: case-fold, drop a root dot, UTS-46 (non-transitional)."""
    domain = domain.removesuffix(".")
    if not domain.isascii():
        try:
            domain = idna.encode(domain, uts46=True, transitional=False).decode("ascii")
        except (idna.IDNAError, UnicodeError):
            return None
    return domain.lower()


def reply_of(decision: Rejection | None) -> str | None:
    return None if decision is None else decision.reply


def oracle_allows(domain: str) -> bool:
    d = oracle_domain(domain)
    return d is not None and any(d == a or d.endswith("." + a) for a in ALLOWED)


@SETTINGS
@given(addressish)
@example('"unterminated@example.org')
@example('"a\\"@example.org"@evil.test')
@example("@")
@example("x@")
@example("\udcff@example.org")
def test_parsers_never_crash(text: str) -> None:
    parts = split_address(text)
    if parts is not None:
        local, domain = parts
        assert local and domain and f"{local}@{domain}" == text
    normalized = normalize_address_domain(text)
    assert normalized is None or (normalized.isascii() and normalized == normalized.lower())
    is_fully_qualified(text)
    POLICY.check_sender(text)
    POLICY.sender_domain_allowed(text)
    POLICY.sender_domain(text)
    POLICY.client_allowed(text)


@SETTINGS
@given(addressish)
def test_allowed_sender_domain_is_allowed_or_subdomain(text: str) -> None:
    if not POLICY.sender_domain_allowed(text) or text == "":
        return
    parts = split_address(text)
    assert parts is not None
    assert oracle_allows(parts[1]), text


@SETTINGS
@given(addressish, addressish, st.integers(min_value=0, max_value=20))
def test_check_recipient_replies_are_well_formed(sender: str, rcpt: str, count: int) -> None:
    for ip in ("127.0.0.1", "10.9.9.9", "::ffff:127.0.0.1", "fd00::1", "2001:db8::1", "junk"):
        decision = POLICY.check_recipient(ip, sender, rcpt, count)
        reply = reply_of(decision)
        allowed_client = ip in ("127.0.0.1", "::ffff:127.0.0.1", "fd00::1")
        if not allowed_client:
            assert reply == f"554 5.7.1 <{ip}>: Client host rejected: Access denied"
            assert decision is not None and decision.reason == Reason.CLIENT
            continue
        if reply is None:
            assert is_fully_qualified(rcpt) and count < 10
            assert sender != ""  # a null sender is refused unless allowed explicitly
            assert oracle_allows(split_address(sender)[1])  # type: ignore[index]
        else:
            assert decision is not None and decision.reason in vars(Reason).values()
            assert REPLY.match(reply), reply
            if "\n" not in rcpt + sender:
                assert "\n" not in reply  # one reply line


# Structured addresses: a local part (dot-atom, quoted with an "@" and an allowed domain inside,
# percent hack) and a domain that is allowed, a subdomain, or a look-alike.
label = st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?\Z")
local_part = st.one_of(
    st.from_regex(r"\A[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]{1,10}\Z"),
    st.sampled_from(ALLOWED + ("b\u00fccher.example",)).map(lambda d: f'"x@{d}"'),
    st.sampled_from(ALLOWED).map(lambda d: f"user%{d}"),
    st.just('"a\\"b@example.org"'),
)


def case_mix(domain: str, flags: list[bool]) -> str:
    flags = (flags + [False] * len(domain))[: len(domain)]
    return "".join(c.upper() if f else c for c, f in zip(domain, flags, strict=True))


@st.composite
def domains(draw: st.DrawFn) -> tuple[str, bool]:
    """A domain and whether it must be allowed."""
    base = draw(st.sampled_from(ALLOWED + ("b\u00fccher.example",)))
    kind = draw(st.sampled_from(["same", "sub", "suffix", "prefix", "infix", "random", "dot"]))
    flags = draw(st.lists(st.booleans(), max_size=25))
    if kind == "same":
        return case_mix(base, flags), True
    if kind == "sub":
        return draw(label) + "." + case_mix(base, flags), True
    if kind == "dot":
        return base + ".", True
    if kind == "suffix":  # example.org.evil.net
        return base + "." + draw(label) + "." + draw(label), False
    if kind == "prefix":  # evil-example.org, evilexample.org
        return draw(label) + draw(st.sampled_from(["", "-"])) + base, False
    if kind == "infix":  # example-org.net, exampleXorg
        return base.replace(".", draw(st.sampled_from(["-", "", "_", "x."]))) + ".net", False
    return draw(label) + "." + draw(label), False


@SETTINGS
@given(local_part, domains())
@example("x", ("evil-example.org", False))
@example("x", ("example.org.evil.net", False))
@example('"x@example.org"', ("evil.test", False))
@example("user%example.org", ("evil.test", False))
@example("USER", ("EXAMPLE.ORG", True))
@example("x", ("B\u00dcCHER.example", True))
@example("x", ("mail.xn--bcher-kva.example", True))
def test_structured_senders(local: str, domain_case: tuple[str, bool]) -> None:
    domain, must_allow = domain_case
    address = f"{local}@{domain}"
    if must_allow and not oracle_allows(domain):
        must_allow = False  # e.g. a random label that is not a valid hostname
    assert POLICY.sender_domain_allowed(address) == oracle_allows(domain) == must_allow, address
    reply = reply_of(POLICY.check_recipient("127.0.0.1", address, "r@dest.test", 0))
    if must_allow:
        assert reply is None
    else:
        assert reply is not None and reply.startswith("554 5.7.1 <r@dest.test>: Relay access")


@pytest.mark.parametrize(
    ("address", "fq"),
    [
        ("user@example.org", True),
        ("user", False),
        ("user@localhost", False),
        ("user@[192.0.2.1]", True),
        ("@example.org", False),
        ("user@", False),
        ("user@example..org", False),
        ("user@.example.org", False),
        ("user@-example.org", False),
        ('"quoted@x"@example.org', True),
        ('"unterminated@example.org', False),
        ("user@b\u00fccher.example", True),
    ],
)
def test_fully_qualified_examples(address: str, fq: bool) -> None:
    assert is_fully_qualified(address) is fq


def test_allow_any_sender_domain_still_checks_clients() -> None:
    open_policy = Policy(
        mynetworks=POLICY.mynetworks,
        allowed_sender_domains=(),
        allow_any_sender_domain=True,
        max_recipients=2,
        size_limit=0,
    )
    assert open_policy.check_recipient("127.0.0.1", "x@evil.test", "r@dest.test", 0) is None
    assert open_policy.check_recipient("192.0.2.9", "x@evil.test", "r@dest.test", 0) == Rejection(
        Reason.CLIENT, "554 5.7.1 <192.0.2.9>: Client host rejected: Access denied"
    )
    assert open_policy.check_recipient("127.0.0.1", "", "r@dest.test", 2) == Rejection(
        Reason.TOO_MANY_RECIPIENTS, "452 4.5.3 Error: too many recipients"
    )


@SETTINGS
@given(st.text(max_size=10), st.sampled_from(["\x00", "\x01", "\t", "\r", "\x7f", "\udcff"]))
def test_unrelayable_characters_are_refused(local: str, bad: str) -> None:
    sender = f'"{local}{bad}"@example.org'
    assert POLICY.check_sender(sender) == Rejection(
        Reason.SYNTAX, "501 5.1.7 Bad sender address syntax"
    )
    assert POLICY.check_recipient("127.0.0.1", "", f"x{bad}@dest.test", 0) == Rejection(
        Reason.SYNTAX, "501 5.1.3 Bad recipient address syntax"
    )
