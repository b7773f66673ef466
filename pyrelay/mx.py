"""Direct MX delivery (``PYRELAY_DELIVERY=mx``): the recipients' domains' MX hosts, found with
dnspython, instead of a relay host.

Per domain of a message's recipients (one SMTP transaction per destination domain):

* MX lookup; NXDOMAIN and a null MX (RFC 7505: one MX ``0 .``) bounce at once; no MX records
  means the domain's own address records (RFC 5321 5.1); a DNS failure defers.
* Exchangers in preference order (equal preferences shuffled), each one's A and AAAA records
  in turn, port ``PYRELAY_MX_PORT``; the next address only after a connection-level failure
  (refused, timed out, no greeting, TLS); a reply to MAIL/RCPT/DATA is final for the attempt.
* Opportunistic TLS (``may``): STARTTLS when offered, no certificate check, never AUTH.

**Per-destination queues.**  Postfix's qmgr keeps one in-memory queue per destination and
serves them round-robin.  pyrelay's queue is on disk with a bounded active set, so instead of
per-destination queues it bounds what one destination can take of the shared delivery agents,
and never lets an agent wait for a destination:

* *concurrency*: at most ``max(1, PYRELAY_CONCURRENCY // 4)`` deliveries to one domain at a time
  in a process (a route's ``concurrency`` where set); a message for a domain at its limit is
  deferred at once, without counting an attempt, and is retried shortly from ``deferred/``;
* *dead destinations*: when every address of every exchanger fails at connection level, the
  domain is marked dead for ``min(60 s, PYRELAY_MIN_BACKOFF)``; its mail is deferred at once
  (counted, like any failed attempt) without opening connections.

So a slow or dead domain holds at most a quarter of the agents, and only for its own messages;
mail to every other domain keeps the rest.  Waiting would instead park agents (and memory) on
the slow domain; deferring keeps the queue on disk and the agents free.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Sequence

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver

from pyrelay.config import HostPort, Settings, TLSLevel
from pyrelay.delivery import Outcome, RecipientResult, Session, Tried, Upstream
from pyrelay.domains import try_ascii
from pyrelay.errors import DeliveryError
from pyrelay.logging import get_logger
from pyrelay.queuefile import Envelope
from pyrelay.secret import SecretStr
from pyrelay.transaction import MessageBody

__all__ = ["DNSFailure", "MXDelivery", "MXResolver", "Tried", "Via", "group_by_domain"]

log = get_logger("pyrelay.mx")

# Connection-level failures: try the next address / MX host.
NEXT_HOP = frozenset({"dns", "tcp", "greeting", "tls"})
# Upstreams kept (one per exchanger address); past it the cache starts again.
UPSTREAM_CACHE = 1000


class DNSFailure(Exception):
    """A lookup that gives no usable answer; ``permanent`` bounces, otherwise defers."""

    def __init__(self, dsn: str, text: str, *, permanent: bool) -> None:
        super().__init__(text)
        self.dsn = dsn
        self.text = text
        self.permanent = permanent


# (upstream, session key, envelope, body, recipients, sessions) -> Tried
Via = Callable[
    [Upstream, tuple[object, ...], Envelope, MessageBody, Sequence[str], dict[object, Session]],
    Awaitable[Tried],
]


def group_by_domain(recipients: Sequence[str]) -> dict[str, list[str]]:
    """Recipients by destination domain (comparison form), in their original order."""
    groups: dict[str, list[str]] = {}
    for rcpt in recipients:
        domain = rcpt.rpartition("@")[2]
        key = try_ascii(domain) or domain.lower()
        groups.setdefault(key, []).append(rcpt)
    return groups


class MXResolver:
    """MX and address lookups with dnspython (``PYRELAY_DNS_SERVERS`` or the system's)."""

    def __init__(self, settings: Settings) -> None:
        if settings.dns_servers:
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = [
                dns.nameserver.Do53Nameserver(s.host, s.port) for s in settings.dns_servers
            ]
        else:
            resolver = dns.asyncresolver.Resolver()
        resolver.lifetime = min(30.0, settings.upstream_connect_timeout)
        resolver.cache = dns.resolver.LRUCache(10_000)
        self.resolver = resolver

    async def exchangers(self, domain: str) -> list[str]:
        """MX host names in the order to try; the domain itself when it has no MX."""
        try:
            answer = await self.resolver.resolve(domain, "MX")
        except dns.resolver.NXDOMAIN:
            raise DNSFailure(
                "5.1.2",
                f"Host or domain name not found. Name service error for name={domain} type=MX: "
                "Host not found",
                permanent=True,
            ) from None
        except dns.resolver.NoAnswer:
            return [domain]  # RFC 5321 5.1: the implicit MX
        except (dns.exception.DNSException, OSError) as exc:
            raise DNSFailure(
                "4.4.3",
                f"Host or domain name not found. Name service error for name={domain} type=MX: "
                f"Host not found, try again ({type(exc).__name__})",
                permanent=False,
            ) from None
        records = [(r.preference, r.exchange.to_text(omit_final_dot=True)) for r in answer]
        if any(host in ("", ".") for _, host in records):
            if len(records) == 1:
                raise DNSFailure(
                    "5.1.10",
                    f"Domain {domain} does not accept mail (nullMX)",
                    permanent=True,
                )
            records = [(p, h) for p, h in records if h not in ("", ".")]
        random.shuffle(records)
        records.sort(key=lambda r: r[0])
        return [host for _, host in records]

    async def addresses(self, host: str) -> list[str]:
        """IPv4 then IPv6 addresses of an exchanger; empty when it has none."""
        found: list[str] = []
        errors = 0
        for rdtype in ("A", "AAAA"):
            try:
                answer = await self.resolver.resolve(host, rdtype)
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                continue
            except (dns.exception.DNSException, OSError):
                errors += 1
                continue
            found += [r.to_text() for r in answer]
        if not found and errors:
            raise DNSFailure(
                "4.4.3",
                f"Host or domain name not found. Name service error for name={host} type=A: "
                "Host not found, try again",
                permanent=False,
            )
        return found


class _MXUpstream(Upstream):
    """An exchanger's address; sessions are named ``mx.host[addr]:port`` in the logs."""

    def __init__(self, settings: Settings, name: str) -> None:
        super().__init__(settings)
        self.name = name

    async def open(self, *, steps: list[tuple[object, str]] | None = None) -> Session:  # type: ignore[override]
        session = await super().open()
        session.relay = f"{self.name}[{self.target.host}]:{self.target.port}"
        return session


class MXDelivery:
    """Delivers one message's recipients to their domains' exchangers."""

    def __init__(self, settings: Settings, via: Via, resolver: MXResolver | None = None) -> None:
        self.settings = settings
        self.via = via
        self.resolver = resolver or MXResolver(settings)
        self.limit = max(1, settings.concurrency // 4)
        self.busy_retry = max(0.5, min(settings.min_backoff, 5.0))
        self._active: dict[str, int] = {}
        self._dead: dict[str, tuple[float, DeliveryError]] = {}
        self._upstreams: dict[tuple[str, str, int], _MXUpstream] = {}
        self._base = settings.replace(
            tls_level=TLSLevel.MAY,
            relayhost_username=SecretStr(""),
            relayhost_password=SecretStr(""),
        )

    def active(self, domain: str) -> int:
        return self._active.get(domain, 0)

    def clear(self) -> None:
        """Forget dead destinations (``pyrelay queue flush``)."""
        self._dead.clear()

    def _upstream(self, name: str, address: str) -> _MXUpstream:
        key = (name, address, self.settings.mx_port)
        up = self._upstreams.get(key)
        if up is None:
            if len(self._upstreams) >= UPSTREAM_CACHE:
                self._upstreams.clear()
            settings = self._base.replace(relayhost=HostPort(address, self.settings.mx_port))
            up = self._upstreams[key] = _MXUpstream(settings, name)
        return up

    def abort_all(self) -> None:
        for up in self._upstreams.values():
            up.abort_all()

    async def deliver(
        self,
        env: Envelope,
        body: MessageBody,
        sessions: dict[object, Session],
        limit: int | None = None,
    ) -> tuple[list[RecipientResult], dict[str, str], float | None]:
        """Results per recipient, the relay of each, and ``retry_in`` when every deferral was
        a busy destination (not a failed attempt)."""
        groups = group_by_domain(env.recipients)
        parts = await asyncio.gather(
            *(
                self._domain(domain, rcpts, env, body, sessions, limit or self.limit)
                for domain, rcpts in groups.items()
            )
        )
        results: dict[str, RecipientResult] = {}
        relays: dict[str, str] = {}
        counted = False
        busy = False
        for part_results, relay, not_counted in parts:
            for res in part_results:
                results[res.recipient] = res
                relays[res.recipient] = relay
                if res.outcome is Outcome.DEFERRED:
                    if not_counted:
                        busy = True
                    else:
                        counted = True
        retry_in = self.busy_retry if busy and not counted else None
        return [results[r] for r in env.recipients], relays, retry_in

    async def _domain(
        self,
        domain: str,
        rcpts: list[str],
        env: Envelope,
        body: MessageBody,
        sessions: dict[object, Session],
        limit: int,
    ) -> tuple[list[RecipientResult], str, bool]:
        dead = self._dead.get(domain)
        if dead is not None:
            until, exc = dead
            if time.monotonic() < until:
                text = f"delivery temporarily suspended: {exc.text}"
                return _all(rcpts, Outcome.DEFERRED, exc.status, text), "none", False
            del self._dead[domain]
        if self._active.get(domain, 0) >= limit:
            text = f"destination {domain} is busy: {limit} deliveries in progress"
            return _all(rcpts, Outcome.DEFERRED, "4.4.5", text), "none", True
        self._active[domain] = self._active.get(domain, 0) + 1
        try:
            return await self._try_exchangers(domain, rcpts, env, body, sessions)
        finally:
            self._active[domain] -= 1
            if not self._active[domain]:
                del self._active[domain]

    async def _try_exchangers(
        self,
        domain: str,
        rcpts: list[str],
        env: Envelope,
        body: MessageBody,
        sessions: dict[object, Session],
    ) -> tuple[list[RecipientResult], str, bool]:
        try:
            hosts = await self.resolver.exchangers(domain)
        except DNSFailure as exc:
            outcome = Outcome.BOUNCED if exc.permanent else Outcome.DEFERRED
            return _all(rcpts, outcome, exc.dsn, exc.text), "none", False
        last: Tried | None = None
        dns_error: DNSFailure | None = None
        for host in hosts:
            try:
                addresses = await self.resolver.addresses(host)
            except DNSFailure as exc:
                dns_error = exc
                continue
            for address in addresses:
                up = self._upstream(host, address)
                tried = await self.via(
                    up, ("mx", address, self.settings.mx_port), env, body, rcpts, sessions
                )
                if tried.error is None or tried.error.kind not in NEXT_HOP:
                    return tried.results, tried.relay, False
                last = tried
        if last is not None and last.error is not None:
            self._dead[domain] = (
                time.monotonic() + min(60.0, self.settings.min_backoff),
                last.error,
            )
            log.info("destination_dead", domain=domain, reason=last.error.text)
            return last.results, last.relay, False
        if dns_error is not None:
            return _all(rcpts, Outcome.DEFERRED, dns_error.dsn, dns_error.text), "none", False
        text = f"Host or domain name not found. Name service error for name={domain}: no address"
        return _all(rcpts, Outcome.DEFERRED, "4.4.3", text), "none", False


def _all(rcpts: Sequence[str], outcome: Outcome, dsn: str, text: str) -> list[RecipientResult]:
    return [RecipientResult(r, outcome, dsn, text) for r in rcpts]
