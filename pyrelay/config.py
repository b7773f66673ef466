"""Settings from the environment (and a ``.env`` file only when ``PYRELAY_ENV_FILE`` names one).

A small declarative loader rather than pydantic-settings: that library and pydantic cost every
relay process about 12 MB of memory at rest, for what is a table of parsers (issue 10).

Names from the Postfix container (boky/postfix) keep their names; pyrelay's own settings use the
``PYRELAY_`` prefix.  Building ``Settings`` parses and validates, and does the little I/O that
needs: it reads the ``.env`` file and the ``*_FILE`` secrets, and resolves the system host name
(``socket.getfqdn()``, which may query DNS) when ``PYRELAY_HOSTNAME`` is unset.  It never binds
sockets, connects upstream or touches the spool.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from enum import Enum, StrEnum
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from pyrelay.domains import DomainError, to_ascii
from pyrelay.errors import ConfigError
from pyrelay.secret import SecretStr

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_MYNETWORKS = "127.0.0.0/8 10.0.0.0/8 172.16.0.0/12 192.168.0.0/16 ::1/128 fc00::/7"
MASK = "********"
# Secrets that also accept <NAME>_FILE (field names; the variable is the upper-case name).
SECRET_FIELDS = (
    "relayhost_username",
    "relayhost_password",
    "xoauth2_client_id",
    "xoauth2_secret",
    "xoauth2_initial_access_token",
    "xoauth2_initial_refresh_token",
    "smtpd_sasl_users",
    "relayhost_fallback_username",
    "relayhost_fallback_password",
)
# Shown masked by `pyrelay config` and the start-up log line (the username and the OAuth2
# client ID are not secret).
MASKED_FIELDS = frozenset(
    {
        "relayhost_password",
        "xoauth2_secret",
        "xoauth2_initial_access_token",
        "xoauth2_initial_refresh_token",
        "smtpd_sasl_users",
        "relayhost_fallback_password",
    }
)
# The token endpoints Google and Microsoft document for their SMTP servers.
TOKEN_ENDPOINTS = {
    "gmail.com": "https://oauth2.googleapis.com/token",
    "googlemail.com": "https://oauth2.googleapis.com/token",
    "office365.com": "https://login.microsoftonline.com/common/oauth2/v2.0/token",
    "outlook.com": "https://login.microsoftonline.com/common/oauth2/v2.0/token",
}


class TLSLevel(StrEnum):
    """Postfix ``smtp_tls_security_level`` values pyrelay implements."""

    NONE = "none"
    MAY = "may"
    ENCRYPT = "encrypt"
    VERIFY = "verify"
    SECURE = "secure"

    @property
    def requires_tls(self) -> bool:
        return self in (TLSLevel.ENCRYPT, TLSLevel.VERIFY, TLSLevel.SECURE)

    @property
    def verifies(self) -> bool:
        return self in (TLSLevel.VERIFY, TLSLevel.SECURE)


class SmtpdTLSLevel(StrEnum):
    """Postfix ``smtpd_tls_security_level`` for the listener: STARTTLS off, offered, required."""

    NONE = "none"
    MAY = "may"
    ENCRYPT = "encrypt"


class DeliveryMode(StrEnum):
    """``PYRELAY_DELIVERY``: through ``RELAYHOST`` (``relay``) or straight to the recipients'
    MX hosts (``mx``, only when asked for: never a silent fallback)."""

    RELAY = "relay"
    MX = "mx"


class LogFormat(StrEnum):
    CONSOLE = "console"
    JSON = "json"


class HostPort(NamedTuple):
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


class ListenAddress(NamedTuple):
    """A ``PYRELAY_LISTEN`` entry; ``tls://host:port`` is an implicit-TLS listener (RFC 8314)."""

    host: str
    port: int
    tls: bool = False

    def __str__(self) -> str:
        return ("tls://" if self.tls else "") + str(HostPort(self.host, self.port))


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$", re.IGNORECASE)
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)(?!-)[A-Za-z0-9_-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9_-]{1,63}(?<!-))*\.?$"
)


def parse_duration(value: object) -> float:
    """``300``, ``300s``, ``5m``, ``2h``, ``5d``, ``1w``, ``500ms`` -> seconds (Postfix units)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ValueError(f"invalid duration {value!r} (use e.g. 300, 300s, 5m, 2h, 5d)")
        seconds = float(match.group(1)) * _DURATION_UNITS[(match.group(2) or "s").lower()]
    if seconds < 0:
        raise ValueError("duration must not be negative")
    return seconds


def split_list(value: object) -> list[str]:
    """Postfix list syntax: comma and/or whitespace separated."""
    if value is None:
        return []
    if isinstance(value, list | tuple):
        return [str(v).strip() for v in value if str(v).strip()]
    return [part for part in re.split(r"[\s,]+", str(value)) if part]


def normalize_domain(domain: str) -> str:
    """A configured domain as its comparison key (``pyrelay.domains.to_ascii``: UTS-46
    non-transitional, lowercase A-labels), so that comparisons are exact string matches."""
    domain = domain.strip()
    if not domain:
        raise ValueError("empty domain")
    try:
        return to_ascii(domain)
    except DomainError as exc:
        raise ValueError(str(exc)) from None


def parse_host_port(
    value: str, default_port: int, *, what: str, allow_zero: bool = False
) -> HostPort:
    """``host``, ``host:port``, ``[host]``, ``[host]:port`` and ``[::1]:25``."""
    value = value.strip()
    if not value:
        raise ValueError(f"empty {what}")
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep:
            raise ValueError(f"invalid {what} {value!r}: missing ']'")
        if rest and not rest.startswith(":"):
            raise ValueError(f"invalid {what} {value!r}")
        port_text = rest[1:] if rest else ""
    elif value.count(":") == 1:
        host, port_text = value.split(":")
    elif ":" in value:
        raise ValueError(f"invalid {what} {value!r}: write IPv6 addresses as [addr]:port")
    else:
        host, port_text = value, ""
    host = host.strip()
    if not host:
        raise ValueError(f"invalid {what} {value!r}: empty host")
    if port_text:
        lowest = 0 if allow_zero else 1
        if not port_text.isdigit() or not lowest <= int(port_text) < 65536:
            raise ValueError(f"invalid {what} {value!r}: port must be 1-65535")
        port = int(port_text)
    else:
        port = default_port
    if ":" not in host:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if not _HOSTNAME.match(host):
                raise ValueError(f"invalid {what} {value!r}: bad host name") from None
    else:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"invalid {what} {value!r}: bad IPv6 address") from None
    return HostPort(host, port)


def _truthy(value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("", "0", "false", "no", "off", "n"):
        return False
    if text in ("1", "true", "yes", "on", "y"):
        return True
    raise ValueError(f"expected a boolean (1/0, true/false, yes/no), got {value!r}")


# ----------------------------------------------------------------------------- value parsers
# Each takes the raw value (a string from the environment or the .env file, or a Python value
# given to load_settings) and returns the typed value or raises ValueError with the reason; the
# loader puts the variable's name in front.

E = TypeVar("E", bound=Enum)


def _text(value: object) -> str:
    return str(value)


def _secret(value: object) -> SecretStr:
    return value if isinstance(value, SecretStr) else SecretStr(str(value))


def _path(value: object) -> Path:
    return value if isinstance(value, Path) else Path(str(value))


def _int(low: int, high: int | None = None) -> Callable[[object], int]:
    def parse(value: object) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        else:
            text = str(value).strip()
            if not re.fullmatch(r"[+-]?\d+", text):
                raise ValueError(f"invalid number {text!r} (a whole number is expected)")
            number = int(text)
        if number < low:
            raise ValueError(f"must be at least {low}, got {number}")
        if high is not None and number > high:
            raise ValueError(f"must be at most {high}, got {number}")
        return number

    return parse


def parse_choice(kind: type[E]) -> Callable[[object], E]:
    """A parser for one of ``kind``'s values, case-insensitive (settings, the routes file)."""

    def parse(value: object) -> E:
        if isinstance(value, kind):
            return value
        text = str(value).strip().lower()
        try:
            return kind(text)
        except ValueError:
            allowed = ", ".join(str(member.value) for member in kind)
            raise ValueError(f"invalid value {text!r} (use one of {allowed})") from None

    return parse


def _host_port(variable: str, default_port: int) -> Callable[[object], HostPort]:
    def parse(value: object) -> HostPort:
        if isinstance(value, HostPort):
            return value
        if isinstance(value, tuple):
            return HostPort(*value)
        return parse_host_port(str(value), default_port, what=variable)

    return parse


def _optional_address(default_port: int, *, off: Iterable[str] = ()) -> Callable[[object], Any]:
    """An optional ``host:port``; empty (or one of ``off``) means unset."""
    words = frozenset(off)

    def parse(value: object) -> HostPort | None:
        if isinstance(value, HostPort):
            return value
        text = str(value).strip()
        if not text or text.lower() in words:
            return None
        return parse_host_port(text, default_port, what="address")

    return parse


def _dns_servers(value: object) -> tuple[HostPort, ...]:
    return tuple(
        item if isinstance(item, HostPort) else parse_host_port(item, 53, what="DNS server")
        for item in split_list(value)
    )


def _workers(value: object) -> int:
    # auto: a second process pays off on a second core (see README, Performance); more do not
    # on a relay whose upstream is one host, and each costs memory.
    if isinstance(value, str) and value.strip().lower() == "auto":
        return min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
    return _int(1, 16)(value)


def _listen(value: object) -> tuple[ListenAddress, ...]:
    items = split_list(value)
    if not items:
        raise ValueError("at least one host:port is required")
    out = []
    for item in items:
        if isinstance(item, ListenAddress):
            out.append(item)
            continue
        text = str(item)
        tls = text.lower().startswith("tls://")
        if tls:
            text = text[len("tls://") :]
        elif "://" in text:
            raise ValueError(f"invalid address {text!r}: only tls:// may prefix an address")
        host, port = parse_host_port(text, 465 if tls else 25, what="address", allow_zero=True)
        out.append(ListenAddress(host, port, tls))
    return tuple(out)


def _domains(value: object) -> tuple[str, ...]:
    return tuple(normalize_domain(d) for d in split_list(value))


def _masquerade(value: object) -> tuple[str, ...]:
    out = []
    for entry in split_list(value):
        bang = entry.startswith("!")
        out.append(("!" if bang else "") + normalize_domain(entry.lstrip("!").lstrip(".")))
    return tuple(out)


def _mynetworks(value: object) -> tuple[IPNetwork, ...]:
    nets = []
    for item in split_list(value):
        text = str(item).replace("[", "").replace("]", "")
        try:
            nets.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise ValueError(f"invalid network {item!r} (use CIDR like 10.0.0.0/8)") from None
    return tuple(nets)


def _dkim_selector(value: object) -> str:
    from pyrelay.dkim import DKIMError, Selectors

    text = str(value or "").strip() or "mail"
    try:
        Selectors.parse(text)
    except DKIMError as exc:
        raise ValueError(str(exc)) from None
    return text


def _token_endpoint(value: object) -> str:
    text = str(value or "").strip()
    if text and not re.match(r"https?://[^/\s]+", text):
        raise ValueError(f"invalid URL {text!r} (use https://host/path)")
    return text


def _log_level(value: object) -> str:
    level = str(value).strip().lower()
    if level not in ("debug", "info", "warning", "error"):
        raise ValueError("must be one of debug, info, warning, error")
    return level


def _hostname(value: object) -> str:
    text = str(value or "").strip()
    if not text:
        return socket.getfqdn() or "localhost"
    if not _HOSTNAME.match(text):
        raise ValueError(f"invalid host name {text!r}")
    return text


def _bounce_from(value: object) -> str:
    text = str(value or "").strip()
    if not text:
        return ""
    local, at, domain = text.rpartition("@")
    if not at or not local or any(c.isspace() or c in "<>()," for c in text):
        raise ValueError(f"invalid address {text!r} (use local@domain)")
    if not local.isascii() or any(ord(c) < 32 or ord(c) == 127 for c in local):
        raise ValueError(f"invalid address {text!r} (ASCII local part only)")
    normalize_domain(domain)
    return text


# ------------------------------------------------------------------------------ Settings


def setting(*env: str, default: object, parse: Callable[[Any], object]) -> Any:
    """A field of ``Settings``: the variables that set it (the first is its name in dumps and
    errors; the others are accepted aliases, earlier ones winning), the value when none is set,
    and the parser (run on the default too; ``None`` stays ``None``)."""
    return field(metadata={"env": env, "default": default, "parse": parse})


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """The effective configuration (built by ``load_settings``; ``replace`` derives a copy)."""

    # Required, except with PYRELAY_DELIVERY=mx (checked in _cross_checks); unset is an
    # empty host.
    relayhost: HostPort = setting(
        "RELAYHOST", default=HostPort("", 0), parse=_host_port("RELAYHOST", 25)
    )
    relayhost_username: SecretStr = setting("RELAYHOST_USERNAME", default="", parse=_secret)
    relayhost_password: SecretStr = setting("RELAYHOST_PASSWORD", default="", parse=_secret)
    relayhost_username_file: Path | None = setting(
        "RELAYHOST_USERNAME_FILE", default=None, parse=_path
    )
    relayhost_password_file: Path | None = setting(
        "RELAYHOST_PASSWORD_FILE", default=None, parse=_path
    )
    # Routing (pyrelay.routes, pyrelay.mx): the default route's fallback relay (its
    # credentials default to RELAYHOST's), a routes file per sender domain, direct MX delivery.
    relayhost_fallback: HostPort | None = setting(
        "RELAYHOST_FALLBACK", default=None, parse=_host_port("RELAYHOST_FALLBACK", 25)
    )
    relayhost_fallback_username: SecretStr = setting(
        "RELAYHOST_FALLBACK_USERNAME", default="", parse=_secret
    )
    relayhost_fallback_password: SecretStr = setting(
        "RELAYHOST_FALLBACK_PASSWORD", default="", parse=_secret
    )
    relayhost_fallback_username_file: Path | None = setting(
        "RELAYHOST_FALLBACK_USERNAME_FILE", default=None, parse=_path
    )
    relayhost_fallback_password_file: Path | None = setting(
        "RELAYHOST_FALLBACK_PASSWORD_FILE", default=None, parse=_path
    )
    routes_file: Path | None = setting("PYRELAY_ROUTES_FILE", default=None, parse=_path)
    delivery: DeliveryMode = setting(
        "PYRELAY_DELIVERY", default=DeliveryMode.RELAY, parse=parse_choice(DeliveryMode)
    )
    dns_servers: tuple[HostPort, ...] = setting(
        "PYRELAY_DNS_SERVERS", default=(), parse=_dns_servers
    )
    mx_port: int = setting("PYRELAY_MX_PORT", default=25, parse=_int(1, 65535))
    tls_level: TLSLevel = setting(
        "RELAYHOST_TLS_LEVEL",
        "POSTFIX_smtp_tls_security_level",
        default=TLSLevel.SECURE,
        parse=parse_choice(TLSLevel),
    )
    tls_ca_file: Path | None = setting("RELAYHOST_TLS_CA_FILE", default=None, parse=_path)

    allowed_sender_domains: tuple[str, ...] = setting(
        "ALLOWED_SENDER_DOMAINS", default=(), parse=_domains
    )
    allow_empty_sender_domains: bool = setting(
        "ALLOW_EMPTY_SENDER_DOMAINS", default=False, parse=_truthy
    )
    allow_null_sender: bool = setting("PYRELAY_ALLOW_NULL_SENDER", default=False, parse=_truthy)
    masquerade_domains: tuple[str, ...] = setting(
        "MASQUERADED_DOMAINS",
        "MASQUERADE_DOMAINS",
        "POSTFIX_masquerade_domains",
        default=(),
        parse=_masquerade,
    )
    mynetworks: tuple[IPNetwork, ...] = setting(
        "MYNETWORKS", "POSTFIX_mynetworks", default=DEFAULT_MYNETWORKS, parse=_mynetworks
    )
    message_size_limit: int = setting(
        "MESSAGE_SIZE_LIMIT", "POSTFIX_message_size_limit", default=10_240_000, parse=_int(0)
    )

    listen: tuple[ListenAddress, ...] = setting(
        "PYRELAY_LISTEN", default="0.0.0.0:25 0.0.0.0:587", parse=_listen
    )
    # The listener's TLS and AUTH (Postfix smtpd_tls_*, smtpd_sasl_*; boky's SMTPD_SASL_USERS).
    # None until resolved: `may` with a certificate, otherwise `none`.
    smtpd_tls_level: SmtpdTLSLevel | None = setting(
        "PYRELAY_SMTPD_TLS_LEVEL",
        "POSTFIX_smtpd_tls_security_level",
        default=None,
        parse=parse_choice(SmtpdTLSLevel),
    )
    tls_cert_file: Path | None = setting(
        "PYRELAY_TLS_CERT_FILE", "POSTFIX_smtpd_tls_cert_file", default=None, parse=_path
    )
    tls_key_file: Path | None = setting(
        "PYRELAY_TLS_KEY_FILE", "POSTFIX_smtpd_tls_key_file", default=None, parse=_path
    )
    smtpd_sasl_users: SecretStr = setting("SMTPD_SASL_USERS", default="", parse=_secret)
    smtpd_sasl_users_file: Path | None = setting("SMTPD_SASL_USERS_FILE", default=None, parse=_path)
    smtpd_users_file: Path | None = setting("PYRELAY_SMTPD_USERS_FILE", default=None, parse=_path)
    spool_dir: Path = setting("PYRELAY_SPOOL_DIR", default=Path("/var/spool/pyrelay"), parse=_path)
    hostname: str = setting("PYRELAY_HOSTNAME", "POSTFIX_myhostname", default="", parse=_hostname)
    workers: int = setting("PYRELAY_WORKERS", default="auto", parse=_workers)
    concurrency: int = setting("PYRELAY_CONCURRENCY", default=20, parse=_int(1, 1000))
    min_backoff: float = setting("PYRELAY_MIN_BACKOFF", default=300.0, parse=parse_duration)
    max_backoff: float = setting("PYRELAY_MAX_BACKOFF", default=4000.0, parse=parse_duration)
    queue_lifetime: float = setting(
        "PYRELAY_QUEUE_LIFETIME", default=5 * 86400.0, parse=parse_duration
    )
    log_format: LogFormat = setting(
        "PYRELAY_LOG_FORMAT", default=LogFormat.CONSOLE, parse=parse_choice(LogFormat)
    )
    log_level: str = setting("PYRELAY_LOG_LEVEL", default="info", parse=_log_level)
    # /metrics, /healthz, /readyz (pyrelay.http); PYRELAY_METRICS_LISTEN is the older name.
    metrics_listen: HostPort | None = setting(
        "PYRELAY_HTTP_LISTEN",
        "PYRELAY_METRICS_LISTEN",
        default=None,
        parse=_optional_address(9025, off=("off", "no", "0", "false")),
    )
    # Where a drain that timed out hands the rest of the queue (pyrelay.handoff); a peer relay.
    handoff_to: HostPort | None = setting(
        "PYRELAY_HANDOFF_TO", default=None, parse=_optional_address(25)
    )
    # How long a drain reports "not ready" before it closes the listener.
    drain_grace: float = setting("PYRELAY_DRAIN_GRACE", default=5.0, parse=parse_duration)
    # The header From: of bounces; empty means MAILER-DAEMON@<hostname>.
    bounce_from: str = setting("PYRELAY_BOUNCE_FROM", default="", parse=_bounce_from)
    # DKIM signing (pyrelay.dkim), boky/postfix's names.
    dkim_selector: str = setting("DKIM_SELECTOR", default="mail", parse=_dkim_selector)
    dkim_autogenerate: bool = setting("DKIM_AUTOGENERATE", default=False, parse=_truthy)
    dkim_key_dir: Path | None = setting("PYRELAY_DKIM_KEY_DIR", default=None, parse=_path)

    # XOAUTH2 upstream authentication (pyrelay.xoauth2), boky/postfix's names; the mailbox is
    # RELAYHOST_USERNAME.
    xoauth2_client_id: SecretStr = setting("XOAUTH2_CLIENT_ID", default="", parse=_secret)
    xoauth2_secret: SecretStr = setting("XOAUTH2_SECRET", default="", parse=_secret)
    xoauth2_initial_access_token: SecretStr = setting(
        "XOAUTH2_INITIAL_ACCESS_TOKEN", default="", parse=_secret
    )
    xoauth2_initial_refresh_token: SecretStr = setting(
        "XOAUTH2_INITIAL_REFRESH_TOKEN", default="", parse=_secret
    )
    xoauth2_token_endpoint: str = setting(
        "XOAUTH2_TOKEN_ENDPOINT", default="", parse=_token_endpoint
    )
    xoauth2_client_id_file: Path | None = setting(
        "XOAUTH2_CLIENT_ID_FILE", default=None, parse=_path
    )
    xoauth2_secret_file: Path | None = setting("XOAUTH2_SECRET_FILE", default=None, parse=_path)
    xoauth2_initial_access_token_file: Path | None = setting(
        "XOAUTH2_INITIAL_ACCESS_TOKEN_FILE", default=None, parse=_path
    )
    xoauth2_initial_refresh_token_file: Path | None = setting(
        "XOAUTH2_INITIAL_REFRESH_TOKEN_FILE", default=None, parse=_path
    )

    # Shown by `pyrelay config`; read by load_settings before the other values.
    env_file: Path | None = setting("PYRELAY_ENV_FILE", default=None, parse=_path)

    # Limits on clients (Postfix smtpd_recipient_limit, smtpd_timeout, process limit).
    max_recipients: int = setting("PYRELAY_MAX_RECIPIENTS", default=1000, parse=_int(1))
    max_connections: int = setting("PYRELAY_MAX_CONNECTIONS", default=200, parse=_int(1))
    max_commands: int = setting("PYRELAY_MAX_COMMANDS", default=10000, parse=_int(10))
    # Postfix smtpd_client_connection_count_limit (0 = unlimited) and smtpd_junk_command_limit.
    max_connections_per_client: int = setting(
        "PYRELAY_MAX_CONNECTIONS_PER_CLIENT",
        "POSTFIX_smtpd_client_connection_count_limit",
        default=50,
        parse=_int(0),
    )
    junk_command_limit: int = setting(
        "PYRELAY_JUNK_COMMAND_LIMIT",
        "POSTFIX_smtpd_junk_command_limit",
        default=100,
        parse=_int(0),
    )
    command_timeout: float = setting("PYRELAY_COMMAND_TIMEOUT", default=300.0, parse=parse_duration)
    session_timeout: float = setting(
        "PYRELAY_SESSION_TIMEOUT", default=3600.0, parse=parse_duration
    )
    shutdown_grace: float = setting("PYRELAY_SHUTDOWN_GRACE", default=10.0, parse=parse_duration)

    # Upstream client timeouts (Postfix smtp_connect_timeout, smtp_*_timeout).
    upstream_connect_timeout: float = setting(
        "PYRELAY_UPSTREAM_CONNECT_TIMEOUT", default=30.0, parse=parse_duration
    )
    upstream_command_timeout: float = setting(
        "PYRELAY_UPSTREAM_COMMAND_TIMEOUT", default=300.0, parse=parse_duration
    )
    upstream_data_timeout: float = setting(
        "PYRELAY_UPSTREAM_DATA_TIMEOUT", default=600.0, parse=parse_duration
    )
    upstream_idle_timeout: float = setting(
        "PYRELAY_UPSTREAM_IDLE_TIMEOUT", default=5.0, parse=parse_duration
    )

    def replace(self, **changes: Any) -> Settings:
        """A copy with ``changes`` (typed values, not parsed: for code, not for operators)."""
        return replace(self, **changes)

    @property
    def xoauth2(self) -> bool:
        """XOAUTH2 instead of a password (``XOAUTH2_CLIENT_ID`` set)."""
        return bool(self.xoauth2_client_id.get_secret_value())

    @property
    def token_endpoint(self) -> str:
        """``XOAUTH2_TOKEN_ENDPOINT``, or the documented one of a known provider's RELAYHOST."""
        if self.xoauth2_token_endpoint:
            return self.xoauth2_token_endpoint
        host = self.relayhost.host.lower()
        for suffix, url in TOKEN_ENDPOINTS.items():
            if host == suffix or host.endswith("." + suffix):
                return url
        return ""

    @property
    def has_credentials(self) -> bool:
        return bool(self.relayhost_username.get_secret_value())

    @property
    def smtpd_tls(self) -> SmtpdTLSLevel:
        """The listener's STARTTLS level, resolved (``smtpd_tls_level`` is set by
        ``load_settings``; this spares callers the ``None`` check)."""
        return self.smtpd_tls_level or SmtpdTLSLevel.NONE

    @property
    def implicit_tls(self) -> bool:
        """Port 465 is SMTPS (implicit TLS); every other port uses STARTTLS."""
        return self.relayhost.port == 465

    def dump(self) -> dict[str, str]:
        """The effective configuration keyed by environment variable, secrets masked."""
        out: dict[str, str] = {}
        for name, variables in ENV_NAMES.items():
            if name.endswith("_file") and name.removesuffix("_file") in SECRET_FIELDS:
                continue
            out[variables[0]] = _render(getattr(self, name), secret=name in MASKED_FIELDS)
        return out


# Field name -> the variables that set it, the first being its name (from Settings' fields).
ENV_NAMES: dict[str, tuple[str, ...]] = {f.name: f.metadata["env"] for f in fields(Settings)}


def _render(value: object, *, secret: bool = False) -> str:
    if isinstance(value, SecretStr):
        raw = value.get_secret_value()
        return (MASK if raw else "") if secret else raw
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, HostPort) and not value.host:
        return ""
    if isinstance(value, tuple) and not isinstance(value, HostPort):
        return " ".join(str(v) for v in value)
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:g}s"
    return str(value)


# ------------------------------------------------------------------------------ loading


def _cross_checks(s: Settings) -> Settings:
    """What no single variable decides: *_FILE secrets, defaults that depend on other values,
    and combinations that cannot work.  Returns the completed settings."""
    changes: dict[str, object] = {}
    if not s.bounce_from:
        changes["bounce_from"] = f"MAILER-DAEMON@{s.hostname}"
    for name in SECRET_FIELDS:
        path: Path | None = getattr(s, f"{name}_file")
        if path is None:
            continue
        env = name.upper()
        if getattr(s, name).get_secret_value():
            raise ConfigError(f"{env}_FILE: set {env} or {env}_FILE, not both")
        try:
            secret = path.read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise ConfigError(f"{env}_FILE: cannot read {path}: {exc.strerror}") from None
        changes[name] = SecretStr(secret)
    if s.tls_key_file is not None and s.tls_cert_file is None:
        raise ConfigError("PYRELAY_TLS_KEY_FILE: set PYRELAY_TLS_CERT_FILE too")
    if s.smtpd_tls_level is None:
        level = SmtpdTLSLevel.MAY if s.tls_cert_file is not None else SmtpdTLSLevel.NONE
        changes["smtpd_tls_level"] = level
    s = s.replace(**changes)
    if s.delivery is DeliveryMode.MX:
        if s.relayhost.host:
            raise ConfigError(
                "PYRELAY_DELIVERY: mx delivers to the recipients' MX hosts; unset RELAYHOST "
                "(or unset PYRELAY_DELIVERY to relay through it)"
            )
    elif not s.relayhost.host:
        raise ConfigError("RELAYHOST: required but not set")
    fb_user = s.relayhost_fallback_username.get_secret_value()
    fb_password = s.relayhost_fallback_password.get_secret_value()
    if bool(fb_user) != bool(fb_password):
        missing = "RELAYHOST_FALLBACK_PASSWORD" if fb_user else "RELAYHOST_FALLBACK_USERNAME"
        raise ConfigError(f"{missing}: required when the other credential is set")
    user = s.relayhost_username.get_secret_value()
    password = s.relayhost_password.get_secret_value()
    if s.xoauth2:
        if not user:
            raise ConfigError("RELAYHOST_USERNAME: required with XOAUTH2 (the mailbox)")
        if not s.token_endpoint:
            raise ConfigError("XOAUTH2_TOKEN_ENDPOINT: required (no default for this RELAYHOST)")
    elif bool(user) != bool(password):
        missing = "RELAYHOST_PASSWORD" if user else "RELAYHOST_USERNAME"
        raise ConfigError(f"{missing}: required when the other credential is set")
    if not s.allowed_sender_domains and not s.allow_empty_sender_domains:
        raise ConfigError(
            "ALLOWED_SENDER_DOMAINS: required (or set ALLOW_EMPTY_SENDER_DOMAINS=true "
            "to accept any sender domain)"
        )
    if s.min_backoff > s.max_backoff:
        raise ConfigError("PYRELAY_MIN_BACKOFF: must not exceed PYRELAY_MAX_BACKOFF")
    if s.tls_ca_file is not None and not s.tls_ca_file.is_file():
        raise ConfigError(f"RELAYHOST_TLS_CA_FILE: no such file {s.tls_ca_file}")
    return s


def build_settings(
    given: Mapping[str, object], environ: Mapping[str, str], env_file: Mapping[str, str]
) -> Settings:
    """Parse every field from, in this order, ``given`` (by field or variable name), the
    environment, the ``.env`` file's values, and its default; ``ConfigError`` names the
    variable.  Names match case-insensitively, and an empty value means unset (compose files
    often write ``VAR=``)."""
    given = {k.lower(): v for k, v in given.items()}
    sources = [
        {k.lower(): v for k, v in source.items() if v != ""} for source in (environ, env_file)
    ]
    values: dict[str, Any] = {}  # typed by each field's parser
    for f in fields(Settings):
        variables: tuple[str, ...] = f.metadata["env"]
        name, raw = _lookup(f.name, variables, given, sources)
        if name is None:
            name, raw = variables[0], f.metadata["default"]
        try:
            values[f.name] = None if raw is None else f.metadata["parse"](raw)
        except ValueError as exc:
            raise ConfigError(f"{name}: {exc}") from None
    return _cross_checks(Settings(**values))


def _lookup(
    field_name: str,
    variables: tuple[str, ...],
    given: Mapping[str, object],
    sources: list[dict[str, str]],
) -> tuple[str | None, object]:
    for key in (field_name, *variables):
        if key.lower() in given:
            return (key if key in variables else variables[0]), given[key.lower()]
    for source in sources:
        for variable in variables:
            if variable.lower() in source:
                return variable, source[variable.lower()]
    return None, None


_ENV_LINE = re.compile(r"^(?:export\s+)?([A-Za-z_][A-Za-z0-9_.]*)\s*=\s*(.*)$")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\", "$": "$"}


def read_env_file(path: Path) -> dict[str, str]:
    """``NAME=value`` lines (the usual ``.env`` syntax: ``export`` allowed, ``#`` comments,
    single quotes literal, double quotes with ``\\n``-style escapes).  A line that is not an
    assignment is an error naming the line: a typo must not silently unset a variable."""
    values: dict[str, str] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"PYRELAY_ENV_FILE: cannot read {path}: {reason}") from None
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        match = _ENV_LINE.match(stripped)
        value = _env_value(match.group(2)) if match else None
        if match is None or value is None:
            raise ConfigError(f"PYRELAY_ENV_FILE: {path} line {number}: expected NAME=value")
        values[match.group(1)] = value
    return values


def _env_value(text: str) -> str | None:
    """The value of one assignment, or None when its quotes are not closed."""
    if text[:1] == "'":
        end = text.find("'", 1)
        return None if end < 0 or text[end + 1 :].strip()[:1] not in ("", "#") else text[1:end]
    if text[:1] == '"':
        out, i = [], 1
        while i < len(text):
            char = text[i]
            if char == "\\" and i + 1 < len(text):
                out.append(_ESCAPES.get(text[i + 1], "\\" + text[i + 1]))
                i += 2
                continue
            if char == '"':
                return "".join(out) if text[i + 1 :].strip()[:1] in ("", "#") else None
            out.append(char)
            i += 1
        return None
    return re.sub(r"\s+#.*$", "", text).strip()


def env_file_from_environment(environ: Mapping[str, str] | None = None) -> Path | None:
    """``PYRELAY_ENV_FILE`` if set (and not empty); it must name a readable file."""
    name = (os.environ if environ is None else environ).get("PYRELAY_ENV_FILE", "").strip()
    if not name:
        return None
    path = Path(name)
    if not path.is_file():
        raise ConfigError(f"PYRELAY_ENV_FILE: no such file {path}")
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise ConfigError(f"PYRELAY_ENV_FILE: cannot read {path}: {exc.strerror}") from None
    return path


_FROM_ENVIRONMENT: Any = object()


def load_settings(
    _env_file: Path | None = _FROM_ENVIRONMENT,
    _environ: Mapping[str, str] | None = None,
    **overrides: object,
) -> Settings:
    """Build ``Settings`` from the environment (``_environ``, default ``os.environ``), the
    ``.env`` file (``_env_file``, default ``PYRELAY_ENV_FILE``) and ``overrides`` (by field
    name, winning over both); raise ``ConfigError`` with one clear line."""
    environ = os.environ if _environ is None else _environ
    if _env_file is _FROM_ENVIRONMENT:
        _env_file = env_file_from_environment(environ)
    env_file = read_env_file(_env_file) if _env_file is not None else {}
    return build_settings(overrides, environ, env_file)


def known_env_names() -> set[str]:
    """Every environment variable name Settings reads (lowercased)."""
    return {variable.lower() for variables in ENV_NAMES.values() for variable in variables}
