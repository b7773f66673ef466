"""Where a relay process spends its CPU and context switches, per message and per thread.

perf at 10 clients (issue 10) showed context switching at about a third of the relay's CPU: every
system call a spool thread makes while the event loop holds the GIL costs a GIL hand-over.  This
script makes that number easy to watch: one relay process (``PYRELAY_WORKERS=1``, so every
message goes through it), ``smtp-source`` clients, Postfix's ``smtp-sink`` as the upstream, and
``/proc/PID/task/*/{status,stat}`` read before and after the run:

    python bench/threads.py                         # 10 clients x 5 KB, 4000 messages, 3 runs
    python bench/threads.py -c 1 -n 2000 -r 5
    python bench/threads.py --env PYRELAY_CONCURRENCY=10

One line per thread group (the event loop's thread; the other threads, the spool's, together)
and run: voluntary and involuntary context switches per message and CPU milliseconds per message
(user + system), then the medians over the runs.  Needs Debian's ``postfix`` package
(``smtp-source``, ``smtp-sink``).  Every wait is bounded; the processes and the spool are removed
on any exit.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import Relay, Sink, free_port, relay_env  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def snapshot(pid: int) -> dict[int, tuple[str, int, int, float]]:
    """tid -> (thread name, voluntary, involuntary context switches, CPU seconds)."""
    out: dict[int, tuple[str, int, int, float]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text()
            stat = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended meanwhile
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        cpu = (int(stat[11]) + int(stat[12])) / TICK
        out[int(task.name)] = (
            fields["Name"].strip(),
            int(fields["voluntary_ctxt_switches"]),
            int(fields["nonvoluntary_ctxt_switches"]),
            cpu,
        )
    return out


def group(tid: int, pid: int) -> str:
    # Python 3.11 does not name its OS threads: the others are the spool threads (and the
    # default executor's, if anything used it).
    return "event loop" if tid == pid else "threads"


def run_once(args: argparse.Namespace, work: Path) -> dict[str, tuple[float, float, float]]:
    smtp_source = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
    upstream, port = free_port(), free_port()
    spool = work / f"spool-{time.monotonic_ns()}"
    extra = dict(item.split("=", 1) for item in args.env)
    sink = Sink(work, port=upstream, prefer_postfix=True)
    relay = Relay(relay_env(port, upstream, spool, PYRELAY_WORKERS="1", **extra))
    try:
        relay.wait_listening(15)
        before = snapshot(relay.pid)
        subprocess.run(
            [smtp_source, "-s", str(args.clients), "-l", str(args.size), "-m", str(args.n)]
            + ["-f", "sender@example.org", "-t", "rcpt@example.com", f"127.0.0.1:{port}"],
            check=True,
            stdout=subprocess.DEVNULL,
            timeout=600,
        )
        deadline = time.monotonic() + 120
        while relay.count("sent") < args.n and time.monotonic() < deadline:
            time.sleep(0.05)
        after = snapshot(relay.pid)
    finally:
        relay.stop()
        sink.stop()
        shutil.rmtree(spool, ignore_errors=True)
    totals: dict[str, list[float]] = {}
    for tid, (name, vol, invol, cpu) in after.items():
        _, vol0, invol0, cpu0 = before.get(tid, (name, 0, 0, 0.0))
        row = totals.setdefault(group(tid, relay.pid), [0.0, 0.0, 0.0])
        row[0] += vol - vol0
        row[1] += invol - invol0
        row[2] += cpu - cpu0
    totals["all"] = [sum(r[i] for r in totals.values()) for i in range(3)]
    n = args.n
    return {k: (v[0] / n, v[1] / n, v[2] * 1000 / n) for k, v in totals.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", "--clients", type=int, default=10)
    parser.add_argument("-n", type=int, default=4000, help="messages per run")
    parser.add_argument("-s", "--size", type=int, default=5000)
    parser.add_argument("-r", "--repeats", type=int, default=3)
    parser.add_argument("--env", action="append", default=[], help="NAME=value for the relay")
    args = parser.parse_args()
    runs: list[dict[str, tuple[float, float, float]]] = []
    with tempfile.TemporaryDirectory(prefix="pyrelay-threads-") as tmp:
        for i in range(args.repeats):
            result = run_once(args, Path(tmp))
            runs.append(result)
            for name, (vol, invol, cpu) in sorted(result.items()):
                print(
                    f"run={i + 1} clients={args.clients} size={args.size} group={name!r} "
                    f"voluntary_per_msg={vol:.1f} involuntary_per_msg={invol:.1f} "
                    f"cpu_ms_per_msg={cpu:.2f}",
                    flush=True,
                )
    print("\nmedians over the runs, per message")
    for name in sorted(runs[0]):
        cols = [statistics.median(run[name][i] for run in runs if name in run) for i in range(3)]
        print(
            f"{name:14} voluntary {cols[0]:5.1f}  involuntary {cols[1]:5.1f}  cpu {cols[2]:.2f} ms"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
