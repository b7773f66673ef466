"""Round trip of each SMTP command through pyrelay and Postfix, one client (issue 10, goal 1).

``bench/run.sh`` at one client (``smtp-source``: a new connection per message, like most web
apps) is bound by latency, not CPU: each message is a TCP connect, the greeting, EHLO, MAIL,
RCPT, DATA, the message, QUIT, and the relay answers each before the client sends the next.
``bench/latency.py`` times the message's own stages; this script times the rest: for each relay
(Postfix's private instance as ``bench/tls_cost.py`` runs it, and pyrelay with its defaults),
one blocking client opens ``-n`` sessions one after another and stamps

- ``connect_to_220``: ``connect()`` until the whole greeting line has arrived;
- ``ehlo``, ``mail``, ``rcpt``, ``rset``, ``noop``: each command until its whole reply;
- ``quit_to_close``: QUIT until the relay has closed the connection;

then prints p50/p99 per step and relay, runs interleaved, and the medians over the repeats.
No message is sent (RSET after RCPT), so the spool and the upstream play no part:

    python bench/commands.py                 # 2000 sessions, 3 repeats
    python bench/commands.py -n 5000 -r 5 --relays pyrelay,pyrelay-1w

Needs Debian's ``postfix`` package and root for the private Postfix instance.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchlib import SENDER, free_port
from latency import pct
from tls_cost import LIVE, Postfix, PyRelay, SmtpSink, need_postfix, run_cleanup, run_failed, say

STEPS = ("connect_to_220", "ehlo", "mail", "rcpt", "rset", "noop", "quit_to_close")
RCPT = "rcpt@example.com"  # relay_bench.sh's


def _reply(sock: socket.socket, buffer: bytearray) -> None:
    """Read until a complete reply (its last line: code followed by a space) is in ``buffer``."""
    while True:
        end = buffer.find(b"\r\n")
        while end >= 0:
            line = bytes(buffer[: end + 2])
            del buffer[: end + 2]
            if len(line) >= 4 and line[3:4] == b" ":
                if line[:1] not in (b"2", b"3"):
                    raise RuntimeError(f"unexpected reply {line!r}")
                return
            end = buffer.find(b"\r\n")
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError("connection closed before the reply")
        buffer.extend(chunk)


def sessions(port: int, count: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {s: [] for s in STEPS}
    commands = (
        ("ehlo", b"EHLO client.bench\r\n"),
        ("mail", f"MAIL FROM:<{SENDER}>\r\n".encode()),
        ("rcpt", f"RCPT TO:<{RCPT}>\r\n".encode()),
        ("rset", b"RSET\r\n"),
        ("noop", b"NOOP\r\n"),
    )
    clock = time.perf_counter
    for _ in range(count):
        buffer = bytearray()
        t0 = clock()
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _reply(sock, buffer)
            times["connect_to_220"].append(clock() - t0)
            for step, line in commands:
                t0 = clock()
                sock.sendall(line)
                _reply(sock, buffer)
                times[step].append(clock() - t0)
            t0 = clock()
            sock.sendall(b"QUIT\r\n")
            while sock.recv(65536):
                pass
            times["quit_to_close"].append(clock() - t0)
        finally:
            sock.close()
    return times


def run_one(relay_name: str, count: int, work: Path) -> dict[str, list[float]] | None:
    run_dir = Path(tempfile.mkdtemp(prefix=f"{relay_name}.", dir=work))
    run_dir.chmod(0o755)
    sink: SmtpSink | None = None
    relay: PyRelay | Postfix | None = None
    try:
        sink = SmtpSink(free_port())
        port = free_port()
        if relay_name == "postfix":
            # Every RCPT opens a queue file that RSET abandons: nothing is ever delivered, so
            # Postfix's flow control (in_flow_delay, 1 s) would hold each new session's RCPT.
            relay = Postfix(run_dir, port, sink.port, None, settings={"in_flow_delay": "0s"})
        elif relay_name == "pyrelay-1w":
            relay = PyRelay(run_dir, port, sink.port, False, PYRELAY_WORKERS="1")
        else:
            relay = PyRelay(run_dir, port, sink.port, False)  # product defaults
        relay.wait_listening(60)
        time.sleep(1.0)  # let start-up work settle
        times = sessions(port, count)
        say(
            f"relay={relay_name} n={count} "
            + " ".join(
                f"{s}_p50_ms={pct(v, 50) * 1000:.3f} {s}_p99_ms={pct(v, 99) * 1000:.3f}"
                for s, v in times.items()
            )
        )
        return times
    except Exception as exc:  # one failed run must not lose the others
        run_failed(f"relay={relay_name}", exc, relay)
        return None
    finally:
        run_cleanup(run_dir, relay, sink)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=2000, help="sessions per run")
    ap.add_argument("-r", "--repeats", type=int, default=3)
    ap.add_argument("--relays", default="postfix,pyrelay")
    args = ap.parse_args()
    relays = args.relays.split(",")
    if "postfix" in relays:
        need_postfix(ap, "Postfix runs")
    work = Path(tempfile.mkdtemp(prefix="pyrelay-bench-commands-", dir="/var/tmp"))
    work.chmod(0o755)
    results: dict[str, dict[str, list[float]]] = {}
    try:
        for rep in range(args.repeats):
            for relay in relays:
                say(f"# repeat {rep + 1}/{args.repeats}")
                times = run_one(relay, args.n, work)
                if times:
                    acc = results.setdefault(relay, {})
                    for s, v in times.items():
                        acc.setdefault(s, []).append(pct(v, 50))
                        acc.setdefault(s + "_p99", []).append(pct(v, 99))
    finally:
        for leftover in reversed(LIVE[:]):
            leftover.stop()
        shutil.rmtree(work, ignore_errors=True)
    say("\nsummary: median over repeats of each run's p50 / p99, ms")
    for relay, acc in results.items():
        p50 = {s: statistics.median(acc[s]) * 1000 for s in STEPS}
        p99 = {s: statistics.median(acc[s + "_p99"]) * 1000 for s in STEPS}
        cells = [f"{s} {p50[s]:.3f}/{p99[s]:.3f}" for s in STEPS]
        total = sum(p50.values())
        say(f"{relay:11s} " + "  ".join(cells) + f"  session {total:.2f}")
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
