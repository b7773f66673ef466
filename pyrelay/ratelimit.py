"""Per-route send rates shared by every worker process: a token bucket in a small file in the
spool (``<spool>/ratelimit/<route>.bucket``), updated under an ``fcntl`` lock, with AIMD
adaptation to the provider's throttling replies.

* **Token bucket**: a route with ``rate = "14/s"`` gets one token every 1/14 s, at most one
  banked (no bursts: SES counts per second, and a burst at a lower adapted rate is what trips
  it again).  Taking a token may *reserve* a future one: the agent then sleeps until its slot.
  A reservation further away than ``MAX_WAIT`` is not made: the message is deferred (without
  counting an attempt) and waits in the queue on disk, not in memory.
* **AIMD**: a throttling reply (``454 Throttling failure``, ``421 … rate limit``) halves the
  route's current rate (multiplicative decrease, at most once per ``DECREASE_GAP`` so that the
  replies to messages already in flight do not halve it again and again); after ``HOLD``
  seconds without one, the rate climbs back by ``INCREASE`` of the configured rate per second
  (additive increase) up to the configured rate.  The adapted rate lives in the same file, so
  all workers slow down and recover together.

The state is four doubles; a lock, a read and a write cost a few microseconds, so they run on
the event loop.
"""

from __future__ import annotations

import fcntl
import os
import re
import struct
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["MAX_WAIT", "RateLimiter", "Reservation", "is_throttling"]

# Longest sleep for a reserved token; beyond it the message is deferred instead.
MAX_WAIT = 5.0
# Multiplicative decrease: the factor, the shortest gap between two decreases, the floor (as a
# fraction of the configured rate).
DECREASE = 0.5
DECREASE_GAP = 1.0
FLOOR = 1 / 64
# Additive increase: per second, a fraction of the configured rate, after HOLD quiet seconds.
HOLD = 2.0
INCREASE = 0.1

# tokens, updated (wall clock), current rate, last decrease (wall clock), configured rate
_STATE = struct.Struct("<5d")

# Provider replies that mean "slow down", not "this message failed": SES "454 Throttling
# failure: Maximum sending rate exceeded", SendGrid/Mailgun/Postmark rate-limit texts.
_THROTTLING = re.compile(
    r"\b(?:421|45[0-9])\b.*?(?:throttl|rate[ -]?limit|rate exceeded|sending rate|"
    r"too many (?:messages|mails|emails|requests|connections))",
    re.IGNORECASE,
)


def is_throttling(reply: str) -> bool:
    """True for a temporary reply that asks the client to send more slowly."""
    return bool(_THROTTLING.search(reply))


@dataclass(frozen=True, slots=True)
class Reservation:
    """``wait`` seconds until the reserved token is due; ``taken`` is False when the wait was
    too long and nothing was reserved (then ``wait`` is the estimate)."""

    taken: bool
    wait: float
    rate: float


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)[:100] or "_"


class RateLimiter:
    """The bucket files of one spool."""

    def __init__(self, spool_dir: Path) -> None:
        self.directory = spool_dir / "ratelimit"
        self._fds: dict[str, int] = {}

    def _fd(self, route: str) -> int:
        fd = self._fds.get(route)
        if fd is None:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.directory / f"{_safe(route)}.bucket", os.O_RDWR | os.O_CREAT, 0o600)
            self._fds[route] = fd
        return fd

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def _update(self, route: str, configured: float, change: str) -> tuple[float, float, float]:
        """Under the lock: refill, adapt, then ``change`` ("take", "give", "throttle", "peek").
        Returns (tokens after, current rate, wait for a taken token)."""
        fd = self._fd(route)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            now = time.time()
            raw = os.pread(fd, _STATE.size, 0)
            if len(raw) == _STATE.size:
                tokens, updated, rate, decreased, was = _STATE.unpack(raw)
            else:
                tokens, updated, rate, decreased, was = 1.0, now, configured, 0.0, configured
            if was != configured:  # the routes file changed the rate: start again from it
                tokens, rate, decreased = min(tokens, 1.0), configured, 0.0
            elapsed = max(0.0, now - updated)
            # Additive increase, only after HOLD quiet seconds.
            quiet_since = max(updated, decreased + HOLD)
            if now > quiet_since and rate < configured:
                rate = min(configured, rate + configured * INCREASE * (now - quiet_since))
            tokens = min(1.0, tokens + elapsed * rate)
            wait = 0.0
            if change == "take":
                tokens -= 1.0
                wait = max(0.0, -tokens / rate)
                if wait > MAX_WAIT:
                    tokens += 1.0
            elif change == "give":
                tokens = min(1.0, tokens + 1.0)
            elif change == "throttle" and now - decreased >= DECREASE_GAP:
                rate = max(configured * FLOOR, rate * DECREASE)
                decreased = now
                tokens = min(tokens, 0.0)
            os.pwrite(fd, _STATE.pack(tokens, now, rate, decreased, configured), 0)
            return tokens, rate, wait
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def reserve(self, route: str, per_second: float) -> Reservation:
        """Take the next token of ``route`` (configured at ``per_second``)."""
        _, rate, wait = self._update(route, per_second, "take")
        return Reservation(wait <= MAX_WAIT, wait, rate)

    def give_back(self, route: str, per_second: float) -> None:
        """A reserved token that was not used (the attempt never reached the provider)."""
        self._update(route, per_second, "give")

    def throttled(self, route: str, per_second: float) -> float:
        """The provider said "slow down": halve the route's rate; returns the new rate."""
        _, rate, _ = self._update(route, per_second, "throttle")
        return rate

    def current(self, route: str, per_second: float) -> float:
        _, rate, _ = self._update(route, per_second, "peek")
        return rate
