"""XOAUTH2 access tokens for the upstream (Gmail, Office 365), refreshed by the relay itself.

boky/postfix's plugin reads an access token once and never refreshes it; here the token and the
refresh token live in the spool volume, ``<spool>/xoauth2/<mailbox>.json`` (mode 0600), so a
restart needs no new initial token:

- before each AUTH the access token is refreshed when it expires within ``MARGIN`` seconds (a
  tenth of its lifetime if that is shorter; from the endpoint's ``expires_in``), and once more
  when the upstream answers 334/535 to it (a token revoked or expired early);
- a refresh token the endpoint rotates is saved at once (the old one may stop working);
- a refresh that fails (revoked grant, wrong secret) defers mail with the endpoint's error, and
  is not retried for ``min(60 s, PYRELAY_MIN_BACKOFF)`` so that a queue does not hammer it.

Tokens never appear in logs, errors, ``pyrelay config`` or the queue files: errors carry the
endpoint's ``error`` and ``error_description`` only, with any token text cut out.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyrelay.config import Settings
from pyrelay.logging import get_logger

log = get_logger("pyrelay.xoauth2")

MARGIN = 60.0  # refresh this long before the token expires
HTTP_TIMEOUT = 30.0
_UNSAFE = re.compile(r"[^A-Za-z0-9@._+-]")


class TokenError(Exception):
    """The token endpoint did not give us an access token (the text is safe to log)."""


@dataclass(slots=True)
class Tokens:
    access_token: str
    # When to refresh (a little before the token expires); 0: unknown (an initial access
    # token), used until the upstream refuses it.
    expires_at: float
    refresh_token: str
    seed: str = ""  # which XOAUTH2_INITIAL_REFRESH_TOKEN the file started from (a digest)

    def fresh(self, now: float) -> bool:
        return bool(self.access_token) and (not self.expires_at or self.expires_at > now)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16] if text else ""


def token_path(spool_dir: Path, mailbox: str) -> Path:
    name = _UNSAFE.sub("_", mailbox.lower()) or "_"
    return spool_dir / "xoauth2" / f"{name}.json"


class TokenStore:
    """One JSON file per mailbox, replaced atomically (write, fsync, rename), mode 0600."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> Tokens | None:
        try:
            data: Any = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.error("xoauth2_token_file_unreadable", path=str(self.path), reason=str(exc))
            return None
        if not isinstance(data, dict):
            return None
        access = data.get("access_token")
        refresh = data.get("refresh_token")
        expires = data.get("expires_at", 0)
        if not isinstance(access, str) or not isinstance(refresh, str):
            return None
        if not isinstance(expires, int | float):
            expires = 0
        seed = data.get("seed")
        return Tokens(access, float(expires), refresh, seed if isinstance(seed, str) else "")

    def save(self, tokens: Tokens) -> None:
        directory = self.path.parent
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = directory / f".{self.path.name}.{os.getpid()}.tmp"
        data = json.dumps(
            {
                "access_token": tokens.access_token,
                "expires_at": tokens.expires_at,
                "refresh_token": tokens.refresh_token,
                "seed": tokens.seed,
            }
        ).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, self.path)
        with contextlib.suppress(OSError):
            dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)


class XOAuth2:
    """The access token of ``RELAYHOST_USERNAME``, shared by every delivery of a process."""

    def __init__(self, settings: Settings, *, clock: Any = time.time) -> None:
        self.settings = settings
        self.mailbox = settings.relayhost_username.get_secret_value()
        self.endpoint = settings.token_endpoint
        self.store = TokenStore(token_path(settings.spool_dir, self.mailbox))
        self.clock = clock
        self._tokens: Tokens | None = None
        self._lock = asyncio.Lock()
        self._failed: tuple[float, str] | None = None
        self.quiet = min(60.0, settings.min_backoff)

    def _secrets(self) -> list[str]:
        s = self.settings
        values = [
            s.xoauth2_secret.get_secret_value(),
            s.xoauth2_initial_access_token.get_secret_value(),
            s.xoauth2_initial_refresh_token.get_secret_value(),
        ]
        if self._tokens is not None:
            values += [self._tokens.access_token, self._tokens.refresh_token]
        return [v for v in values if len(v) >= 4]

    def _scrub(self, text: str) -> str:
        for secret in self._secrets():
            text = text.replace(secret, "<token>")
        return " ".join(text.split())[:300]

    def _current(self) -> Tokens:
        if self._tokens is None:
            stored = self.store.load()
            s = self.settings
            initial_refresh = s.xoauth2_initial_refresh_token.get_secret_value()
            seed = _digest(initial_refresh)
            # The saved tokens win over the initial ones, unless the operator has set a new
            # initial refresh token since (after a revoked grant, say).
            if stored is None or (initial_refresh and stored.seed != seed):
                stored = Tokens(
                    s.xoauth2_initial_access_token.get_secret_value(), 0.0, initial_refresh, seed
                )
            self._tokens = stored
        return self._tokens

    async def token(self, *, stale: str = "") -> str:
        """A usable access token.  ``stale``: the token the upstream just refused (refresh it,
        unless another delivery already did).  Raises ``TokenError``."""
        async with self._lock:
            tokens = self._current()
            now = self.clock()
            if tokens.access_token != stale and tokens.fresh(now):
                return tokens.access_token
            if self._failed is not None and now - self._failed[0] < self.quiet:
                raise TokenError(self._failed[1])
            try:
                tokens = await asyncio.to_thread(self._refresh_shared, tokens, stale)
            except TokenError as exc:
                self._failed = (self.clock(), str(exc))
                log.error("xoauth2_refresh_failed", mailbox=self.mailbox, reason=str(exc))
                raise
            self._failed = None
            self._tokens = tokens
            return tokens.access_token

    def _refresh_shared(self, tokens: Tokens, stale: str) -> Tokens:
        """Refresh under a lock shared by the worker processes: one of them may have refreshed
        (and rotated the refresh token) already; then its tokens are used (blocking: runs in a
        thread)."""
        self.store.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock = os.open(self.store.path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            stored = self.store.load()
            if stored is not None and stored.seed == tokens.seed and stored.refresh_token:
                if stored.access_token not in (tokens.access_token, stale) and stored.fresh(
                    self.clock()
                ):
                    return stored
                tokens = stored  # the newest refresh token
            return self._refresh(tokens)
        finally:
            os.close(lock)  # releases the lock

    def _refresh(self, tokens: Tokens) -> Tokens:
        if not tokens.refresh_token:
            raise TokenError("no refresh token (set XOAUTH2_INITIAL_REFRESH_TOKEN)")
        s = self.settings
        form = {
            "grant_type": "refresh_token",
            "refresh_token": tokens.refresh_token,
            "client_id": s.xoauth2_client_id.get_secret_value(),
        }
        secret = s.xoauth2_secret.get_secret_value()
        if secret:
            form["client_secret"] = secret
        started = self.clock()
        status, body = self._post(urllib.parse.urlencode(form).encode())
        try:
            data: Any = json.loads(body)
        except ValueError:
            data = None
        if status != 200 or not isinstance(data, dict) or "access_token" not in data:
            if isinstance(data, dict) and "error" in data:
                what = str(data.get("error"))
                desc = data.get("error_description")
                if desc:
                    what += f" ({desc})"
            else:
                what = f"HTTP {status}: {body[:200].decode('utf-8', 'replace')}"
            raise TokenError(
                f"token endpoint {self._where()} refused the refresh: {self._scrub(what)}"
            )
        access = str(data["access_token"])
        try:
            expires_in = float(data.get("expires_in", 3600))
        except (TypeError, ValueError):
            expires_in = 3600.0
        rotated = data.get("refresh_token")
        # Refresh a little before the end: MARGIN, or a tenth of a short lifetime.
        new = Tokens(
            access,
            started + expires_in - min(MARGIN, expires_in / 10),
            str(rotated) if rotated else tokens.refresh_token,
            tokens.seed,
        )
        try:
            self.store.save(new)
        except OSError as exc:
            # The token works for now; a rotated refresh token that is not saved is lost at
            # the next restart, so say so loudly.
            log.error("xoauth2_token_save_failed", path=str(self.store.path), reason=str(exc))
        log.info(
            "xoauth2_token_refreshed",
            mailbox=self.mailbox,
            expires_in=int(expires_in),
            refresh_token_rotated=bool(rotated) and rotated != tokens.refresh_token,
        )
        return new

    def _where(self) -> str:
        parts = urllib.parse.urlsplit(self.endpoint)
        return f"{parts.scheme}://{parts.netloc}{parts.path}"

    def _post(self, body: bytes) -> tuple[int, bytes]:
        request = urllib.request.Request(
            self.endpoint,
            data=body,
            headers={
                "Content-Type": "application/x-www-form-urlencoded",
                "Accept": "application/json",
            },
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as response:
                return int(response.status), bytes(response.read(1 << 20))
        except urllib.error.HTTPError as exc:
            with exc:
                return int(exc.code), bytes(exc.read(1 << 20))
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TokenError(
                f"token endpoint {self._where()} unreachable: {self._scrub(str(reason))}"
            ) from None
