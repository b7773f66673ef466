"""Per-stage latency of one message through pyrelay and Postfix (issue 10, goal 2).

Each message carries ``X-Bench-Seq``; three clocks on this machine stamp it:

- the client (asyncio, one connection per client, messages one after another like a web app's
  mail queue worker): ``t0`` just before it writes the message and the final ``.``, ``t1`` when the
  ``250`` arrives;
- the upstream (this script in ``--upstream`` mode: a small asyncio SMTP sink that advertises
  PIPELINING and records every transaction): ``t2`` when ``MAIL FROM`` arrives, ``t3`` when the
  final ``.`` of that message arrives.

Stages, per message: ``data_to_250`` = t1 - t0 (what the client waits for: cleanup, spool
write, fsync of file and directory, reply); ``250_to_upstream_mail`` = t2 - t1 (scheduling: the
queue manager taking the message, an upstream connection, for Postfix also qmgr and smtp process
wake-ups); ``upstream_transaction`` = t3 - t2 (MAIL … end of DATA at the upstream, round trips
included); ``data_to_upstream`` = t3 - t0 (end to end).  pyrelay queues the message for delivery in
the same event-loop pass that writes the ``250``, so its ``250_to_upstream_mail`` can be about 0
(or a little negative: the upstream's MAIL arrived before the client read its ``250``).  p50 and
p99 of each, per relay and per client count; runs interleaved.  Before the runs, the script times
what the spool disk itself costs: write 5 KB + fsync, then fsync of the directory (p50/p99), the
floor under ``data_to_250`` for both relays.

    python bench/latency.py                     # 1 and 10 clients, 1000 messages, 3 repeats
    python bench/latency.py -c 1,10 -n 2000 -r 5
    python bench/latency.py --relays pyrelay       # pyrelay only (2 workers here: auto)

Needs Debian's ``postfix`` package and root for the private Postfix instance (as
``bench/tls_cost.py``, whose relay classes this uses).  Every wait is bounded; processes and temp
dirs are cleaned up on any exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import RCPT, SENDER, free_port, ready_port, stop_process
from tls_cost import LIVE, Postfix, PyRelay, interrupted, run_cleanup, run_failed, say

STAGES = ("data_to_250", "250_to_upstream_mail", "upstream_transaction", "data_to_upstream")


# -- the upstream --------------------------------------------------------------------------------


async def upstream_main(port: int, records: Path) -> None:
    """SMTP sink that stamps MAIL and end of DATA per message (``--upstream`` mode)."""
    seen: list[tuple[int, float, float]] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 upstream.bench ESMTP\r\n")
        mail_at = 0.0
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                verb = line[:4].upper()
                if verb in (b"EHLO", b"HELO"):
                    writer.write(
                        b"250-upstream.bench\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 OK\r\n"
                    )
                elif verb == b"MAIL":
                    mail_at = time.time()
                    writer.write(b"250 2.1.0 Ok\r\n")
                elif verb == b"RCPT":
                    writer.write(b"250 2.1.5 Ok\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                    data = await reader.readuntil(b"\r\n.\r\n")
                    end_at = time.time()
                    at = data.find(b"X-Bench-Seq: ")
                    if at >= 0:
                        seq = int(data[at + 13 : data.index(b"\r\n", at)])
                        seen.append((seq, mail_at, end_at))
                    writer.write(b"250 2.0.0 Ok: queued\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 2.0.0 Bye\r\n")
                    await writer.drain()
                    return
                else:
                    writer.write(b"250 2.0.0 Ok\r\n")
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return
        except asyncio.CancelledError:  # the sink is stopping
            return
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port, limit=1 << 20)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"READY {port}", flush=True)
    last = -1
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.2)
        if len(seen) != last:  # the count, for the driver's end-to-end wait
            last = len(seen)
            records.with_suffix(".count").write_text(str(last))  # noqa: ASYNC240 - tiny file
    server.close()
    records.write_text(json.dumps(seen))  # noqa: ASYNC240 - the sink is stopping


class Upstream:
    def __init__(self, work: Path) -> None:
        self.port = free_port()
        self.records = work / f"upstream-{self.port}.json"
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--upstream", str(self.port), str(self.records)],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        LIVE.append(self)
        try:
            ready_port(self.proc, "the latency upstream")
        except RuntimeError:
            self.stop()
            raise

    def received(self) -> int:
        try:
            return int(self.records.with_suffix(".count").read_text())
        except (OSError, ValueError):
            return 0

    def stamps(self) -> dict[int, tuple[float, float]]:
        self.stop()
        return {seq: (mail, end) for seq, mail, end in json.loads(self.records.read_text())}

    def stop(self) -> None:
        stop_process(self.proc, grace=10)  # it writes its records on the way out
        with contextlib.suppress(ValueError):
            LIVE.remove(self)


# -- the clients ---------------------------------------------------------------------------------


def message(seq: int, size: int) -> bytes:
    head = (
        f"From: <{SENDER}>\r\nTo: <{RCPT}>\r\nSubject: latency bench\r\n"
        f"Message-ID: <{seq}.{time.time_ns()}@example.org>\r\nX-Bench-Seq: {seq}\r\n\r\n"
    ).encode()
    line = b"x" * 76 + b"\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


async def clients(port: int, n: int, count: int, size: int) -> dict[int, tuple[float, float]]:
    """``count`` connections send ``n`` messages between them; seq -> (t0, t1)."""
    stamps: dict[int, tuple[float, float]] = {}
    todo = iter(range(n))

    async def reply(reader: asyncio.StreamReader) -> bytes:
        while True:
            line = await reader.readline()
            if not line:
                raise ConnectionError("closed")
            if line[3:4] != b"-":
                return line

    async def client() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await reply(reader)
        writer.write(b"EHLO client.bench\r\n")
        await reply(reader)
        for seq in todo:
            for cmd in (f"MAIL FROM:<{SENDER}>\r\n", f"RCPT TO:<{RCPT}>\r\n", "DATA\r\n"):
                writer.write(cmd.encode())
                line = await reply(reader)
                if not line.startswith((b"250", b"354")):
                    raise RuntimeError(f"{cmd.strip()}: {line!r}")
            body = message(seq, size) + b".\r\n"
            t0 = time.time()
            writer.write(body)
            line = await reply(reader)
            t1 = time.time()
            if not line.startswith(b"250"):
                raise RuntimeError(f"end of DATA: {line!r}")
            stamps[seq] = (t0, t1)
        writer.write(b"QUIT\r\n")
        with contextlib.suppress(ConnectionError):
            await reply(reader)
        writer.close()

    await asyncio.gather(*(client() for _ in range(count)))
    return stamps


# -- the disk floor ------------------------------------------------------------------------------


def disk_floor(where: Path, rounds: int = 200) -> dict[str, list[float]]:
    d = Path(tempfile.mkdtemp(prefix="fsync-probe.", dir=where))
    out: dict[str, list[float]] = {"file_fsync": [], "dir_fsync": []}
    data = b"x" * 5000
    try:
        dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        for i in range(rounds):
            t = time.perf_counter()
            fd = os.open(d / f"f{i}", os.O_WRONLY | os.O_CREAT, 0o600)
            os.write(fd, data)
            os.fsync(fd)
            os.close(fd)
            t2 = time.perf_counter()
            os.fsync(dfd)
            out["file_fsync"].append(t2 - t)
            out["dir_fsync"].append(time.perf_counter() - t2)
        os.close(dfd)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return out


# -- runs ----------------------------------------------------------------------------------------


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def run_one(
    args: argparse.Namespace, relay_name: str, count: int, work: Path
) -> dict[str, list[float]] | None:
    run_dir = Path(tempfile.mkdtemp(prefix=f"{relay_name}.", dir=work))
    run_dir.chmod(0o755)
    upstream: Upstream | None = None
    relay: PyRelay | Postfix | None = None
    try:
        upstream = Upstream(run_dir)
        port = free_port()
        if relay_name == "postfix":
            relay = Postfix(run_dir, port, upstream.port, None)
        elif relay_name == "pyrelay-1w":
            relay = PyRelay(run_dir, port, upstream.port, False, PYRELAY_WORKERS="1")
        else:
            relay = PyRelay(run_dir, port, upstream.port, False)  # product defaults
        relay.wait_listening(60)
        time.sleep(1.0)  # let start-up work settle
        sent = asyncio.run(clients(port, args.n, count, args.size))
        deadline = time.monotonic() + 60
        while upstream.received() < len(sent) and time.monotonic() < deadline:
            time.sleep(0.05)
        got = upstream.stamps()
        stages: dict[str, list[float]] = {s: [] for s in STAGES}
        for seq, (t0, t1) in sent.items():
            if seq not in got:
                continue
            t2, t3 = got[seq]
            stages["data_to_250"].append(t1 - t0)
            stages["250_to_upstream_mail"].append(t2 - t1)
            stages["upstream_transaction"].append(t3 - t2)
            stages["data_to_upstream"].append(t3 - t0)
        lost = len(sent) - len(stages["data_to_250"])
        say(
            f"relay={relay_name} clients={count} n={len(sent)} lost={lost} "
            + " ".join(
                f"{s}_p50_ms={pct(v, 50) * 1000:.2f} {s}_p99_ms={pct(v, 99) * 1000:.2f}"
                for s, v in stages.items()
                if v
            )
        )
        return stages
    except Exception as exc:  # one failed run must not lose the others
        run_failed(f"relay={relay_name} clients={count}", exc, relay)
        return None
    finally:
        run_cleanup(run_dir, relay, upstream)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--upstream", nargs=2, metavar=("PORT", "RECORDS"), help=argparse.SUPPRESS)
    ap.add_argument("-c", "--clients", default="1,10", help="client counts, comma-separated")
    ap.add_argument("-n", type=int, default=1000, help="messages per run")
    ap.add_argument("-r", "--repeats", type=int, default=3)
    ap.add_argument("-s", "--size", type=int, default=5000)
    ap.add_argument("--relays", default="postfix,pyrelay,pyrelay-1w")
    args = ap.parse_args()
    if args.upstream:
        try:
            import uvloop

            uvloop.run(upstream_main(int(args.upstream[0]), Path(args.upstream[1])))
        except ImportError:
            asyncio.run(upstream_main(int(args.upstream[0]), Path(args.upstream[1])))
        return 0
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, interrupted)
    work = Path(tempfile.mkdtemp(prefix="pyrelay-bench-latency-", dir="/var/tmp"))
    work.chmod(0o755)
    counts = [int(c) for c in args.clients.split(",")]
    relays = args.relays.split(",")
    floor = disk_floor(work)
    say(
        "disk floor (5 KB write + fsync; directory fsync): "
        + " ".join(
            f"{k}_p50_ms={pct(v, 50) * 1000:.2f} {k}_p99_ms={pct(v, 99) * 1000:.2f}"
            for k, v in floor.items()
        )
    )
    results: dict[tuple[str, int], dict[str, list[float]]] = {}
    try:
        for rep in range(args.repeats):
            for count in counts:
                for relay in relays:
                    say(f"# repeat {rep + 1}/{args.repeats}")
                    stages = run_one(args, relay, count, work)
                    if stages:
                        acc = results.setdefault((relay, count), {s: [] for s in STAGES})
                        for s, v in stages.items():
                            acc[s].append(pct(v, 50))
                            acc[s + "_p99"] = acc.get(s + "_p99", []) + [pct(v, 99)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    say("\nsummary: median over repeats of each run's p50 / p99, ms")
    for count in counts:
        for relay in relays:
            acc = results.get((relay, count))
            if not acc:
                continue
            say(
                f"clients={count:<3} {relay:<11} "
                + "  ".join(
                    f"{s} {statistics.median(acc[s]) * 1000:.2f}/"
                    f"{statistics.median(acc[s + '_p99']) * 1000:.2f}"
                    for s in STAGES
                )
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
