"""SMTP AUTH for clients (Postfix ``smtpd_sasl_*``): who may log in, with which senders.

Users come from boky/postfix's ``SMTPD_SASL_USERS=user:password,user2:password2`` and/or the
``PYRELAY_SMTPD_USERS_FILE``, one user a line::

    # name  bcrypt-hash                                                   [allowed senders...]
    app1    $2b$12$R9h/cIPz0gi.URNNX3kh2OPST9/PgBkqquzi.Ss7KIUgO2t0jWMUW  @example.org
    app2    $2b$12$...                                                    noreply@example.org

(``pyrelay user add NAME [SENDER...]`` prints such a line).  Without allowed senders a user may
send from any ``ALLOWED_SENDER_DOMAINS`` address.  The file is re-read when it changes.

Password checks run in a thread (bcrypt costs ~0.2 s of CPU by design); a credential that
verified once is remembered as a keyed digest for as long as its line is unchanged, so an app
that logs in for every message pays that cost once.  Failures from one client address slow it
down (Postfix's anvil): each further attempt waits longer before it is checked.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import os
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pyrelay.config import Settings, normalize_domain
from pyrelay.errors import ConfigError
from pyrelay.logging import get_logger

log = get_logger("pyrelay.auth")

# Throttling of failed logins per client address: the attempt after the n-th failure waits
# FAIL_DELAY_BASE * 2**(n-1) seconds, at most FAIL_DELAY_MAX, before it is checked.  A
# client's failures are forgotten FAIL_FORGET seconds after its last one.
FAIL_DELAY_BASE = 0.5
FAIL_DELAY_MAX = 16.0
FAIL_FORGET = 600.0
# Bounds memory under a scan from many addresses.
FAIL_TRACKED_CLIENTS = 10_000
RELOAD_CHECK_INTERVAL = 1.0
# bcrypt reads at most 72 bytes of a password (bcrypt 5 refuses longer ones).
BCRYPT_MAX_PASSWORD = 72
BCRYPT_ROUNDS = 12


# A hash to check unknown names against, so that a wrong name costs what a wrong password
# costs (no user enumeration by timing).
@functools.cache
def _dummy_hash() -> bytes:
    import bcrypt  # only when the listener authenticates users

    return bcrypt.hashpw(b"pyrelay-no-such-user", bcrypt.gensalt(BCRYPT_ROUNDS))


class UsersFileError(ValueError):
    """A users file line that cannot be used (the message names the line)."""


@dataclass(frozen=True, slots=True)
class User:
    """An authenticated client identity.  ``senders``: ``@domain`` or ``local@domain`` entries
    (domains in comparison form, local parts lowercased); empty means ALLOWED_SENDER_DOMAINS."""

    name: str
    senders: tuple[str, ...] = ()

    def owns(self, local: str, domain: str) -> bool:
        """``domain`` in comparison form (pyrelay.domains.to_ascii)."""
        address = f"{local.lower()}@{domain}"
        return any(s == address or s == "@" + domain for s in self.senders)


@dataclass(frozen=True, slots=True)
class _Entry:
    user: User
    secret: bytes  # a bcrypt hash (file) or the SHA-256 of the password (environment)
    hashed: bool


def parse_sender(text: str) -> str:
    """``@example.org`` or ``app@example.org`` in comparison form; ``ValueError`` otherwise."""
    local, at, domain = text.rpartition("@")
    if not at or not domain or any(c.isspace() or c in "<>()," for c in text):
        raise ValueError(f"invalid sender {text!r} (use @example.org or app@example.org)")
    return f"{local.lower()}@{normalize_domain(domain)}"


def valid_name(name: str) -> bool:
    return (
        bool(name) and len(name) <= 256 and all(c.isprintable() and not c.isspace() for c in name)
    )


def parse_env_users(text: str) -> dict[str, _Entry]:
    """``user:password,user2:password2`` (boky/postfix's SMTPD_SASL_USERS)."""
    out: dict[str, _Entry] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, password = item.partition(":")
        if not sep or not valid_name(name) or not password:
            # Never echo the item: it holds a password.
            raise ValueError(f"entry {len(out) + 1} is not user:password")
        digest = hashlib.sha256(password.encode()).digest()
        out[name] = _Entry(User(name), digest, hashed=False)
    return out


def parse_users_file(text: str) -> dict[str, _Entry]:
    out: dict[str, _Entry] = {}
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) < 2:
            raise UsersFileError(f"line {number}: expected NAME HASH [SENDER...]")
        name, hashed, *senders = fields
        if not valid_name(name):
            raise UsersFileError(f"line {number}: invalid user name")
        if not hashed.startswith(("$2a$", "$2b$", "$2y$")) or len(hashed) != 60:
            raise UsersFileError(
                f"line {number}: the second field must be a bcrypt hash "
                "(make one with `pyrelay user add NAME`)"
            )
        try:
            allowed = tuple(parse_sender(s) for s in senders)
        except ValueError as exc:
            raise UsersFileError(f"line {number}: {exc}") from None
        out[name] = _Entry(User(name, allowed), hashed.encode(), hashed=True)
    return out


def hash_password(password: str, rounds: int = BCRYPT_ROUNDS) -> str:
    data = password.encode()
    if len(data) > BCRYPT_MAX_PASSWORD:
        raise ValueError(f"password longer than {BCRYPT_MAX_PASSWORD} bytes (bcrypt's limit)")
    import bcrypt

    return bcrypt.hashpw(data, bcrypt.gensalt(rounds)).decode()


def _file_signature(path: Path) -> tuple[int, int, int]:
    st = os.stat(path)
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class FailureThrottle:
    """Failed logins per client address and the delay they earn."""

    def __init__(self) -> None:
        self._failures: dict[str, tuple[int, float]] = {}

    def failures(self, client: str) -> int:
        entry = self._failures.get(client)
        if entry is None:
            return 0
        count, last = entry
        if time.monotonic() - last > FAIL_FORGET:
            del self._failures[client]
            return 0
        return count

    def delay(self, client: str) -> float:
        count = self.failures(client)
        if not count:
            return 0.0
        return float(min(FAIL_DELAY_BASE * 2 ** (count - 1), FAIL_DELAY_MAX))

    def failed(self, client: str) -> int:
        count = self.failures(client) + 1
        if len(self._failures) >= FAIL_TRACKED_CLIENTS and client not in self._failures:
            self._prune()
        self._failures[client] = (count, time.monotonic())
        return count

    def succeeded(self, client: str) -> None:
        self._failures.pop(client, None)

    def _prune(self) -> None:
        now = time.monotonic()
        for key, (_, last) in list(self._failures.items()):
            if now - last > FAIL_FORGET:
                del self._failures[key]
        if len(self._failures) >= FAIL_TRACKED_CLIENTS:
            # Still full of recent failures: drop the oldest half.
            by_age = sorted(self._failures.items(), key=lambda kv: kv[1][1])
            for key, _ in by_age[: len(by_age) // 2]:
                del self._failures[key]


class Authenticator:
    """The user table and the password check.  ``load`` at start (raises ``ConfigError``);
    ``enabled`` says whether AUTH is offered at all."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.path = settings.smtpd_users_file
        self._env: dict[str, _Entry] = {}
        self._file: dict[str, _Entry] = {}
        self._signature: tuple[int, int, int] | None = None
        self._failed_signature: tuple[int, int, int] | None = None
        self._checked = 0.0
        self._key = secrets.token_bytes(32)
        self._verified: dict[tuple[str, bytes], bytes] = {}
        self.throttle = FailureThrottle()

    @property
    def enabled(self) -> bool:
        return bool(self._env or self._file or self.path is not None)

    def load(self) -> None:
        try:
            self._env = parse_env_users(self.settings.smtpd_sasl_users.get_secret_value())
        except ValueError as exc:
            raise ConfigError(f"SMTPD_SASL_USERS: {exc}") from None
        if self.path is not None:
            try:
                self._read_file()
            except OSError as exc:
                raise ConfigError(
                    f"PYRELAY_SMTPD_USERS_FILE: cannot read {self.path}: {exc.strerror or exc}"
                ) from None
            except UsersFileError as exc:
                raise ConfigError(f"PYRELAY_SMTPD_USERS_FILE: {self.path}: {exc}") from None
        if self.enabled:
            log.info("smtpd_auth", users=len(self._users()), users_file=str(self.path or ""))

    def _read_file(self) -> None:
        assert self.path is not None
        signature = _file_signature(self.path)
        entries = parse_users_file(self.path.read_text(encoding="utf-8"))
        self._file = entries
        self._signature = signature
        self._checked = time.monotonic()

    def _maybe_reload(self) -> None:
        if self.path is None:
            return
        now = time.monotonic()
        if now - self._checked < RELOAD_CHECK_INTERVAL:
            return
        self._checked = now
        try:
            signature = _file_signature(self.path)
            if signature in (self._signature, self._failed_signature):
                return
            self._read_file()
        except (OSError, UsersFileError) as exc:
            if signature != self._failed_signature:
                self._failed_signature = signature
                log.error(
                    "users_file_reload_failed",
                    path=str(self.path),
                    reason=getattr(exc, "strerror", None) or str(exc),
                    note="still using the previous users",
                )
            return
        log.info("users_file_reloaded", path=str(self.path), users=len(self._users()))

    def _users(self) -> dict[str, _Entry]:
        return {**self._env, **self._file}

    def _digest(self, name: str, password: bytes) -> bytes:
        return hmac.new(self._key, name.encode() + b"\0" + password, hashlib.sha256).digest()

    async def authenticate(self, client: str, login: bytes, password: bytes) -> User | None:
        """The user if ``login``/``password`` are right, else ``None``.  Waits first if
        ``client`` failed recently (the delay grows with each failure)."""
        delay = self.throttle.delay(client)
        if delay:
            await asyncio.sleep(delay)
        self._maybe_reload()
        name = login.decode("utf-8", "replace")
        entry = self._users().get(name)
        ok = await self._check(entry, name, password)
        if ok and entry is not None:
            self.throttle.succeeded(client)
            return entry.user
        return None

    async def _check(self, entry: _Entry | None, name: str, password: bytes) -> bool:
        if entry is not None and not entry.hashed:
            return hmac.compare_digest(hashlib.sha256(password).digest(), entry.secret)
        if entry is None:
            if self._file or self.path is not None:
                await asyncio.to_thread(_checkpw, password, _dummy_hash())
            return False
        key = (name, entry.secret)
        digest = self._digest(name, password)
        cached = self._verified.get(key)
        if cached is not None:
            return hmac.compare_digest(cached, digest)
        if not await asyncio.to_thread(_checkpw, password, entry.secret):
            return False
        if len(self._verified) > 4 * len(self._file) + 16:
            self._verified.clear()  # stale keys of changed lines
        self._verified[key] = digest
        return True

    def failed(self, client: str) -> int:
        """Count a failed login from ``client``; return its failures so far."""
        return self.throttle.failed(client)

    def names(self) -> Iterable[str]:
        return self._users().keys()


def _checkpw(password: bytes, hashed: bytes) -> bool:
    if len(password) > BCRYPT_MAX_PASSWORD:
        return False
    try:
        import bcrypt

        return bool(bcrypt.checkpw(password, hashed))
    except ValueError:
        return False
