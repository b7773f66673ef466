"""Access checks of smtpd(8): who may relay, which senders, how many recipients.

Every check returns ``None`` to accept or a ``Rejection``: the exact SMTP reply to send and a
short reason label for logs and metrics (so the listener never parses reply texts).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Final

from pyrelay.config import IPNetwork, Settings
from pyrelay.domains import DomainError, is_canonical, to_ascii, try_ascii

if TYPE_CHECKING:
    from pyrelay.users import User

# Control characters (even inside a quoted local part) cannot be relayed: the upstream client
# refuses them in commands, which would leave a message in the queue that can never be sent.
# The same for lone surrogates (bytes that were not UTF-8, kept by aiosmtpd's surrogateescape).
_CONTROL = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff]")


def split_address(address: str) -> tuple[str, str] | None:
    """Split ``local@domain`` honouring a quoted local part; ``None`` if there is no domain."""
    if address.startswith('"'):
        i, n = 1, len(address)
        while i < n:
            ch = address[i]
            if ch == "\\":
                i += 2
                continue
            if ch == '"':
                break
            i += 1
        else:
            return None
        local, rest = address[: i + 1], address[i + 1 :]
        if not rest.startswith("@"):
            return None
        domain = rest[1:]
    else:
        local, at, domain = address.rpartition("@")
        if not at:
            return None
    if not local or not domain:
        return None
    return local, domain


@lru_cache(maxsize=4096)
def normalize_address_domain(domain: str) -> str | None:
    """The domain's comparison key (``pyrelay.domains.to_ascii``: lowercase A-labels, no root
    dot), or the address literal as written; ``None`` if it is not a usable domain."""
    if domain.startswith("[") and domain.endswith("]"):
        # An address literal: [192.0.2.1] or [IPv6:2001:db8::1], ASCII only.
        inner = domain[1:-1]
        if inner and inner.isascii() and all(c.isalnum() or c in ".:" for c in inner):
            return domain.lower()
        return None
    return try_ascii(domain)


def domain_form_problem(domain: str) -> str | None:
    """Why an address domain cannot be relayed as written, or ``None``.

    Internationalised domains are compared in their UTS-46 form; a domain whose text that
    mapping would change (soft hyphen, full-width letters, non-ASCII capitals, ...) is refused
    rather than approved as one domain and relayed as another.
    """
    if domain.isascii() and "xn--" not in domain.lower():
        return None  # plain ASCII: case-insensitive; syntax is the fully-qualified check
    try:
        key = to_ascii(domain)
    except DomainError:
        return "invalid internationalized domain name"
    if not is_canonical(domain):
        return f"domain is not in UTS-46 normalized form (write it as {key})"
    return None


def is_fully_qualified(address: str) -> bool:
    parts = split_address(address)
    if parts is None:
        return False
    domain = normalize_address_domain(parts[1])
    if domain is None:
        return False
    return domain.startswith("[") or "." in domain


def domain_matches(domain: str, allowed: Sequence[str]) -> bool:
    """Postfix ``parent_domain_matches_subdomains``: ``example.com`` allows ``a.example.com``."""
    return any(domain == d or domain.endswith("." + d) for d in allowed)


class Reason:
    """Rejection reason labels (the ``reason`` of ``pyrelay_messages_rejected_total``)."""

    CLIENT: Final = "client"
    RELAY_DENIED: Final = "relay_denied"
    NULL_SENDER: Final = "null_sender"
    SYNTAX: Final = "syntax"
    TOO_MANY_RECIPIENTS: Final = "too_many_recipients"
    SIZE: Final = "size"
    SENDER_NOT_OWNED: Final = "sender_not_owned"


@dataclass(frozen=True, slots=True)
class Rejection:
    """A policy decision to refuse: ``reply`` is sent as is, ``reason`` labels logs and metrics."""

    reason: str
    reply: str


@dataclass(frozen=True, slots=True)
class Policy:
    mynetworks: tuple[IPNetwork, ...]
    allowed_sender_domains: tuple[str, ...]
    allow_any_sender_domain: bool
    max_recipients: int
    size_limit: int
    allow_null_sender: bool = False

    @classmethod
    def from_settings(cls, settings: Settings) -> Policy:
        return cls(
            mynetworks=settings.mynetworks,
            allowed_sender_domains=settings.allowed_sender_domains,
            allow_any_sender_domain=settings.allow_empty_sender_domains,
            max_recipients=settings.max_recipients,
            size_limit=settings.message_size_limit,
            allow_null_sender=settings.allow_null_sender,
        )

    def client_allowed(self, ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self.mynetworks)

    def check_client(self, ip: str) -> Rejection | None:
        if self.client_allowed(ip):
            return None
        return Rejection(Reason.CLIENT, f"554 5.7.1 <{ip}>: Client host rejected: Access denied")

    def check_declared_size(self, size: int) -> Rejection | None:
        if self.size_limit and size > self.size_limit:
            return Rejection(Reason.SIZE, "552 5.3.4 Message size exceeds fixed limit")
        return None

    def check_sender(self, sender: str) -> Rejection | None:
        """MAIL FROM syntax; the domain policy is applied at RCPT, as Postfix does."""
        if sender == "":
            return None
        if _CONTROL.search(sender):
            return Rejection(Reason.SYNTAX, "501 5.1.7 Bad sender address syntax")
        parts = split_address(sender)
        problem = domain_form_problem(parts[1]) if parts else None
        if problem:
            return Rejection(Reason.SYNTAX, f"501 5.1.7 Bad sender address syntax: {problem}")
        if not is_fully_qualified(sender):
            return Rejection(
                Reason.SYNTAX,
                f"504 5.5.2 <{sender}>: Sender address rejected: need fully-qualified address",
            )
        return None

    def sender_domain_allowed(self, sender: str) -> bool:
        if sender == "" or self.allow_any_sender_domain:
            return True
        parts = split_address(sender)
        if parts is None:
            return False
        domain = normalize_address_domain(parts[1])
        return domain is not None and domain_matches(domain, self.allowed_sender_domains)

    @staticmethod
    def sender_owned(sender: str, user: User) -> bool:
        parts = split_address(sender)
        if parts is None:
            return False
        domain = normalize_address_domain(parts[1])
        return domain is not None and user.owns(parts[0], domain)

    def sender_domain(self, sender: str) -> str:
        parts = split_address(sender)
        return parts[1].lower() if parts else sender

    def check_recipient(
        self, client_ip: str, sender: str, recipient: str, count: int, user: User | None = None
    ) -> Rejection | None:
        """All RCPT checks in Postfix order: client, recipient syntax, sender, limits.

        ``count`` is the number of recipients already accepted in this transaction.  A client
        that logged in (``user``) may relay from any address (``permit_sasl_authenticated``
        before the MYNETWORKS check), from its own senders when it has a list.
        """
        rejection = self.check_client(client_ip) if user is None else None
        if rejection:
            return rejection
        if _CONTROL.search(recipient):
            return Rejection(Reason.SYNTAX, "501 5.1.3 Bad recipient address syntax")
        parts = split_address(recipient)
        problem = domain_form_problem(parts[1]) if parts else None
        if problem:
            return Rejection(Reason.SYNTAX, f"501 5.1.3 Bad recipient address syntax: {problem}")
        if not is_fully_qualified(recipient):
            return Rejection(
                Reason.SYNTAX,
                f"504 5.5.2 <{recipient}>: Recipient address rejected: "
                "need fully-qualified address",
            )
        if sender == "":
            # boky/postfix: check_sender_access finds nothing for <> and rejects, like a sender
            # outside the list.  A null sender would otherwise relay any From: header.
            # ALLOW_EMPTY_SENDER_DOMAINS (any sender) or PYRELAY_ALLOW_NULL_SENDER let it pass.
            if not (self.allow_null_sender or self.allow_any_sender_domain):
                return Rejection(
                    Reason.NULL_SENDER,
                    f"554 5.7.1 <{recipient}>: Relay access denied: null sender is not allowed",
                )
        elif user is not None and user.senders:
            if not self.sender_owned(sender, user):
                # Postfix reject_sender_login_mismatch.
                return Rejection(
                    Reason.SENDER_NOT_OWNED,
                    f"553 5.7.1 <{sender}>: Sender address rejected: not owned by user {user.name}",
                )
        elif not self.sender_domain_allowed(sender):
            return Rejection(
                Reason.RELAY_DENIED,
                f"554 5.7.1 <{recipient}>: Relay access denied: sender domain "
                f"{self.sender_domain(sender)} is not in ALLOWED_SENDER_DOMAINS",
            )
        if count >= self.max_recipients:
            return Rejection(Reason.TOO_MANY_RECIPIENTS, "452 4.5.3 Error: too many recipients")
        return None
