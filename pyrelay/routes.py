"""Routes: which relay host (and credentials, fallback, rate) a message goes through, chosen by
its envelope sender's domain (Postfix ``sender_dependent_relayhost_maps`` and
``smtp_sasl_password_maps``, in one TOML file).

``PYRELAY_ROUTES_FILE`` holds ``[[route]]`` tables::

    [[route]]
    senders = ["a.example"]          # sender domains; their subdomains too (UTS-46 compared)
    relayhost = "[smtp.eu.mailgun.org]:587"
    username = "postmaster@a.example"
    password_file = "/run/secrets/mailgun-a"
    rate = "14/s"                    # or /m, /h; shared by all worker processes
    concurrency = 5                  # simultaneous deliveries through this route
    fallback = "[smtp.sendgrid.net]:587"

The environment's ``RELAYHOST`` (with ``RELAYHOST_FALLBACK``), or MX delivery with
``PYRELAY_DELIVERY=mx``, is the *default route* for every other sender (and for bounces).
The most specific sender domain wins.  The file is read again when it changes (checked at most
once a second, on use) or on ``SIGHUP``; a file that does not validate keeps the routes in force
and logs one line naming the file, line and key.
"""

from __future__ import annotations

import os
import re
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyrelay.config import (
    HostPort,
    Settings,
    TLSLevel,
    normalize_domain,
    parse_choice,
    parse_host_port,
)
from pyrelay.domains import try_ascii
from pyrelay.errors import ConfigError
from pyrelay.logging import get_logger
from pyrelay.secret import SecretStr

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter

__all__ = ["Rate", "Route", "RouteTable", "Target", "load_routes", "parse_rate", "route_counter"]

log = get_logger("pyrelay.routes")

DEFAULT = "default"
# How often (at most) the file's mtime is looked at when a route is chosen.
CHECK_INTERVAL = 1.0

_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|m|min|h|hour)\s*$", re.IGNORECASE)
_PER = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "hour": 3600.0}


@dataclass(frozen=True, slots=True)
class Rate:
    """Messages per second, and how it was written."""

    per_second: float
    text: str

    def __str__(self) -> str:
        return self.text


def parse_rate(value: object) -> Rate:
    """``14/s``, ``600/m``, ``5000/h`` -> a ``Rate``."""
    match = _RATE.match(str(value))
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"invalid rate {value!r} (use e.g. 14/s, 600/m or 5000/h)")
    return Rate(float(match.group(1)) / _PER[match.group(2).lower()], str(value).strip())


@dataclass(frozen=True, slots=True)
class Target:
    """One relay host with its credentials: what ``pyrelay.delivery.Upstream`` connects to."""

    relayhost: HostPort
    username: SecretStr
    password: SecretStr
    tls_level: TLSLevel

    @property
    def key(self) -> tuple[str, int, str, str, str]:
        """Sessions and upstreams are shared between routes with the same key."""
        return (
            self.relayhost.host,
            self.relayhost.port,
            self.username.get_secret_value(),
            self.password.get_secret_value(),
            self.tls_level.value,
        )

    def settings(self, base: Settings) -> Settings:
        """``base`` with this target as RELAYHOST (``Upstream(settings)`` takes it from there)."""
        return base.replace(
            relayhost=self.relayhost,
            relayhost_username=self.username,
            relayhost_password=self.password,
            tls_level=self.tls_level,
        )

    def describe(self) -> str:
        user = self.username.get_secret_value()
        return f"{self.relayhost}" + (f" (user {user})" if user else "")


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    senders: tuple[str, ...]
    primary: Target | None  # None: MX delivery
    fallback: Target | None = None
    rate: Rate | None = None
    concurrency: int | None = None

    def dump(self) -> dict[str, str]:
        """For ``pyrelay config``: secrets masked."""
        out = {
            "senders": " ".join(self.senders) or "(every other sender)",
            "relayhost": self.primary.describe() if self.primary else "(MX delivery)",
        }
        if self.primary is not None:
            out["password"] = "********" if self.primary.password.get_secret_value() else ""
            out["tls_level"] = self.primary.tls_level.value
        if self.fallback is not None:
            out["fallback"] = self.fallback.describe()
            out["fallback_password"] = (
                "********" if self.fallback.password.get_secret_value() else ""
            )
        if self.rate is not None:
            out["rate"] = str(self.rate)
        if self.concurrency is not None:
            out["concurrency"] = str(self.concurrency)
        return out


class _BadKey(ValueError):
    """A ``[[route]]`` key that is missing, unknown or of the wrong kind."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


@dataclass(frozen=True, slots=True)
class _RouteSpec:
    """One ``[[route]]`` table as written, checked key by key."""

    senders: list[str]
    relayhost: str
    name: str | None = None
    username: str = ""
    password: SecretStr = SecretStr("")
    password_file: Path | None = None
    tls_level: TLSLevel | None = None
    rate: str | None = None
    concurrency: int | None = None
    fallback: str | None = None
    fallback_username: str | None = None
    fallback_password: SecretStr | None = None
    fallback_password_file: Path | None = None


_TEXT_KEYS = ("name", "relayhost", "username", "rate", "fallback", "fallback_username")
_SECRET_KEYS = ("password", "fallback_password")
_PATH_KEYS = ("password_file", "fallback_password_file")
_KEYS = frozenset({*_TEXT_KEYS, *_SECRET_KEYS, *_PATH_KEYS, "senders", "tls_level", "concurrency"})


def _spec(table: dict[str, Any]) -> _RouteSpec:
    """Check one table: unknown keys first (a misspelt key is the likeliest mistake), then each
    key's kind and value; ``_BadKey`` names the key."""
    unknown = sorted(set(table) - _KEYS)
    if unknown:
        raise _BadKey(unknown[0], "unknown key")
    for key in ("senders", "relayhost"):
        if key not in table:
            raise _BadKey(key, "required but not set")
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key in (*_TEXT_KEYS, *_SECRET_KEYS, *_PATH_KEYS, "tls_level") and not isinstance(
            value, str
        ):
            raise _BadKey(key, "must be a string")
        try:
            values[key] = _value(key, value)
        except ValueError as exc:
            raise _BadKey(key, str(exc)) from None
    return _RouteSpec(**values)


def _value(key: str, value: Any) -> object:
    if key == "senders":
        if not isinstance(value, list) or not all(isinstance(d, str) for d in value):
            raise ValueError('must be a list of domains, e.g. ["example.org"]')
        if not value:
            raise ValueError("at least one sender domain is required")
        return [normalize_domain(d.lstrip(".")) for d in value]
    if key == "concurrency":
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError("must be a whole number")
        if value < 1:
            raise ValueError("must be at least 1")
        return value
    if key in ("relayhost", "fallback"):
        parse_host_port(value, 25, what="relay host")
    elif key == "rate":
        parse_rate(value)
    elif key == "tls_level":
        return parse_choice(TLSLevel)(value)
    elif key in _SECRET_KEYS:
        return SecretStr(value)
    elif key in _PATH_KEYS:
        return Path(value)
    return value


def _secret(value: SecretStr | None, path: Path | None, key: str, base: Path) -> SecretStr | None:
    if path is None:
        return value
    if value is not None and value.get_secret_value():
        raise ValueError(f"set {key.removesuffix('_file')} or {key}, not both")
    full = path if path.is_absolute() else base / path
    try:
        return SecretStr(full.read_text(encoding="utf-8").rstrip("\r\n"))
    except OSError as exc:
        raise ValueError(f"cannot read {full}: {exc.strerror}") from None


def default_route(settings: Settings) -> Route:
    """The environment's route: RELAYHOST (or MX delivery) and RELAYHOST_FALLBACK."""
    primary = None
    if settings.relayhost.host:
        primary = Target(
            settings.relayhost,
            settings.relayhost_username,
            settings.relayhost_password,
            settings.tls_level,
        )
    fallback = None
    if settings.relayhost_fallback is not None:
        own = bool(settings.relayhost_fallback_username.get_secret_value())
        fallback = Target(
            settings.relayhost_fallback,
            settings.relayhost_fallback_username if own else settings.relayhost_username,
            settings.relayhost_fallback_password if own else settings.relayhost_password,
            settings.tls_level,
        )
    return Route(DEFAULT, (), primary, fallback)


def _line_of(text: str, index: int, key: str | None) -> int:
    """The line of ``key`` in the ``index``-th ``[[route]]`` table (or of the table)."""
    tables = [m.start() for m in re.finditer(r"(?m)^\s*\[\[\s*route\s*\]\]", text)]
    if index >= len(tables):
        return 1
    start = tables[index]
    end = tables[index + 1] if index + 1 < len(tables) else len(text)
    line = text.count("\n", 0, start) + 1
    if key is not None:
        found = re.search(rf"(?m)^\s*{re.escape(key)}\s*=", text[start:end])
        if found:
            return text.count("\n", 0, start + found.start()) + 1
    return line


def load_routes(path: Path, settings: Settings) -> list[Route]:
    """Read and validate the routes file; ``ConfigError`` with one line naming file, line and key
    when it is wrong."""
    where = f"PYRELAY_ROUTES_FILE: {path}"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: not UTF-8 text") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        at = re.search(r"\s*\(at line (\d+), column \d+\)$", str(exc))
        if at is None:
            raise ConfigError(f"{where}: {exc}") from None
        raise ConfigError(f"{where} line {at.group(1)}: {str(exc)[: at.start()]}") from None
    extra = set(data) - {"route"}
    if extra:
        top = sorted(extra)[0]
        found = re.search(rf"(?m)^\s*\[?{re.escape(top)}\b", text)
        line = text.count("\n", 0, found.start()) + 1 if found else 1
        raise ConfigError(f"{where} line {line}: {top}: unknown key (expected [[route]] tables)")
    tables: Any = data.get("route", [])
    if not isinstance(tables, list):
        raise ConfigError(f"{where} line 1: route: write each route as a [[route]] table")
    routes: list[Route] = []
    owner: dict[str, str] = {}
    for i, table in enumerate(tables):
        key: str | None = None
        if not isinstance(table, dict):
            raise ConfigError(f"{where} line 1: route: write each route as a [[route]] table")
        try:
            spec = _spec(table)
            key = "password_file"
            password = _secret(spec.password, spec.password_file, key, path.parent)
            key = "fallback_password_file"
            fb_password = _secret(
                spec.fallback_password, spec.fallback_password_file, key, path.parent
            )
            key = None
            routes.append(_route(spec, i, password or SecretStr(""), fb_password, settings))
        except _BadKey as exc:
            line = _line_of(text, i, exc.key)
            raise ConfigError(f"{where} line {line}: route[{i}].{exc.key}: {exc}") from None
        except ValueError as exc:
            raise ConfigError(
                f"{where} line {_line_of(text, i, key)}: route[{i}].{key}: {exc}"
            ) from None
        route = routes[-1]
        for domain in route.senders:
            if domain in owner:
                raise ConfigError(
                    f"{where} line {_line_of(text, i, 'senders')}: route[{i}].senders: "
                    f"{domain} is already routed by route {owner[domain]!r}"
                )
            owner[domain] = route.name
    names = [r.name for r in routes]
    dup = next((n for n in names if names.count(n) > 1 or n == DEFAULT), None)
    if dup is not None:
        i = names.index(dup) if dup != DEFAULT or DEFAULT in names else 0
        raise ConfigError(
            f"{where} line {_line_of(text, i, 'name')}: route[{i}].name: {dup!r} is taken"
        )
    return routes


def _route(
    spec: _RouteSpec,
    index: int,
    password: SecretStr,
    fb_password: SecretStr | None,
    settings: Settings,
) -> Route:
    if bool(spec.username) != bool(password.get_secret_value()):
        raise ValueError("username and password: set both or neither")
    tls = spec.tls_level or settings.tls_level
    primary = Target(
        parse_host_port(spec.relayhost, 25, what="relay host"),
        SecretStr(spec.username),
        password,
        tls,
    )
    fallback = None
    if spec.fallback is not None:
        own = spec.fallback_username is not None
        fallback = Target(
            parse_host_port(spec.fallback, 25, what="relay host"),
            SecretStr(spec.fallback_username or "") if own else primary.username,
            (fb_password or SecretStr("")) if own else (fb_password or primary.password),
            tls,
        )
    return Route(
        name=spec.name or spec.senders[0],
        senders=tuple(spec.senders),
        primary=primary,
        fallback=fallback,
        rate=parse_rate(spec.rate) if spec.rate is not None else None,
        concurrency=spec.concurrency,
    )


class RouteTable:
    """The routes in force, chosen by sender domain; reloads the file when it changes."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.path = settings.routes_file
        self.default = default_route(settings)
        self.routes: list[Route] = []
        self._by_domain: dict[str, Route] = {}
        self._stamp: tuple[int, int, int] | None = None
        self._checked = 0.0
        if self.path is not None:
            self._install(load_routes(self.path, settings), self._stat())

    @property
    def all(self) -> list[Route]:
        return [*self.routes, self.default]

    def _stat(self) -> tuple[int, int, int] | None:
        assert self.path is not None
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _install(self, routes: list[Route], stamp: tuple[int, int, int] | None) -> None:
        self.routes = routes
        self._by_domain = {d: r for r in routes for d in r.senders}
        self._stamp = stamp
        self._checked = time.monotonic()

    def reload(self, *, force: bool = True) -> bool:
        """Read the file again (if it changed, or ``force``); keep the old routes when the new
        file is wrong.  True when new routes are in force."""
        if self.path is None:
            return False
        stamp = self._stat()
        self._checked = time.monotonic()
        if not force and stamp == self._stamp:
            return False
        try:
            routes = load_routes(self.path, self.settings)
        except ConfigError as exc:
            self._stamp = stamp  # logged once per change, not on every check
            log.error("routes_reload_failed", reason=str(exc), note="the old routes stay")
            return False
        self._install(routes, stamp)
        log.info("routes_loaded", path=str(self.path), routes=len(routes))
        return True

    def select(self, sender: str) -> Route:
        """The route for an envelope sender: its domain's, or a parent domain's, or the
        default (also for the null sender)."""
        if self.path is not None and time.monotonic() - self._checked >= CHECK_INTERVAL:
            self.reload(force=False)
        if not self._by_domain or "@" not in sender:
            return self.default
        domain = try_ascii(sender.rpartition("@")[2].strip("[]"))
        while domain:
            route = self._by_domain.get(domain)
            if route is not None:
                return route
            domain = domain.partition(".")[2]
        return self.default


def route_counter(registry: CollectorRegistry) -> Counter:
    """``pyrelay_route_recipients_total{route, result}``: recipients per route and outcome
    (the relay or MX host of each is in the delivery log's ``relay=``)."""
    from prometheus_client import Counter

    return Counter(
        "pyrelay_route_recipients",
        "Recipient delivery attempts by route and result",
        ["route", "result"],
        registry=registry,
    )
