"""Peak memory of the relay's whole process tree with large messages in flight (issue 8, item 1).

For each case a fresh relay (``python -m pyrelay``, product defaults) relays N concurrent clients'
10 MB messages to an upstream (``bench/sink.py``) that waits ``--delay`` seconds before answering
the end of DATA, like a slow provider.  The RSS and PSS (``/proc/PID/smaps_rollup``) of the relay
and its workers are sampled every 50 ms from start until ``--observe`` seconds after the last
client got its reply (default: the delay + 15 s, so the first round of deliveries completes and
the next starts) or until everything is delivered.  One line per case, after an idle line:

    idle workers=auto rss_mb=.. pss_mb=..
    case=20x10MB workers=auto delay=30s accepted=20/20 delivered=.. peak_rss_mb=.. ...

    python bench/memory.py                      # 1, 20, 200 clients; 30 s upstream delay
    python bench/memory.py --cases 1,20 --delay 10 --workers 1

Nothing is limited here (the 128 MB cgroup test is tests/test_memory_cgroup.py): the point is
how memory grows with traffic.  The 200-client case needs several GB with today's relay.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from pathlib import Path
from typing import BinaryIO

from benchlib import MB, RCPT, SENDER, Relay, Sampler, Sink, free_port, mb, mem_of, relay_env


def body(size: int) -> bytes:
    line = b"line of the benchmark message body, padding padding padding padding\r\n"
    return line * (size // len(line) + 1)


def reply(f: BinaryIO) -> int:
    """Read one (possibly multi-line) SMTP reply; its code."""
    while True:
        line = f.readline()
        if not line:
            raise ConnectionError("connection closed")
        if line[3:4] != b"-":
            return int(line[:3])


def send(port: int, n: int, payload: bytes, timeout: float) -> tuple[int, str]:
    """One client, one message, no copies of the (shared) body.  (code, error)."""
    head = (
        f"From: <{SENDER}>\r\nTo: <{RCPT}>\r\nSubject: memory bench {n}\r\n"
        f"X-Test-Id: mem-{n}\r\n\r\n"
    ).encode()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            f = sock.makefile("rb")
            steps = [
                (None, 220),
                (b"EHLO client.bench\r\n", 250),
                (f"MAIL FROM:<{SENDER}>\r\n".encode(), 250),
                (f"RCPT TO:<{RCPT}>\r\n".encode(), 250),
                (b"DATA\r\n", 354),
            ]
            for cmd, want in steps:
                if cmd:
                    sock.sendall(cmd)
                code = reply(f)
                if code != want:
                    return code, f"{cmd!r} -> {code}"
            sock.sendall(head)
            sock.sendall(payload)
            sock.sendall(b".\r\n")
            code = reply(f)
            sock.sendall(b"QUIT\r\n")
            return code, ""
    except OSError as exc:
        return 0, type(exc).__name__


def run_case(args: argparse.Namespace, clients: int, payload: bytes, work: Path) -> str:
    spool = Path(tempfile.mkdtemp(prefix="spool-", dir=work))
    sink = Sink(work, delay=args.delay)
    extra = {
        "PYRELAY_UPSTREAM_DATA_TIMEOUT": f"{args.delay + 300:.0f}s",
        "PYRELAY_COMMAND_TIMEOUT": "600s",
        # Every client here is 127.0.0.1: lift the per-client limit (50 per process), or the
        # 200-client case would measure 421 replies instead of messages in flight.
        "PYRELAY_MAX_CONNECTIONS_PER_CLIENT": "0",
    }
    if args.workers != "auto":
        extra["PYRELAY_WORKERS"] = args.workers
    relay = Relay(relay_env(free_port(), sink.port, spool, **extra))
    sampler = Sampler(root=relay.pid, interval=0.05)
    try:
        sampler.start()
        relay.wait_listening(60)
        time.sleep(args.settle)
        idle_rss, idle_pss = mem_of(relay.pids())
        started = time.monotonic()
        codes: list[tuple[int, str]] = []
        with ThreadPoolExecutor(clients) as pool:
            futures = [
                pool.submit(send, relay.port, i, payload, args.client_timeout)
                for i in range(clients)
            ]
            wait_futures(futures, timeout=args.client_timeout * 3)
            codes = [f.result() for f in futures if f.done()]
        sent_secs = time.monotonic() - started
        accepted = sum(1 for c, _ in codes if c == 250)
        observe = args.observe if args.observe is not None else args.delay + 15
        deadline = time.monotonic() + observe
        while time.monotonic() < deadline and relay.alive():
            if sink.received() >= accepted:
                break
            time.sleep(0.1)
        peaks = sampler.stop()
        errors = sorted({e for c, e in codes if c != 250})
        return (
            f"case={clients}x{args.size // 1_000_000}MB workers={args.workers} "
            f"delay={args.delay:g}s accepted={accepted}/{clients} delivered={sink.received()} "
            f"idle_rss_mb={mb(idle_rss)} idle_pss_mb={mb(idle_pss)} "
            f"peak_rss_mb={mb(peaks.rss)} peak_pss_mb={mb(peaks.pss)} "
            f"per_msg_rss_mb={(peaks.rss - idle_rss) / MB / max(1, accepted):.1f} "
            f"procs={peaks.processes} accept_secs={sent_secs:.1f} samples={peaks.samples}"
            + (f" alive=no exit={relay.proc.returncode}" if not relay.alive() else "")
            + (f" errors={','.join(errors)[:200]}" if errors else "")
        )
    finally:
        sampler.stop()
        relay.stop(grace=15)
        sink.stop()
        shutil.rmtree(spool, ignore_errors=True)


def idle_line(args: argparse.Namespace, work: Path) -> str:
    spool = Path(tempfile.mkdtemp(prefix="spool-", dir=work))
    sink = Sink(work)
    extra = {} if args.workers == "auto" else {"PYRELAY_WORKERS": args.workers}
    relay = Relay(relay_env(free_port(), sink.port, spool, **extra))
    try:
        listen = relay.wait_listening(60)
        time.sleep(args.settle)
        rss, pss = mem_of(relay.pids())
        return (
            f"idle workers={args.workers} rss_mb={mb(rss)} pss_mb={mb(pss)} "
            f"procs={len(relay.pids())} start_to_listen_s={listen:.2f}"
        )
    finally:
        relay.stop()
        sink.stop()
        shutil.rmtree(spool, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="1,20,200", help="concurrent clients per case")
    ap.add_argument("--size", type=int, default=10_000_000, help="message size (bytes)")
    ap.add_argument("--delay", type=float, default=30.0, help="upstream wait before DATA's 250")
    ap.add_argument("--workers", default="auto", help="PYRELAY_WORKERS (default: unset, auto)")
    ap.add_argument("--observe", type=float, help="seconds after the last reply (delay + 15)")
    ap.add_argument("--settle", type=float, default=2.0, help="seconds idle before measuring")
    ap.add_argument("--client-timeout", type=float, default=300.0)
    ap.add_argument("--workdir", default="/var/tmp", help="where spools go (a disk, not tmpfs)")
    args = ap.parse_args()
    # The message must fit MESSAGE_SIZE_LIMIT (10 240 000 by default) with its headers.
    payload = body(args.size - 200)[: args.size - 200]
    payload = payload[: payload.rfind(b"\r\n") + 2]
    work = Path(tempfile.mkdtemp(prefix="pyrelay-bench-mem-", dir=args.workdir))
    try:
        print(idle_line(args, work), flush=True)
        for clients in (int(c) for c in args.cases.split(",") if c.strip()):
            print(run_case(args, clients, payload, work), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
