"""Settings from the environment (and a ``.env`` file only when ``PYRELAY_ENV_FILE`` names one).

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
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, NamedTuple

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict, SettingsError

from pyrelay.domains import DomainError, to_ascii
from pyrelay.errors import ConfigError

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


ListSetting = Annotated[tuple[str, ...], NoDecode]


class Settings(BaseSettings):
    """The effective configuration.  Field aliases are the environment variable names."""

    model_config = SettingsConfigDict(
        # Never a .env from the working directory (in the image that is the spool volume):
        # load_settings passes PYRELAY_ENV_FILE when it is set.
        env_file=None,
        env_file_encoding="utf-8",
        # VAR= means unset (compose files often write empty values), not an empty value.
        env_ignore_empty=True,
        extra="ignore",
        populate_by_name=True,
        case_sensitive=False,
        frozen=True,
    )

    # Required, except with PYRELAY_DELIVERY=mx (checked in _cross_checks); unset is an
    # empty host.
    relayhost: Annotated[HostPort, NoDecode] = Field(
        default=HostPort("", 0), validation_alias=AliasChoices("RELAYHOST", "relayhost")
    )
    relayhost_username: SecretStr = Field(
        default=SecretStr(""), validation_alias=AliasChoices("RELAYHOST_USERNAME")
    )
    relayhost_password: SecretStr = Field(
        default=SecretStr(""), validation_alias=AliasChoices("RELAYHOST_PASSWORD")
    )
    relayhost_username_file: Path | None = Field(
        default=None, validation_alias=AliasChoices("RELAYHOST_USERNAME_FILE")
    )
    relayhost_password_file: Path | None = Field(
        default=None, validation_alias=AliasChoices("RELAYHOST_PASSWORD_FILE")
    )
    # Routing (pyrelay.routes, pyrelay.mx): the default route's fallback relay (its
    # credentials default to RELAYHOST's), a routes file per sender domain, direct MX delivery.
    relayhost_fallback: Annotated[HostPort | None, NoDecode] = Field(
        default=None, validation_alias=AliasChoices("RELAYHOST_FALLBACK")
    )
    relayhost_fallback_username: SecretStr = Field(
        default=SecretStr(""), validation_alias=AliasChoices("RELAYHOST_FALLBACK_USERNAME")
    )
    relayhost_fallback_password: SecretStr = Field(
        default=SecretStr(""), validation_alias=AliasChoices("RELAYHOST_FALLBACK_PASSWORD")
    )
    relayhost_fallback_username_file: Path | None = Field(
        default=None, validation_alias=AliasChoices("RELAYHOST_FALLBACK_USERNAME_FILE")
    )
    relayhost_fallback_password_file: Path | None = Field(
        default=None, validation_alias=AliasChoices("RELAYHOST_FALLBACK_PASSWORD_FILE")
    )
    routes_file: Path | None = Field(
        default=None, validation_alias=AliasChoices("PYRELAY_ROUTES_FILE")
    )
    delivery: DeliveryMode = Field(
        default=DeliveryMode.RELAY, validation_alias=AliasChoices("PYRELAY_DELIVERY")
    )
    dns_servers: Annotated[tuple[HostPort, ...], NoDecode] = Field(
        default=(), validation_alias=AliasChoices("PYRELAY_DNS_SERVERS")
    )
    mx_port: int = Field(
        default=25, ge=1, le=65535, validation_alias=AliasChoices("PYRELAY_MX_PORT")
    )
    tls_level: TLSLevel = Field(
        default=TLSLevel.SECURE,
        validation_alias=AliasChoices("RELAYHOST_TLS_LEVEL", "POSTFIX_smtp_tls_security_level"),
    )
    tls_ca_file: Path | None = Field(
        default=None, validation_alias=AliasChoices("RELAYHOST_TLS_CA_FILE")
    )

    allowed_sender_domains: ListSetting = Field(
        default=(), validation_alias=AliasChoices("ALLOWED_SENDER_DOMAINS")
    )
    allow_empty_sender_domains: bool = Field(
        default=False, validation_alias=AliasChoices("ALLOW_EMPTY_SENDER_DOMAINS")
    )
    allow_null_sender: bool = Field(
        default=False, validation_alias=AliasChoices("PYRELAY_ALLOW_NULL_SENDER")
    )
    masquerade_domains: ListSetting = Field(
        default=(),
        validation_alias=AliasChoices(
            "MASQUERADED_DOMAINS", "MASQUERADE_DOMAINS", "POSTFIX_masquerade_domains"
        ),
    )
    mynetworks: Annotated[tuple[IPNetwork, ...], NoDecode] = Field(
        default=DEFAULT_MYNETWORKS,  # type: ignore[arg-type]
        validation_alias=AliasChoices("MYNETWORKS", "POSTFIX_mynetworks"),
    )
    message_size_limit: int = Field(
        default=10_240_000,
        ge=0,
        validation_alias=AliasChoices("MESSAGE_SIZE_LIMIT", "POSTFIX_message_size_limit"),
    )

    listen: Annotated[tuple[ListenAddress, ...], NoDecode] = Field(
        default="0.0.0.0:25 0.0.0.0:587",  # type: ignore[arg-type]
        validation_alias=AliasChoices("PYRELAY_LISTEN"),
    )
    # The listener's TLS and AUTH (Postfix smtpd_tls_*, smtpd_sasl_*; boky's SMTPD_SASL_USERS).
    # None until resolved: `may` with a certificate, otherwise `none`.
    smtpd_tls_level: SmtpdTLSLevel | None = Field(
        default=None,
        validation_alias=AliasChoices(
            "PYRELAY_SMTPD_TLS_LEVEL", "POSTFIX_smtpd_tls_security_level"
        ),
    )
    tls_cert_file: Path | None = Field(
        default=None,
        validation_alias=AliasChoices("PYRELAY_TLS_CERT_FILE", "POSTFIX_smtpd_tls_cert_file"),
    )
    tls_key_file: Path | None = Field(
        default=None,
        validation_alias=AliasChoices("PYRELAY_TLS_KEY_FILE", "POSTFIX_smtpd_tls_key_file"),
    )
    smtpd_sasl_users: SecretStr = Field(
        default=SecretStr(""), validation_alias=AliasChoices("SMTPD_SASL_USERS")
    )
    smtpd_sasl_users_file: Path | None = Field(
        default=None, validation_alias=AliasChoices("SMTPD_SASL_USERS_FILE")
    )
    smtpd_users_file: Path | None = Field(
        default=None, validation_alias=AliasChoices("PYRELAY_SMTPD_USERS_FILE")
    )
    spool_dir: Path = Field(
        default=Path("/var/spool/pyrelay"), validation_alias=AliasChoices("PYRELAY_SPOOL_DIR")
    )
    hostname: str = Field(
        default="", validation_alias=AliasChoices("PYRELAY_HOSTNAME", "POSTFIX_myhostname")
    )
    workers: int = Field(  # type: ignore[assignment]
        default="auto",
        ge=1,
        le=16,
        validation_alias=AliasChoices("PYRELAY_WORKERS"),
    )
    concurrency: int = Field(
        default=20, ge=1, le=1000, validation_alias=AliasChoices("PYRELAY_CONCURRENCY")
    )
    min_backoff: float = Field(default=300.0, validation_alias=AliasChoices("PYRELAY_MIN_BACKOFF"))
    max_backoff: float = Field(default=4000.0, validation_alias=AliasChoices("PYRELAY_MAX_BACKOFF"))
    queue_lifetime: float = Field(
        default=5 * 86400.0, validation_alias=AliasChoices("PYRELAY_QUEUE_LIFETIME")
    )
    log_format: LogFormat = Field(
        default=LogFormat.CONSOLE, validation_alias=AliasChoices("PYRELAY_LOG_FORMAT")
    )
    log_level: str = Field(default="info", validation_alias=AliasChoices("PYRELAY_LOG_LEVEL"))
    # /metrics, /healthz, /readyz (pyrelay.http); PYRELAY_METRICS_LISTEN is the older name.
    metrics_listen: Annotated[HostPort | None, NoDecode] = Field(
        default=None, validation_alias=AliasChoices("PYRELAY_HTTP_LISTEN", "PYRELAY_METRICS_LISTEN")
    )
    # Where a drain that timed out hands the rest of the queue (pyrelay.handoff); a peer relay.
    handoff_to: Annotated[HostPort | None, NoDecode] = Field(
        default=None, validation_alias=AliasChoices("PYRELAY_HANDOFF_TO")
    )
    # How long a drain reports "not ready" before it closes the listener.
    drain_grace: float = Field(default=5.0, validation_alias=AliasChoices("PYRELAY_DRAIN_GRACE"))
    # The header From: of bounces; empty means MAILER-DAEMON@<hostname>.
    bounce_from: str = Field(default="", validation_alias=AliasChoices("PYRELAY_BOUNCE_FROM"))
    # DKIM signing (pyrelay.dkim), boky/postfix's names.
    dkim_selector: str = Field(default="mail", validation_alias=AliasChoices("DKIM_SELECTOR"))
    dkim_autogenerate: bool = Field(
        default=False, validation_alias=AliasChoices("DKIM_AUTOGENERATE")
    )
    dkim_key_dir: Path | None = Field(
        default=None, validation_alias=AliasChoices("PYRELAY_DKIM_KEY_DIR")
    )

    # XOAUTH2 upstream authentication (pyrelay.xoauth2), boky/postfix's names; the mailbox is
    # RELAYHOST_USERNAME.
    xoauth2_client_id: SecretStr = Field(
        default=SecretStr(""), validation_alias=AliasChoices("XOAUTH2_CLIENT_ID")
    )
    xoauth2_secret: SecretStr = Field(
        default=SecretStr(""), validation_alias=AliasChoices("XOAUTH2_SECRET")
    )
    xoauth2_initial_access_token: SecretStr = Field(
        default=SecretStr(""), validation_alias=AliasChoices("XOAUTH2_INITIAL_ACCESS_TOKEN")
    )
    xoauth2_initial_refresh_token: SecretStr = Field(
        default=SecretStr(""), validation_alias=AliasChoices("XOAUTH2_INITIAL_REFRESH_TOKEN")
    )
    xoauth2_token_endpoint: str = Field(
        default="", validation_alias=AliasChoices("XOAUTH2_TOKEN_ENDPOINT")
    )
    xoauth2_client_id_file: Path | None = Field(
        default=None, validation_alias=AliasChoices("XOAUTH2_CLIENT_ID_FILE")
    )
    xoauth2_secret_file: Path | None = Field(
        default=None, validation_alias=AliasChoices("XOAUTH2_SECRET_FILE")
    )
    xoauth2_initial_access_token_file: Path | None = Field(
        default=None, validation_alias=AliasChoices("XOAUTH2_INITIAL_ACCESS_TOKEN_FILE")
    )
    xoauth2_initial_refresh_token_file: Path | None = Field(
        default=None, validation_alias=AliasChoices("XOAUTH2_INITIAL_REFRESH_TOKEN_FILE")
    )

    # Shown by `pyrelay config`; read by load_settings before the other values.
    env_file: Path | None = Field(default=None, validation_alias=AliasChoices("PYRELAY_ENV_FILE"))

    # Limits on clients (Postfix smtpd_recipient_limit, smtpd_timeout, process limit).
    max_recipients: int = Field(
        default=1000, ge=1, validation_alias=AliasChoices("PYRELAY_MAX_RECIPIENTS")
    )
    max_connections: int = Field(
        default=200, ge=1, validation_alias=AliasChoices("PYRELAY_MAX_CONNECTIONS")
    )
    max_commands: int = Field(
        default=10000, ge=10, validation_alias=AliasChoices("PYRELAY_MAX_COMMANDS")
    )
    # Postfix smtpd_client_connection_count_limit (0 = unlimited) and smtpd_junk_command_limit.
    max_connections_per_client: int = Field(
        default=50,
        ge=0,
        validation_alias=AliasChoices(
            "PYRELAY_MAX_CONNECTIONS_PER_CLIENT", "POSTFIX_smtpd_client_connection_count_limit"
        ),
    )
    junk_command_limit: int = Field(
        default=100,
        ge=0,
        validation_alias=AliasChoices(
            "PYRELAY_JUNK_COMMAND_LIMIT", "POSTFIX_smtpd_junk_command_limit"
        ),
    )
    command_timeout: float = Field(
        default=300.0, validation_alias=AliasChoices("PYRELAY_COMMAND_TIMEOUT")
    )
    session_timeout: float = Field(
        default=3600.0, validation_alias=AliasChoices("PYRELAY_SESSION_TIMEOUT")
    )
    shutdown_grace: float = Field(
        default=10.0, validation_alias=AliasChoices("PYRELAY_SHUTDOWN_GRACE")
    )

    # Upstream client timeouts (Postfix smtp_connect_timeout, smtp_*_timeout).
    upstream_connect_timeout: float = Field(
        default=30.0, validation_alias=AliasChoices("PYRELAY_UPSTREAM_CONNECT_TIMEOUT")
    )
    upstream_command_timeout: float = Field(
        default=300.0, validation_alias=AliasChoices("PYRELAY_UPSTREAM_COMMAND_TIMEOUT")
    )
    upstream_data_timeout: float = Field(
        default=600.0, validation_alias=AliasChoices("PYRELAY_UPSTREAM_DATA_TIMEOUT")
    )
    upstream_idle_timeout: float = Field(
        default=5.0, validation_alias=AliasChoices("PYRELAY_UPSTREAM_IDLE_TIMEOUT")
    )

    @field_validator("relayhost", mode="before")
    @classmethod
    def _relayhost(cls, value: object) -> HostPort:
        if isinstance(value, HostPort):
            return value
        if isinstance(value, tuple):
            return HostPort(*value)
        return parse_host_port(str(value), 25, what="RELAYHOST")

    @field_validator("relayhost_fallback", mode="before")
    @classmethod
    def _fallback(cls, value: object) -> HostPort | None:
        if value is None or isinstance(value, HostPort):
            return value
        if isinstance(value, tuple):
            return HostPort(*value)
        return parse_host_port(str(value), 25, what="RELAYHOST_FALLBACK")

    @field_validator("dns_servers", mode="before")
    @classmethod
    def _dns_servers(cls, value: object) -> tuple[HostPort, ...]:
        return tuple(
            item if isinstance(item, HostPort) else parse_host_port(item, 53, what="DNS server")
            for item in split_list(value)
        )

    @field_validator("workers", mode="before")
    @classmethod
    def _workers(cls, value: object) -> object:
        # auto: a second process pays off on a second core (see README, Performance); more do
        # not on a relay whose upstream is one host, and each costs memory.
        if isinstance(value, str) and value.strip().lower() == "auto":
            return min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
        return value

    @field_validator("metrics_listen", mode="before")
    @classmethod
    def _metrics_listen(cls, value: object) -> HostPort | None:
        if value is None or isinstance(value, HostPort):
            return value
        text = str(value).strip()
        if text.lower() in ("", "off", "no", "0", "false"):
            return None
        return parse_host_port(text, 9025, what="address")

    @field_validator("handoff_to", mode="before")
    @classmethod
    def _handoff_to(cls, value: object) -> HostPort | None:
        if value is None or isinstance(value, HostPort):
            return value
        text = str(value).strip()
        if not text:
            return None
        return parse_host_port(text, 25, what="address")

    @field_validator("listen", mode="before")
    @classmethod
    def _listen(cls, value: object) -> tuple[ListenAddress, ...]:
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

    @field_validator("allowed_sender_domains", mode="before")
    @classmethod
    def _domains(cls, value: object) -> tuple[str, ...]:
        return tuple(normalize_domain(d) for d in split_list(value))

    @field_validator("masquerade_domains", mode="before")
    @classmethod
    def _masquerade(cls, value: object) -> tuple[str, ...]:
        out = []
        for entry in split_list(value):
            bang = entry.startswith("!")
            out.append(("!" if bang else "") + normalize_domain(entry.lstrip("!").lstrip(".")))
        return tuple(out)

    @field_validator("mynetworks", mode="before")
    @classmethod
    def _mynetworks(cls, value: object) -> tuple[IPNetwork, ...]:
        nets = []
        for item in split_list(value):
            text = str(item).replace("[", "").replace("]", "")
            try:
                nets.append(ipaddress.ip_network(text, strict=False))
            except ValueError:
                raise ValueError(f"invalid network {item!r} (use CIDR like 10.0.0.0/8)") from None
        return tuple(nets)

    @field_validator("dkim_selector", mode="before")
    @classmethod
    def _dkim_selector(cls, value: object) -> str:
        from pyrelay.dkim import DKIMError, Selectors

        text = str(value or "").strip() or "mail"
        try:
            Selectors.parse(text)
        except DKIMError as exc:
            raise ValueError(str(exc)) from None
        return text

    @field_validator("xoauth2_token_endpoint", mode="before")
    @classmethod
    def _token_endpoint(cls, value: object) -> str:
        text = str(value or "").strip()
        if text and not re.match(r"https?://[^/\s]+", text):
            raise ValueError(f"invalid URL {text!r} (use https://host/path)")
        return text

    @field_validator(
        "allow_empty_sender_domains", "allow_null_sender", "dkim_autogenerate", mode="before"
    )
    @classmethod
    def _bool(cls, value: object) -> bool:
        return _truthy(value)

    @field_validator(
        "min_backoff",
        "max_backoff",
        "queue_lifetime",
        "command_timeout",
        "session_timeout",
        "shutdown_grace",
        "drain_grace",
        "upstream_connect_timeout",
        "upstream_command_timeout",
        "upstream_data_timeout",
        "upstream_idle_timeout",
        mode="before",
    )
    @classmethod
    def _duration(cls, value: object) -> float:
        return parse_duration(value)

    @field_validator("tls_level", "log_format", "smtpd_tls_level", "delivery", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("log_level", mode="before")
    @classmethod
    def _log_level(cls, value: object) -> str:
        level = str(value).strip().lower()
        if level not in ("debug", "info", "warning", "error"):
            raise ValueError("must be one of debug, info, warning, error")
        return level

    @field_validator("hostname", mode="before")
    @classmethod
    def _hostname(cls, value: object) -> str:
        text = str(value or "").strip()
        if not text:
            return socket.getfqdn() or "localhost"
        if not _HOSTNAME.match(text):
            raise ValueError(f"invalid host name {text!r}")
        return text

    @field_validator("bounce_from", mode="before")
    @classmethod
    def _bounce_from(cls, value: object) -> str:
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

    @model_validator(mode="after")
    def _cross_checks(self) -> Settings:
        if not self.bounce_from:
            object.__setattr__(self, "bounce_from", f"MAILER-DAEMON@{self.hostname}")
        for name in SECRET_FIELDS:
            path: Path | None = getattr(self, f"{name}_file")
            if path is None:
                continue
            env = name.upper()
            if getattr(self, name).get_secret_value():
                raise ValueError(f"{env}_FILE: set {env} or {env}_FILE, not both")
            try:
                secret = path.read_text(encoding="utf-8").rstrip("\r\n")
            except OSError as exc:
                raise ValueError(f"{env}_FILE: cannot read {path}: {exc.strerror}") from None
            object.__setattr__(self, name, SecretStr(secret))
        if self.tls_key_file is not None and self.tls_cert_file is None:
            raise ValueError("PYRELAY_TLS_KEY_FILE: set PYRELAY_TLS_CERT_FILE too")
        if self.smtpd_tls_level is None:
            level = SmtpdTLSLevel.MAY if self.tls_cert_file is not None else SmtpdTLSLevel.NONE
            object.__setattr__(self, "smtpd_tls_level", level)
        if self.delivery is DeliveryMode.MX:
            if self.relayhost.host:
                raise ValueError(
                    "PYRELAY_DELIVERY: mx delivers to the recipients' MX hosts; unset RELAYHOST "
                    "(or unset PYRELAY_DELIVERY to relay through it)"
                )
        elif not self.relayhost.host:
            raise ValueError("RELAYHOST: required but not set")
        fb_user = self.relayhost_fallback_username.get_secret_value()
        fb_password = self.relayhost_fallback_password.get_secret_value()
        if bool(fb_user) != bool(fb_password):
            missing = "RELAYHOST_FALLBACK_PASSWORD" if fb_user else "RELAYHOST_FALLBACK_USERNAME"
            raise ValueError(f"{missing}: required when the other credential is set")
        user = self.relayhost_username.get_secret_value()
        password = self.relayhost_password.get_secret_value()
        if self.xoauth2:
            if not user:
                raise ValueError("RELAYHOST_USERNAME: required with XOAUTH2 (the mailbox)")
            if not self.token_endpoint:
                raise ValueError("XOAUTH2_TOKEN_ENDPOINT: required (no default for this RELAYHOST)")
        elif bool(user) != bool(password):
            missing = "RELAYHOST_PASSWORD" if user else "RELAYHOST_USERNAME"
            raise ValueError(f"{missing}: required when the other credential is set")
        if not self.allowed_sender_domains and not self.allow_empty_sender_domains:
            raise ValueError(
                "ALLOWED_SENDER_DOMAINS: required (or set ALLOW_EMPTY_SENDER_DOMAINS=true "
                "to accept any sender domain)"
            )
        if self.min_backoff > self.max_backoff:
            raise ValueError("PYRELAY_MIN_BACKOFF: must not exceed PYRELAY_MAX_BACKOFF")
        if self.tls_ca_file is not None and not self.tls_ca_file.is_file():
            raise ValueError(f"RELAYHOST_TLS_CA_FILE: no such file {self.tls_ca_file}")
        return self

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
        """The listener's STARTTLS level, resolved (``smtpd_tls_level`` is set after
        validation; this spares callers the ``None`` check)."""
        return self.smtpd_tls_level or SmtpdTLSLevel.NONE

    @property
    def implicit_tls(self) -> bool:
        """Port 465 is SMTPS (implicit TLS); every other port uses STARTTLS."""
        return self.relayhost.port == 465

    def dump(self) -> dict[str, str]:
        """The effective configuration keyed by environment variable, secrets masked."""
        out: dict[str, str] = {}
        for name in type(self).model_fields:
            if name.endswith("_file") and name.removesuffix("_file") in SECRET_FIELDS:
                continue
            env = _env_name(name)
            value = getattr(self, name)
            out[env] = _render(value, secret=name in MASKED_FIELDS)
        return out


def _env_name(field_name: str) -> str:
    field = Settings.model_fields[field_name]
    alias = field.validation_alias
    if isinstance(alias, AliasChoices):
        first = alias.choices[0]
        return str(first)
    return field_name.upper()


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


def _describe(error: ValidationError) -> str:
    """One line naming the variable and what is wrong (never the offending secret value)."""
    first = error.errors()[0]
    loc = first.get("loc") or ()
    message = str(first.get("msg", "invalid value"))
    message = message.removeprefix("Value error, ")
    if loc:
        # loc is the field name or the alias the value came from (e.g. MASQUERADE_DOMAINS).
        key = str(loc[0])
        field = key if key in Settings.model_fields else key.lower()
        name = _env_name(field) if field in Settings.model_fields else key.upper()
        if first.get("type") == "missing":
            return f"{name}: required but not set"
        return f"{name}: {message}"
    return message


def env_file_from_environment() -> Path | None:
    """``PYRELAY_ENV_FILE`` if set (and not empty); it must name a readable file."""
    name = os.environ.get("PYRELAY_ENV_FILE", "").strip()
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


def load_settings(**overrides: Any) -> Settings:
    """Build ``Settings`` from the environment (and ``PYRELAY_ENV_FILE``, if set); raise
    ``ConfigError`` with one clear line."""
    if "_env_file" not in overrides:
        overrides["_env_file"] = env_file_from_environment()
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
    except SettingsError as exc:
        raise ConfigError(str(exc).split(" from source")[0]) from None


def known_env_names() -> set[str]:
    """Every environment variable name Settings reads (lowercased)."""
    names: set[str] = set()
    for field in Settings.model_fields.values():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names.update(str(choice).lower() for choice in alias.choices)
    return names
