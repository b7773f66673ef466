"""``pyrelay queue``: Postfix's ``mailq``, ``postqueue -f`` and ``postsuper -d/-h/-H`` for the
spool.  Works on the queue directories directly, whether or not the relay runs; only ``flush`` and
``release`` signal the running relay (SIGUSR1: retry everything; SIGUSR2: look for due entries).

Every change is one atomic rename or unlink, so it is safe under a running relay: a delivery
claims an entry by renaming it into ``active/`` and skips it when the rename fails.  An entry in
``active/`` is being delivered now; ``hold`` and ``delete`` of such an entry are recorded as a
request that the relay honours when that attempt ends (the attempt itself may still deliver it).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyrelay.cmdutil import Subparsers, add_command, add_json_flag, error, print_json
from pyrelay.config import load_settings
from pyrelay.constants import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, pid_file

if TYPE_CHECKING:
    from pyrelay.spool import Envelope, OpenEntry, Spool

STATES = ("incoming", "active", "deferred", "hold", "corrupt")
_QUEUE_ID = re.compile(r"^[0-9A-Z]{1,64}$")


def register(sub: Subparsers) -> None:
    queue = add_command(
        sub,
        "queue",
        cmd_queue_list,
        "list or manage queued mail (mailq, postqueue, postsuper)",
        "Inspect and manage the queue in PYRELAY_SPOOL_DIR. Without an action, lists it. "
        "Works whether or not the relay is running.",
        "1 unknown queue ID, or the relay is not running (flush)",
    )
    add_json_flag(queue, top=True)
    _by_destination_flag(queue)
    actions = queue.add_subparsers(title="actions", metavar="ACTION")
    p = add_command(
        actions,
        "list",
        cmd_queue_list,
        "list queued messages (the default; like mailq)",
        "One entry per message: queue ID, state, size, age, delivery attempts, sender, "
        "the last delivery error, and the pending recipients.",
        "",
    )
    add_json_flag(p)
    _by_destination_flag(p)
    p = add_command(
        actions,
        "show",
        cmd_queue_show,
        "print one message: envelope, headers and body",
        "Print a queued message's envelope and its content as it will be relayed.",
        "1 no such message",
    )
    p.add_argument("queue_id", metavar="ID")
    add_json_flag(p)
    add_command(
        actions,
        "flush",
        cmd_queue_flush,
        "retry all deferred mail now (like postqueue -f)",
        "Ask the running relay (SIGUSR1 to the pid in PYRELAY_SPOOL_DIR/pyrelay.pid) to retry "
        "every deferred message now.",
        "1 the relay is not running (no or stale pid file)",
    )
    for name, func, text in (
        (
            "delete",
            cmd_queue_delete,
            "delete messages (like postsuper -d); a message already being delivered may "
            "still go out",
        ),
        (
            "hold",
            cmd_queue_hold,
            "put messages on hold (like postsuper -h): they are not delivered until released",
        ),
        (
            "release",
            cmd_queue_release,
            "release held messages (like postsuper -H) and have the running relay retry them "
            "now; this also retries the other deferred messages, like postqueue -f",
        ),
    ):
        p = add_command(actions, name, func, text.split(" (")[0], text, "1 unknown queue ID")
        p.set_defaults(action=name)
        p.add_argument("queue_ids", nargs="*", metavar="ID")
        p.add_argument("--all", action="store_true", help="every message it applies to")
    p = add_command(
        actions,
        "handoff",
        cmd_queue_handoff,
        "forward the queue to a peer relay over SMTP",
        "Forward every queued message (incoming and deferred; also those left in active/ when "
        "the relay is not running) to a peer relay as queued: envelope sender, remaining "
        "recipients, message as spooled. Each entry is removed only after the peer's 250; a "
        "failed one goes back to deferred/. The peer must accept this host (its MYNETWORKS). "
        "Held messages stay.",
        "1 some messages could not be handed off",
    )
    p.add_argument(
        "--to",
        dest="to",
        metavar="HOST:PORT",
        help="the peer relay (default: PYRELAY_HANDOFF_TO; port 25 if omitted)",
    )
    p.add_argument("--timeout", type=float, default=30.0, metavar="S", help="per SMTP step")
    add_json_flag(p)


def _open_spool() -> Spool:
    from pyrelay.spool import Spool

    return Spool(load_settings().spool_dir, threads=1)


def _entries(spool: Spool) -> list[dict[str, Any]]:
    from pyrelay.spool import CorruptEntry

    now = time.time()
    seen: dict[str, dict[str, Any]] = {}
    for state in STATES:
        for queue_id in spool.ids(state):
            try:
                env = spool.read_envelope(state, queue_id)
            except FileNotFoundError:
                continue  # delivered or moved while we looked
            except (CorruptEntry, OSError) as exc:
                path = spool.path(state, queue_id)
                stat = path.stat() if path.exists() else None
                seen[queue_id] = {
                    "queue_id": queue_id,
                    "state": state,
                    "size": stat.st_size if stat else 0,
                    "arrival": stat.st_mtime if stat else now,
                    "sender": "",
                    "recipients": [],
                    "attempts": 0,
                    "next_attempt": None,
                    "last_error": f"unreadable queue file: {exc}",
                }
                continue
            entry = _entry_dict(env)
            if state == "active":
                entry["request"] = spool.pending_request(queue_id)
            seen[queue_id] = entry
    entries = sorted(seen.values(), key=lambda e: (e["arrival"], e["queue_id"]))
    for entry in entries:
        entry["age"] = round(max(0.0, now - entry["arrival"]), 1)
    return entries


def _entry_dict(env: Envelope) -> dict[str, Any]:
    return {
        "queue_id": env.queue_id,
        "state": env.state,
        "size": env.size,
        "arrival": env.arrival,
        "sender": env.sender,
        "recipients": list(env.recipients),
        "attempts": env.attempts,
        "next_attempt": env.next_attempt or None,
        "last_error": env.last_error,
    }


def _age(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def cmd_queue_list(args: argparse.Namespace) -> int:
    spool = _open_spool()
    try:
        entries = _entries(spool)
    finally:
        spool.close()
    total = sum(e["size"] for e in entries)
    if getattr(args, "by_destination", False):
        return _print_by_destination(entries, json=getattr(args, "json", False))
    if getattr(args, "json", False):
        print_json({"messages": entries, "requests": len(entries), "bytes": total})
        return EXIT_OK
    if not entries:
        print("Mail queue is empty")
        return EXIT_OK
    indent = " " * 52
    print(
        f"{'-Queue ID-':<18}{'-State-':<10}{'--Size--':>8} {'--Age--':>7} {'Tries':>5}  "
        "-Sender/Recipient-------"
    )
    for e in entries:
        print(
            f"{e['queue_id']:<18}{e['state']:<10}{e['size']:>8} {_age(e['age']):>7} "
            f"{e['attempts']:>5}  {e['sender'] or 'MAILER-DAEMON'}"
        )
        if e["last_error"]:
            print(f"({e['last_error']})")
        for rcpt in e["recipients"]:
            print(f"{indent}{rcpt}")
        print()
    # Postfix's summary line, which monitoring scripts parse.
    print(f"-- {(total + 1023) // 1024} Kbytes in {len(entries)} Requests.")
    return EXIT_OK


def _by_destination_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--by-destination",
        action="store_true",
        default=argparse.SUPPRESS,
        help="pending recipients and messages per destination domain (like qshape)",
    )


def _print_by_destination(entries: list[dict[str, Any]], *, json: bool) -> int:
    from pyrelay.mx import group_by_domain

    table: dict[str, dict[str, int]] = {}
    for e in entries:
        for domain, rcpts in group_by_domain(e["recipients"]).items():
            row = table.setdefault(domain, {"recipients": 0, "messages": 0})
            row["recipients"] += len(rcpts)
            row["messages"] += 1
    rows = sorted(table.items(), key=lambda kv: (-kv[1]["recipients"], kv[0]))
    if json:
        print_json({d: r for d, r in rows})
        return EXIT_OK
    print(f"{'-Destination-':<40}{'Recipients':>11}{'Messages':>10}")
    for domain, row in rows:
        print(f"{domain:<40}{row['recipients']:>11}{row['messages']:>10}")
    return EXIT_OK


def _find(spool: Spool, raw_id: str) -> tuple[str, str]:
    """(queue ID, state) of ``raw_id``; state is "" when it is not in the queue."""
    queue_id = raw_id.strip().upper()
    if _QUEUE_ID.match(queue_id):
        for state in STATES:
            if spool.path(state, queue_id).exists():
                return queue_id, state
    return queue_id, ""


def cmd_queue_show(args: argparse.Namespace) -> int:
    from pyrelay.spool import CorruptEntry

    spool = _open_spool()
    entry: OpenEntry | None = None
    try:
        queue_id, state = _find(spool, args.queue_id)
        if not state:
            return error(f"queue: no such message: {args.queue_id}")
        try:
            entry = spool.open_entry(state, queue_id)
        except (CorruptEntry, OSError) as exc:
            return error(f"queue: {queue_id}: unreadable queue file: {exc}")
        env = entry.envelope
        info = _entry_dict(env) | {
            "client": env.client,
            "delivered": list(env.delivered),
            "age": round(time.time() - env.arrival, 1),
        }
        if getattr(args, "json", False):
            # JSON needs the whole text; the CLI is a separate short-lived process.
            message = _unstuffed(spool, entry).decode("utf-8", errors="replace")
            print_json(info | {"message": message})
            return EXIT_OK
        for key, value in info.items():
            if isinstance(value, list):
                value = " ".join(f"<{v}>" for v in value)
            elif key in ("arrival", "next_attempt") and value:
                value = time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(value))
            elif key == "age":
                value = _age(value)
            elif key == "sender":
                value = f"<{value}>"
            print(f"{key}: {value}")
        print()
        sys.stdout.flush()
        _write_message(spool, entry)
        return EXIT_OK
    finally:
        if entry is not None:
            entry.close()
        spool.close()


def _unstuffed(spool: Spool, entry: OpenEntry) -> bytes:
    from pyrelay.wire import dot_unstuff

    prepend = entry.envelope.prepend.encode("ascii")  # the DKIM signature, sent first
    return prepend + dot_unstuff(spool.read_message(entry, 0, entry.envelope.size))


def _write_message(spool: Spool, entry: OpenEntry) -> None:
    """The message as it will be relayed, un-stuffed, with LF line ends, chunk by chunk."""
    out = sys.stdout.buffer
    out.write(entry.envelope.prepend.encode("ascii").replace(b"\r\n", b"\n"))
    pos, size, line_start = 0, entry.envelope.size, True
    while pos < size:
        chunk = spool.read_message(entry, pos, min(1 << 20, size - pos))
        if not chunk:
            break
        pos += len(chunk)
        # Cut after the last CRLF so that no line end or stuffed dot is split.
        if pos < size:
            cut = chunk.rfind(b"\r\n") + 2
            if cut >= 2:
                pos -= len(chunk) - cut
                chunk = chunk[:cut]
        if line_start and chunk.startswith(b"."):
            chunk = chunk[1:]
        text = chunk.replace(b"\r\n.", b"\r\n").replace(b"\r\n", b"\n")
        line_start = chunk.endswith(b"\r\n")
        out.write(text)
    out.flush()


def _relay_pid(spool_dir: Path) -> tuple[int | None, str]:
    """The running relay's pid, or None and why not."""
    path = pid_file(spool_dir)
    try:
        pid = int(path.read_text().strip())
    except FileNotFoundError:
        return None, f"the relay is not running (no pid file {path})"
    except (OSError, ValueError) as exc:
        return None, f"cannot read the pid file {path}: {exc}"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None, f"the relay is not running (stale pid file {path}: no process {pid})"
    except PermissionError:
        pass  # alive, another user's; the signal itself will say so
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        cmdline = b"pyrelay"  # no procfs: trust the pid file
    if b"pyrelay" not in cmdline:
        # A reused pid: SIGUSR1 would kill whatever process has it now.
        return None, f"the relay is not running (stale pid file {path}: pid {pid} is not pyrelay)"
    return pid, ""


def _signal_flush(spool_dir: Path, *, everything: bool = True) -> tuple[int | None, str]:
    import signal

    pid, why = _relay_pid(spool_dir)
    if pid is None:
        return None, why
    try:
        os.kill(pid, signal.SIGUSR1 if everything else signal.SIGUSR2)
    except OSError as exc:
        return None, f"cannot signal the relay (pid {pid}): {exc.strerror}"
    return pid, ""


def cmd_queue_flush(args: argparse.Namespace) -> int:
    settings = load_settings()
    pid, why = _signal_flush(settings.spool_dir)
    if pid is None:
        return error(f"queue flush: {why}")
    deferred_dir = settings.spool_dir / "deferred"
    count = sum(1 for name in os.listdir(deferred_dir) if not name.startswith("."))
    print(f"flush: asked the relay (pid {pid}) to retry {count} deferred message(s) now")
    return EXIT_OK


def _select(
    spool: Spool, args: argparse.Namespace, sources: tuple[str, ...]
) -> tuple[list[tuple[str, str]], list[str], list[tuple[str, str]]] | None:
    """(found in ``sources``, unknown IDs, found elsewhere) or None on a usage error."""
    if args.all == bool(args.queue_ids):
        error(f"queue {args.action}: give queue IDs or --all, not both or neither", EXIT_USAGE)
        return None
    if args.all:
        return [(qid, st) for st in sources for qid in sorted(spool.ids(st))], [], []
    found, unknown, elsewhere = [], [], []
    for raw in dict.fromkeys(args.queue_ids):
        queue_id, state = _find(spool, raw)
        if not state:
            unknown.append(raw)
        elif state in sources:
            found.append((queue_id, state))
        else:
            elsewhere.append((queue_id, state))
    return found, unknown, elsewhere


def _manage(
    args: argparse.Namespace,
    sources: tuple[str, ...],
    act: Callable[[Spool, str, str], bool],
    verb: str,
) -> tuple[int, int]:
    """Apply ``act`` to the selected entries; (exit code, how many it applied to)."""
    spool = _open_spool()
    try:
        selected = _select(spool, args, sources)
        if selected is None:
            return EXIT_USAGE, 0
        found, unknown, elsewhere = selected
        done = [qid for qid, state in found if act(spool, qid, state)]
    finally:
        spool.close()
    for queue_id in done:
        print(f"{queue_id}: {verb}")
    for queue_id, state in elsewhere:
        print(f"{queue_id}: left alone (it is in {state}/)")
    if args.all or len(done) != 1:
        print(f"{len(done)} message(s) {verb}")
    for raw in unknown:
        error(f"queue {args.action}: no such message: {raw}")
    return (EXIT_FAILURE if unknown else EXIT_OK), len(done)


def _delete(spool: Spool, queue_id: str, state: str) -> bool:
    if state != "active" and spool.delete(queue_id, state):
        return True
    return _in_delivery(spool, queue_id, "delete")


def _in_delivery(spool: Spool, queue_id: str, action: str) -> bool:
    """The entry moved since we looked (a delivery claimed it): record the request, which the
    relay honours when the attempt ends, or redo the move if the attempt has ended already."""
    for _ in range(100):
        state = spool.find(queue_id)
        if state is None:
            return False  # delivered (or deleted) meanwhile
        if state == "active":
            spool.request(queue_id, action)
            if spool.find(queue_id) == "active":
                print(f"{queue_id}: being delivered now; {action} when this attempt ends")
                return True
            spool.clear_request(queue_id)
            continue
        if action == "delete" and spool.delete(queue_id, state):
            return True
        if action == "hold" and state in ("incoming", "deferred"):
            if spool.move(queue_id, state, "hold"):
                return True
            continue
        return False
    return False


def _hold(spool: Spool, queue_id: str, state: str) -> bool:
    if state != "active" and spool.move(queue_id, state, "hold"):
        return True
    return _in_delivery(spool, queue_id, "hold")


def _release(spool: Spool, queue_id: str, state: str) -> bool:
    # Due now: the relay's queue runner takes deferred/ entries whose mtime has passed.
    try:
        now = time.time()
        os.utime(spool.path("hold", queue_id), (now, now))
    except FileNotFoundError:
        return False
    return spool.move(queue_id, "hold", "deferred")


def cmd_queue_delete(args: argparse.Namespace) -> int:
    return _manage(args, STATES, _delete, "deleted")[0]


def cmd_queue_hold(args: argparse.Namespace) -> int:
    return _manage(args, ("incoming", "active", "deferred"), _hold, "put on hold")[0]


def cmd_queue_release(args: argparse.Namespace) -> int:
    code, released = _manage(args, ("hold",), _release, "released")
    if released:
        # Only the released entries are due now; the rest of the queue keeps its schedule.
        pid, why = _signal_flush(load_settings().spool_dir, everything=False)
        if pid is None:
            print(f"note: {why}; released mail goes out when it starts")
    return code


def cmd_queue_handoff(args: argparse.Namespace) -> int:
    import asyncio

    from pyrelay.config import parse_host_port
    from pyrelay.handoff import handoff

    settings = load_settings()
    target = settings.handoff_to
    if args.to:
        try:
            target = parse_host_port(args.to, 25, what="address")
        except ValueError as exc:
            return error(f"queue handoff: --to: {exc}", EXIT_USAGE)
    if target is None:
        return error("queue handoff: give --to HOST:PORT (or set PYRELAY_HANDOFF_TO)", EXIT_USAGE)
    running, _ = _relay_pid(settings.spool_dir)
    # Entries in active/ belong to a running relay's delivery attempts; otherwise leftovers.
    states = ("deferred", "incoming") if running else ("active", "deferred", "incoming")
    spool = _open_spool()
    try:
        result = asyncio.run(handoff(spool, settings, target, states=states, timeout=args.timeout))
    finally:
        spool.close()
    summary = {
        "to": str(target),
        "handed_off": result.handed_off,
        "failed": result.failed,
        "skipped": result.skipped,
        "seconds": round(result.seconds, 3),
        "rate": round(result.rate, 1),
        "errors": result.errors,
    }
    if getattr(args, "json", False):
        print_json(summary)
    else:
        for line in result.errors:
            print(f"failed: {line}")
        print(
            f"handoff: {result.handed_off} message(s) handed off to {target}, "
            f"{result.failed} failed, in {result.seconds:.1f}s ({result.rate:.0f}/s)"
        )
    return EXIT_FAILURE if result.failed else EXIT_OK
