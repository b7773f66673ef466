"""Property tests with UTS-46 input for the policy and the rewriting (issue 9, finding 5):
a U-label and its A-label are one domain, and what the policy approves is exactly what goes
upstream (a domain that UTS-46 would map to something else is refused, never approved as one
domain and relayed as another)."""

from __future__ import annotations

import ipaddress

import idna
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pyrelay.config import normalize_domain, split_list
from pyrelay.policy import Policy
from pyrelay.rewrite import masquerade_address


def parse_masquerade_domains(value: str) -> tuple[str, ...]:
    """What config.py's MASQUERADED_DOMAINS validator does with a list."""
    return tuple(
        ("!" if e.startswith("!") else "") + normalize_domain(e.lstrip("!").lstrip("."))
        for e in split_list(value)
    )


SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ALLOWED_U = ("example.org", "fa\u00df.de", "b\u00fccher.example")
ALLOWED = tuple(idna.encode(d, uts46=True, transitional=False).decode() for d in ALLOWED_U)
POLICY = Policy(
    mynetworks=(ipaddress.ip_network("127.0.0.0/8"),),
    allowed_sender_domains=ALLOWED,
    allow_any_sender_domain=False,
    max_recipients=10,
    size_limit=0,
)

# Characters UTS-46 maps, ignores or keeps: soft hyphen, ZWJ/ZWNJ, full-width letters, the
# ideographic full stop, sharp s and its capital, combining diaeresis, Turkish dotted I.
TRICKY = ["\u00ad", "\u200d", "\u200c", "\uff45", "\uff58", "\u3002", "\uff0e", "\u00df"]
TRICKY += ["\u1e9e", "\u0308", "\u0130", "\u00dc", "\u00fc", "E", "-", "."]


@st.composite
def domains(draw: st.DrawFn) -> str:
    base = draw(st.sampled_from(ALLOWED_U + ALLOWED + ("fass.de", "evil.test")))
    chars = list(base)
    for _ in range(draw(st.integers(0, 3))):
        pos = draw(st.integers(0, len(chars)))
        chars.insert(pos, draw(st.sampled_from(TRICKY)))
    if draw(st.booleans()):
        chars = [c.upper() if draw(st.booleans()) else c for c in chars]
    prefix = draw(st.sampled_from(["", "mail.", "m\u00fcll."]))
    return prefix + "".join(chars)


def uts46(domain: str) -> str | None:
    """The oracle: the idna package directly, whole domain, non-transitional.  A trailing
    root dot names the same domain (Postfix strips it too)."""
    if domain.endswith(".") and not domain.endswith(".."):
        domain = domain[:-1]
    try:
        key = idna.encode(domain, uts46=True, transitional=False).decode("ascii")
    except (idna.IDNAError, UnicodeError):
        return None
    # A root dot written as U+3002 or U+FF0E maps to "." too.
    return key[:-1] if key.endswith(".") and not key.endswith("..") else key


def ascii_lower(text: str) -> str:
    return "".join(c.lower() if c.isascii() else c for c in text)


@SETTINGS
@given(domains())
@example("exa\u00admple.org")
@example("\uff45xample.org")
@example("example\u3002org")
@example("fass.de")
@example("FA\u1e9e.de")
@example("xn--fa-hia.de")
@example("example.org.")
@example("xn--fa-hia.de\u3002")
def test_policy_approves_only_what_it_relays(domain: str) -> None:
    sender = f"x@{domain}"
    at_mail = POLICY.check_sender(sender)
    at_rcpt = POLICY.check_recipient("127.0.0.1", sender, "r@dest.test", 0)
    if at_mail is None and at_rcpt is None:
        # Approved: the domain as written (what goes upstream) is already its UTS-46 form up
        # to ASCII case, and that form is an allowed domain or a subdomain of one.
        key = uts46(domain)
        assert key is not None, domain
        if not domain.isascii():
            mapped = idna.uts46_remap(domain, std3_rules=False, transitional=False)
            assert mapped == ascii_lower(domain), domain
        assert any(key == a or key.endswith("." + a) for a in ALLOWED), domain
    if at_mail is not None:
        assert at_mail.reply.startswith(("501 5.1.7 ", "504 5.5.2 ")), at_mail


@SETTINGS
@given(domains())
@example("xn--fa-hia.de\u3002")
@example("b\u00fccher.example.")
def test_u_label_and_a_label_get_the_same_decision(domain: str) -> None:
    key = uts46(domain)
    if key is None:
        return
    u_form = idna.decode(key)
    for form in (key, u_form, key.upper()):
        assert POLICY.sender_domain_allowed(f"x@{form}") == any(
            key == a or key.endswith("." + a) for a in ALLOWED
        ), form
        assert POLICY.check_sender(f"x@{form}") is None, form


@SETTINGS
@given(domains(), st.sampled_from(ALLOWED_U + ALLOWED))
def test_masquerading_treats_u_and_a_labels_alike(domain: str, entry: str) -> None:
    assert parse_masquerade_domains(entry) == (uts46(entry),)
    entries = parse_masquerade_domains(f"!sub.{entry} {entry}")
    key = uts46(domain)
    if key is None:
        # Not a valid IDN: never masqueraded into a configured domain.
        result = masquerade_address(f"u@{domain}", entries)
        assert result == f"u@{domain}" or domain.isascii()
        return
    by_u = masquerade_address(f"u@{idna.decode(key)}", entries)
    by_a = masquerade_address(f"u@{key}", entries)
    target = entries[1]
    if key.endswith("." + target) and not (
        key == f"sub.{target}" or key.endswith(f".sub.{target}")
    ):
        assert by_u == by_a == f"u@{target}"
    else:
        assert by_u == f"u@{idna.decode(key)}" and by_a == f"u@{key}"
