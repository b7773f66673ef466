"""Queue scale (issue 8, item 4): a large queue while the upstream is down, then the drain.

For each N (``-n 20000``, ``-n 100000`` or ``-n 20000,100000``), with a fresh relay whose
RELAYHOST is a closed port on 127.0.0.1:

1. idle RSS/PSS of the relay's process tree;
2. fill: N messages of ``--size`` bytes from ``--clients`` concurrent clients (Postfix's
   ``smtp-source`` if installed, else Python clients): fill time, then RSS/PSS with N queued (once
   the relay is idle again) and the peak during the fill;
3. a round of deferrals: ``pyrelay queue flush`` with the upstream still down retries (and defers)
   every message; bytes written per deferral = the tree's ``/proc/PID/io`` ``write_bytes`` (block
   I/O, fsyncs included) and ``wchar`` (every write() call, log pipe included) over the round,
   divided by the number of ``deferred`` log events in it;
4. ``kill -9`` of every relay process, restart: time from exec to the port accepting a TCP
   connection, then RSS/PSS once the relay is idle again (recovery finished) and the peak meanwhile;
5. the upstream comes up on that port (Postfix's ``smtp-sink`` if installed, else
   ``bench/sink.py``) and ``pyrelay queue flush``: drain time and msg/s (``sent`` log events), peak
   RSS/PSS while draining.

    python bench/queue_scale.py                 # N=20000, a few minutes
    python bench/queue_scale.py -n 100000
    python bench/queue_scale.py -n 20000,100000 --workers 2

PYRELAY_MIN_BACKOFF (``--min-backoff``, default 60s) is short enough that messages also come due on
their own while the measurements run, as they would in an outage; everything else is the product
default.  The spool goes under ``--workdir`` (default /var/tmp), which must be on a disk (on tmpfs
``write_bytes`` is 0).  Every wait is bounded; processes and files are cleaned up on any exit.
"""

from __future__ import annotations

import argparse
import shutil
import smtplib
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchlib import (
    RCPT,
    REPO,
    SENDER,
    Relay,
    Sampler,
    Sink,
    free_port,
    fs_type,
    io_of,
    mb,
    mem_of,
    relay_env,
)


def say(text: str) -> None:
    print(text, flush=True)


def wait_count(relay: Relay, event: str, target: int, timeout: float, stall: float = 30.0) -> bool:
    """Wait until ``event`` was logged ``target`` times; give up after ``timeout`` or when the
    count has not moved for ``stall`` seconds."""
    deadline = time.monotonic() + timeout
    last, moved = relay.count(event), time.monotonic()
    while time.monotonic() < deadline and relay.alive():
        now = relay.count(event)
        if now >= target:
            return True
        if now != last:
            last, moved = now, time.monotonic()
        elif time.monotonic() - moved > stall:
            return False
        time.sleep(0.1)
    return relay.count(event) >= target


def flush(env: dict[str, str]) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "pyrelay", "queue", "flush"],
        cwd=REPO,
        env=env,
        capture_output=True,
        timeout=60,
    )
    return (proc.stdout + proc.stderr).decode(errors="replace").strip()


def fill(
    port: int, n: int, size: int, clients: int, timeout: float, postfix: bool
) -> tuple[str, int]:
    """Send ``n`` messages; (which client, exit status or failures)."""
    source = shutil.which("smtp-source") or (
        "/usr/sbin/smtp-source" if Path("/usr/sbin/smtp-source").exists() else None
    )
    if not postfix:
        source = None
    if source:
        cmd = [source, "-s", str(clients), "-m", str(n), "-l", str(size)]
        cmd += ["-f", SENDER, "-t", RCPT, f"127.0.0.1:{port}"]
        proc = subprocess.run(cmd, capture_output=True, timeout=timeout)
        return "smtp-source", proc.returncode
    body = (b"x" * 76 + b"\r\n") * (size // 78 + 1)
    msg = f"From: <{SENDER}>\r\nTo: <{RCPT}>\r\nSubject: queue bench\r\n\r\n".encode() + body

    def one_client(count: int) -> int:
        failed = 0
        smtp: smtplib.SMTP | None = None
        for _ in range(count):
            try:
                if smtp is None:
                    smtp = smtplib.SMTP("127.0.0.1", port, timeout=60)
                smtp.sendmail(SENDER, [RCPT], msg)
            except (OSError, smtplib.SMTPException):
                failed += 1
                smtp = None
        if smtp is not None:
            try:
                smtp.quit()
            except (OSError, smtplib.SMTPException):
                pass
        return failed

    shares = [n // clients + (1 if i < n % clients else 0) for i in range(clients)]
    with ThreadPoolExecutor(clients) as pool:
        failed = sum(pool.map(one_client, shares, timeout=timeout))
    return "python smtplib", failed


def run(args: argparse.Namespace, n: int, work: Path) -> None:
    spool = work / f"spool-{n}"
    upstream = free_port()  # closed until step 5
    extra = {
        "PYRELAY_MIN_BACKOFF": args.min_backoff,
        "PYRELAY_MAX_BACKOFF": args.max_backoff,
    }
    if args.workers != "auto":
        extra["PYRELAY_WORKERS"] = args.workers
    env = relay_env(free_port(), upstream, spool, **extra)
    tag = f"N={n} workers={args.workers}"
    relay = Relay(env)
    sink: Sink | None = None
    sampler: Sampler | None = None
    try:
        # 1. idle
        first_listen = relay.wait_listening(60)
        time.sleep(args.settle)
        idle_rss, idle_pss = mem_of(relay.pids())
        say(
            f"{tag} idle: rss_mb={mb(idle_rss)} pss_mb={mb(idle_pss)} "
            f"start_to_listen_s={first_listen:.2f} spool_fs={fs_type(work)}"
        )

        # 2. fill
        sampler = Sampler(root=relay.pid).start()
        t0 = time.monotonic()
        client, status = fill(
            relay.port, n, args.size, args.clients, args.fill_timeout, not args.no_postfix
        )
        fill_secs = time.monotonic() - t0
        queued_ok = wait_count(relay, "queued", n, 60)
        queued = relay.count("queued")
        wait_count(relay, "deferred", queued, 120)  # each fresh message is tried once
        quiet = relay.quiesce(120)
        rss, pss = mem_of(relay.pids())
        peaks = sampler.stop()
        say(
            f"{tag} fill: client={client} status={status} queued={queued}"
            f"{'' if queued_ok else ' (INCOMPLETE)'} size={args.size} clients={args.clients} "
            f"fill_s={fill_secs:.1f} accept_msgs_per_s={queued / fill_secs:.0f} "
            f"rss_queued_mb={mb(rss)} pss_queued_mb={mb(pss)} "
            f"rss_over_idle_mb={mb(rss - idle_rss)} peak_rss_fill_mb={mb(peaks.rss)} "
            f"settle_s={quiet:.1f}"
        )

        # 3. a round of deferrals
        d0, io0 = relay.count("deferred"), io_of(relay.pids())
        t0 = time.monotonic()
        flush(env)
        wait_count(relay, "deferred", d0 + queued, args.round_timeout)
        secs = time.monotonic() - t0
        relay.quiesce(60)  # the last rewrites and fsyncs
        d1, io1 = relay.count("deferred"), io_of(relay.pids())
        deferrals = max(1, d1 - d0)
        wbytes = io1.get("write_bytes", 0) - io0.get("write_bytes", 0)
        wchar = io1.get("wchar", 0) - io0.get("wchar", 0)
        say(
            f"{tag} deferral round: deferrals={d1 - d0} secs={secs:.1f} "
            f"deferrals_per_s={(d1 - d0) / secs:.0f} "
            f"write_bytes_per_deferral={wbytes / deferrals:.0f} "
            f"wchar_per_deferral={wchar / deferrals:.0f} write_mb={mb(wbytes)}"
        )

        # 4. kill -9, restart
        relay.kill9()
        relay = Relay(env)
        sampler = Sampler(root=relay.pid).start()
        listen = relay.wait_listening(args.restart_timeout)
        recover = relay.quiesce(args.restart_timeout)
        rss, pss = mem_of(relay.pids())
        peaks = sampler.stop()
        say(
            f"{tag} restart after kill -9: restart_to_listen_s={listen:.2f} "
            f"idle_again_after_s={listen + recover:.1f} rss_after_restart_mb={mb(rss)} "
            f"pss_after_restart_mb={mb(pss)} peak_rss_restart_mb={mb(peaks.rss)} "
            f"peak_pss_restart_mb={mb(peaks.pss)}"
        )

        # 5. upstream back, flush, drain
        sink = Sink(work, port=upstream, prefer_postfix=not args.no_postfix)
        sampler = Sampler(root=relay.pid).start()
        sent0 = relay.count("sent")
        spy = None
        if args.profile:
            spy = subprocess.Popen(
                ["py-spy", "record", "-p", str(relay.pid), "-r", "200", "-f", "raw"]
                + ["-o", args.profile, "-d", str(int(args.profile_secs))],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        t0 = time.monotonic()
        flush(env)
        drained = wait_count(relay, "sent", sent0 + queued, args.drain_timeout)
        secs = time.monotonic() - t0
        sent = relay.count("sent") - sent0
        peaks = sampler.stop()
        if spy is not None:
            spy.wait(timeout=args.profile_secs + 30)
        say(
            f"{tag} drain: upstream={sink.kind} sent={sent}/{queued}"
            f"{'' if drained else ' (INCOMPLETE)'} drain_s={secs:.1f} "
            f"drain_msgs_per_s={sent / secs:.0f} peak_rss_drain_mb={mb(peaks.rss)} "
            f"peak_pss_drain_mb={mb(peaks.pss)}"
        )
    except Exception as exc:
        say(f"{tag} FAILED: {type(exc).__name__}: {exc}\n{relay.log_tail()}")
        raise
    finally:
        if sampler is not None:
            sampler.stop()
        relay.stop(grace=15)
        if sink is not None:
            sink.stop()
        shutil.rmtree(spool, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", default="20000", help="messages to queue; a comma list runs each")
    ap.add_argument("--size", type=int, default=5000, help="message body bytes")
    ap.add_argument("--clients", type=int, default=10, help="concurrent SMTP clients")
    ap.add_argument("--workers", default="1", help="PYRELAY_WORKERS ('auto': leave unset)")
    ap.add_argument("--min-backoff", default="60s")
    ap.add_argument("--max-backoff", default="600s")
    ap.add_argument("--settle", type=float, default=2.0)
    ap.add_argument("--fill-timeout", type=float, default=1800.0)
    ap.add_argument("--round-timeout", type=float, default=900.0)
    ap.add_argument("--restart-timeout", type=float, default=300.0)
    ap.add_argument("--drain-timeout", type=float, default=1800.0)
    ap.add_argument(
        "--no-postfix", action="store_true", help="Python clients and bench/sink.py only"
    )
    ap.add_argument(
        "--profile", help="py-spy record the primary during the drain into this file (raw stacks)"
    )
    ap.add_argument("--profile-secs", type=float, default=20.0)
    ap.add_argument("--workdir", default="/var/tmp", help="where the spool goes (a disk)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pyrelay-bench-queue-", dir=args.workdir))
    code = 0
    try:
        for n in (int(x) for x in args.n.split(",") if x.strip()):
            try:
                run(args, n, work)
            except Exception:
                code = 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
