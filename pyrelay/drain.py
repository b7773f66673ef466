"""Drain: take a relay out of service without losing or stranding mail (a rolling restart, a node
drain, a scale-in).

``pyrelay drain [--timeout S]`` writes a request file into the spool (``drain.request``: the
timeout and an optional hand-off target) and sends SIGUSR2 to the running relay (found through
its pid file, like ``queue flush``); SIGUSR2 without a request file keeps meaning "look for due
entries".  SIGTERM stays a plain graceful shutdown.  The relay then:

1. reports not ready on ``/readyz`` (so the Service stops routing new connections to it) and
   waits ``PYRELAY_DRAIN_GRACE``;
2. closes its listener like a shutdown does (idle sessions get ``421``, sessions in DATA finish);
3. keeps delivering, with every deferred entry due now (a flush every second), until the queue
   (``incoming/``, ``active/``, ``deferred/``) is empty or the timeout has passed;
4. at the timeout, stops its deliveries and hands what is left off to ``PYRELAY_HANDOFF_TO`` (or
   the request's target), if one is set (``pyrelay.handoff``);
5. exits 0.  Held messages (``hold/``) are left alone: the operator parked them.

The command waits for the relay to exit and returns 0 when the queue is empty (delivered or
handed off), 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pyrelay.config import HostPort, Settings, parse_host_port
from pyrelay.logging import get_logger

if TYPE_CHECKING:
    from pyrelay.app import Relay
    from pyrelay.cmdutil import Subparsers

log = get_logger("pyrelay.drain")

REQUEST_FILE = "drain.request"
DEFAULT_TIMEOUT = 60.0
# Queue states that still hold deliverable mail.
PENDING_STATES = ("incoming", "active", "deferred")
# How often a draining relay makes every deferred entry due again.
RETRY_EVERY = 1.0
HANDOFF_ROUNDS = 3


@dataclass(frozen=True)
class DrainRequest:
    timeout: float
    handoff_to: HostPort | None


def write_request(spool_dir: Path, request: DrainRequest) -> None:
    data = {
        "timeout": request.timeout,
        "handoff_to": str(request.handoff_to) if request.handoff_to else None,
    }
    tmp = spool_dir / f".{REQUEST_FILE}.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, json.dumps(data).encode())
    finally:
        os.close(fd)
    os.replace(tmp, spool_dir / REQUEST_FILE)


def take_request(spool_dir: Path) -> DrainRequest | None:
    """The pending drain request (removed), or None.  A malformed one drains with defaults."""
    path = spool_dir / REQUEST_FILE
    try:
        raw = path.read_bytes()[:4096]
        path.unlink()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.error("drain_request_unreadable", reason=exc.strerror or str(exc))
        return DrainRequest(DEFAULT_TIMEOUT, None)
    try:
        data = json.loads(raw)
        timeout = float(data.get("timeout", DEFAULT_TIMEOUT))
        target = data.get("handoff_to")
        handoff_to = parse_host_port(target, 25, what="address") if target else None
    except (ValueError, TypeError, AttributeError) as exc:
        log.error("drain_request_invalid", reason=str(exc))
        return DrainRequest(DEFAULT_TIMEOUT, None)
    if not 0 <= timeout < 1e7:
        timeout = DEFAULT_TIMEOUT
    return DrainRequest(timeout, handoff_to)


def pending(spool_dir: Path) -> int:
    """Entries that still hold deliverable mail (blocking: a directory listing per state)."""
    from pyrelay.spool import valid_queue_id

    count = 0
    for state in PENDING_STATES:
        try:
            count += sum(1 for name in os.listdir(spool_dir / state) if valid_queue_id(name))
        except FileNotFoundError:
            pass
    return count


async def drain(relay: Relay, request: DrainRequest) -> int:
    """Run a drain in ``relay``; returns how many entries are left (0: emptied or handed off)."""
    from pyrelay.handoff import handoff

    s = relay.settings
    target = request.handoff_to or s.handoff_to
    started = time.monotonic()
    deadline = started + request.timeout
    relay.draining = True
    relay.metrics.draining.set(1)
    log.info(
        "drain_started",
        timeout=request.timeout,
        grace=s.drain_grace,
        handoff_to=str(target) if target else "",
    )
    # 1. Not ready first: the Service stops sending new connections here.
    await asyncio.sleep(min(s.drain_grace, request.timeout))
    # 2. Then the listener closes (secondary workers stop, their leftovers become due here).
    await relay.stop_listening()
    log.info("drain_listener_closed", pending=await asyncio.to_thread(pending, s.spool_dir))
    # 3. Deliver and retry now until the queue is empty or the time is up.
    left = await asyncio.to_thread(pending, s.spool_dir)
    last_flush = 0.0
    while left and time.monotonic() < deadline:
        now = time.monotonic()
        if now - last_flush >= RETRY_EVERY:
            relay.scheduler.flush()
            last_flush = now
        await asyncio.sleep(max(0.0, min(0.1, deadline - now)))
        left = await asyncio.to_thread(pending, s.spool_dir)
    if left:
        # 4. Time is up: no more local attempts; what is left goes to the peer.
        await relay.scheduler.stop(s.shutdown_grace)
        left = await asyncio.to_thread(pending, s.spool_dir)
        log.info("drain_timeout", pending=left, handoff_to=str(target) if target else "")
        rounds = 0
        while left and target is not None and rounds < HANDOFF_ROUNDS:
            if rounds:
                await asyncio.sleep(1.0)
            rounds += 1
            await handoff(
                relay.spool,
                s,
                target,
                states=PENDING_STATES,
                metrics=relay.metrics,
                timeout=s.upstream_command_timeout,
            )
            left = await asyncio.to_thread(pending, s.spool_dir)
    log.info(
        "drain_finished",
        pending=left,
        seconds=round(time.monotonic() - started, 3),
        held=len(os.listdir(s.spool_dir / "hold")),
    )
    return left


# -- the command ------------------------------------------------------------------------------


def register(sub: Subparsers) -> None:
    from pyrelay.cmdutil import add_command

    p = add_command(
        sub,
        "drain",
        cmd_drain,
        "stop accepting mail, deliver or hand off the queue, and exit (Kubernetes preStop)",
        "Tell the running relay (the pid in PYRELAY_SPOOL_DIR/pyrelay.pid) to drain: /readyz "
        "turns false, the listener closes after PYRELAY_DRAIN_GRACE, queued mail is delivered and "
        "retried now until the queue is empty or the timeout passes; then what is left is handed "
        "off to PYRELAY_HANDOFF_TO (or --handoff-to) if set, and the relay exits. Waits for it.",
        "1 the relay is not running, or mail is left in the queue",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="S",
        help=f"seconds to keep delivering before the hand-off (default {DEFAULT_TIMEOUT:g})",
    )
    p.add_argument(
        "--handoff-to",
        metavar="HOST:PORT",
        help="peer relay for what is left at the timeout (default: PYRELAY_HANDOFF_TO)",
    )


def cmd_drain(args: argparse.Namespace) -> int:
    from pyrelay.cmdutil import error
    from pyrelay.config import load_settings
    from pyrelay.constants import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
    from pyrelay.queue_commands import _relay_pid as relay_pid

    settings = load_settings()
    if not 0 <= args.timeout < 1e7:
        return error("drain: --timeout must be a number of seconds", EXIT_USAGE)
    target: HostPort | None = None
    if args.handoff_to:
        try:
            target = parse_host_port(args.handoff_to, 25, what="address")
        except ValueError as exc:
            return error(f"drain: --handoff-to: {exc}", EXIT_USAGE)
    pid, why = relay_pid(settings.spool_dir)
    if pid is None:
        return error(f"drain: {why}")
    write_request(settings.spool_dir, DrainRequest(args.timeout, target))
    import signal

    try:
        os.kill(pid, signal.SIGUSR2)
    except OSError as exc:
        return error(f"drain: cannot signal the relay (pid {pid}): {exc.strerror}")
    print(f"drain: asked the relay (pid {pid}) to drain within {args.timeout:g}s", flush=True)
    limit = time.monotonic() + _wait_limit(settings, args.timeout)
    while _alive(pid):
        if time.monotonic() > limit:
            return error(f"drain: the relay (pid {pid}) has not exited; giving up waiting")
        time.sleep(0.1)
    left = pending(settings.spool_dir)
    if left:
        print(f"drain: the relay exited; {left} message(s) left in the queue", flush=True)
        return EXIT_FAILURE
    print("drain: the relay exited with an empty queue", flush=True)
    return EXIT_OK


def _wait_limit(settings: Settings, timeout: float) -> float:
    # Grace, the drain, the stop of in-flight deliveries, hand-off rounds, the shutdown.
    return settings.drain_grace + timeout + 3 * settings.shutdown_grace + 120.0


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, an exited child not yet reaped, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[:1] != ["Z"]
