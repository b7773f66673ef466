"""``pyrelay queue``: Postfix's ``mailq``, ``postqueue -f`` and ``postsuper -d/-h/-H`` for the
spool.  Works on the queue directories directly, whether or not the relay runs; only ``flush`` and
``release`` need the running relay, which they signal (SIGUSR1) to rescan ``deferred/``.

Moving or deleting an entry under a running relay is safe: the scheduler re-reads a deferred
entry when it is due and skips it if the file is gone.  A message already being delivered may
still go out.
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
    from pyrelay.spool import Envelope, Spool

STATES = ("incoming", "deferred", "hold", "corrupt")
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
                env, _ = spool.read(state, queue_id)
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
            # A scheduler rewrite briefly leaves both incoming/ID and deferred/ID; the later
            # state (this loop's order) is the live one.
            seen[queue_id] = _entry_dict(env)
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
    from pyrelay.wire import dot_unstuff

    spool = _open_spool()
    try:
        queue_id, state = _find(spool, args.queue_id)
        if not state:
            return error(f"queue: no such message: {args.queue_id}")
        try:
            env, wire = spool.read(state, queue_id)
        except (CorruptEntry, OSError) as exc:
            return error(f"queue: {queue_id}: unreadable queue file: {exc}")
    finally:
        spool.close()
    message = dot_unstuff(wire).decode("utf-8", errors="replace")
    entry = _entry_dict(env) | {
        "client": env.client,
        "delivered": list(env.delivered),
        "age": round(time.time() - env.arrival, 1),
    }
    if getattr(args, "json", False):
        print_json(entry | {"message": message})
        return EXIT_OK
    for key, value in entry.items():
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
    sys.stdout.write(message.replace("\r\n", "\n"))
    return EXIT_OK


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


def _signal_flush(spool_dir: Path) -> tuple[int | None, str]:
    import signal

    pid, why = _relay_pid(spool_dir)
    if pid is None:
        return None, why
    try:
        os.kill(pid, signal.SIGUSR1)
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
    try:
        os.unlink(spool.path(state, queue_id))
    except FileNotFoundError:
        return False
    return True


def _mover(dst: str, *, due_now: bool = False) -> Callable[[Spool, str, str], bool]:
    from pyrelay.spool import CorruptEntry

    def move(spool: Spool, queue_id: str, state: str) -> bool:
        try:
            return spool.move(queue_id, state, dst, due_now=due_now)
        except CorruptEntry as exc:
            error(f"{queue_id}: unreadable queue file, not moved: {exc}")
            return False

    return move


def cmd_queue_delete(args: argparse.Namespace) -> int:
    return _manage(args, STATES, _delete, "deleted")[0]


def cmd_queue_hold(args: argparse.Namespace) -> int:
    # A deferred entry the relay has scheduled is skipped when its time comes: the scheduler
    # re-reads the file and finds it gone.
    return _manage(args, ("incoming", "deferred"), _mover("hold"), "put on hold")[0]


def cmd_queue_release(args: argparse.Namespace) -> int:
    code, released = _manage(args, ("hold",), _mover("deferred", due_now=True), "released")
    if released:
        # The relay only notices new deferred entries when flushed.
        pid, why = _signal_flush(load_settings().spool_dir)
        if pid is None:
            print(f"note: {why}; released mail goes out when it starts")
    return code
