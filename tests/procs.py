"""Out-of-process helpers for the crash, resource and shutdown suites.

* ``RelayProc``: ``python -m pyrelay`` as a subprocess (so that ``kill -9`` and ``SIGTERM`` are
  real), its JSON log lines collected from stderr by a thread.
* ``SinkProc``: a recording upstream in its own process (it must outlive relay kills).  Run as
  ``python tests/procs.py sink ...``; it appends one JSON line per accepted message (test id,
  relay queue id, time) to a record file *before* answering ``250``, so the record is an upper
  bound of what the relay may believe was delivered.  ``SinkProc.arrivals()`` lists the messages
  whose DATA arrived, before any delay (those in flight).  Both carry the *epoch* that
  ``set_epoch`` had set when the connection was opened, to tell which relay run sent a copy.  A
  control directory steers it at run time:

  - ``CONTROL/defer`` exists: answer ``451`` at the end of DATA (nothing recorded);
  - ``CONTROL/nodelay`` exists: answer at once (no simulated upstream latency), except on
    connections opened before the latest ``set_epoch``;
  - ``CONTROL/kill`` holds ``"<pid> <mode> <delay>"``: the next DATA end kills that pid with
    SIGKILL (one shot), ``before250`` (recorded, relay never hears the 250: the duplicate window),
    ``after250`` or ``after451`` (kill ``delay`` seconds after the reply: during the spool
    unlink / the move to ``deferred/``).

* ``send_one``: a blocking stdlib ``smtplib`` client like a web app, optionally dripping DATA.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SENDER = "app@example.org"
RCPT = "user@dest.test"
_QID = re.compile(rb"\(pyrelay\) with \S+ id ([0-9A-F]+)")
_TEST_ID = re.compile(rb"^X-Test-Id: (\S+)\r?$", re.M)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def encode_v1(fields: dict[str, Any]) -> bytes:
    """A queue file header in pyrelay 0.1's format (``PYRELAY1``): what an upgraded relay finds
    in its spool.  ``fields`` are the 0.1 envelope's JSON fields."""
    js = json.dumps(fields).encode()
    return b"PYRELAY1 " + str(len(js)).encode() + b"\n" + js + b"\n"


def make_message(test_id: str, size: int = 0) -> bytes:
    body = b"".join(
        b"line %06d of the test message body padding padding\r\n" % i for i in range(size // 56 + 1)
    )
    return (
        f"From: App <{SENDER}>\r\nTo: <{RCPT}>\r\nSubject: test {test_id}\r\n"
        f"X-Test-Id: {test_id}\r\n\r\n"
    ).encode() + body


# -- client ---------------------------------------------------------------------------------


@dataclass
class SendResult:
    test_id: str
    code: int | None = None  # final reply to DATA, None if the connection failed first
    text: str = ""
    queue_id: str | None = None
    error: str = ""
    stage: str = ""  # where it stopped: connect, mail, rcpt, data, done
    finished: float = 0.0

    @property
    def accepted(self) -> bool:
        return self.code == 250

    def failed(self, exc: OSError | smtplib.SMTPException) -> None:
        """Record why the client stopped (and the server's reply, if it sent one)."""
        self.error = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, smtplib.SMTPResponseException):
            self.code, self.text = exc.smtp_code, exc.smtp_error.decode(errors="replace")


def send_one(
    port: int,
    test_id: str,
    *,
    size: int = 0,
    drip: float = 0.0,
    chunks: int = 1,
    timeout: float = 10.0,
    on_data: Callable[[], None] | None = None,
) -> SendResult:
    """Send one message; ``drip`` seconds between ``chunks`` pieces of DATA (a slow client)."""
    res = SendResult(test_id)
    payload = make_message(test_id, size)
    smtp: smtplib.SMTP | None = None
    try:
        res.stage = "connect"
        smtp = smtplib.SMTP("127.0.0.1", port, local_hostname="app.test", timeout=timeout)
        smtp.ehlo()
        res.stage = "mail"
        code, text = smtp.mail(SENDER)
        if code != 250:
            res.code, res.text = code, text.decode(errors="replace")
            return res
        res.stage = "rcpt"
        code, text = smtp.rcpt(RCPT)
        if code != 250:
            res.code, res.text = code, text.decode(errors="replace")
            return res
        res.stage = "data"
        smtp.putcmd("data")
        code, text = smtp.getreply()
        if code != 354:
            res.code, res.text = code, text.decode(errors="replace")
            return res
        if on_data is not None:
            on_data()
        wire = payload.replace(b"\r\n.", b"\r\n..")
        assert smtp.sock is not None
        step = max(1, len(wire) // max(1, chunks))
        for i in range(0, len(wire), step):
            smtp.sock.sendall(wire[i : i + step])
            if drip:
                time.sleep(drip)
        smtp.sock.sendall(b".\r\n")
        code, text = smtp.getreply()
        res.code, res.text = code, text.decode(errors="replace")
        match = re.search(r"queued as ([0-9A-F]+)", res.text)
        res.queue_id = match.group(1) if match else None
        res.stage = "done"
        try:
            smtp.quit()
        except (OSError, smtplib.SMTPException):
            pass
    except (OSError, smtplib.SMTPException) as exc:
        res.failed(exc)
    finally:
        res.finished = time.time()
        if smtp is not None:
            try:
                smtp.close()
            except OSError:
                pass
    return res


# -- relay subprocess -----------------------------------------------------------------------


@dataclass
class RelayProc:
    """One run (generation) of ``python -m pyrelay``."""

    env: dict[str, str]
    prefix: list[str] = field(default_factory=list)  # e.g. MemCgroup.wrapper(): runs it in a cgroup
    proc: subprocess.Popen[bytes] | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    raw: list[str] = field(default_factory=list)
    started_at: float = 0.0
    ended_at: float = 0.0
    killed: bool = False
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _reader: threading.Thread | None = None

    def start(self) -> RelayProc:
        self.started_at = time.time()
        self.proc = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "pyrelay"],
            cwd=REPO,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            text = line.decode(errors="replace").rstrip("\n")
            with self._cond:
                self.raw.append(text)
                try:
                    ev = json.loads(text)
                except ValueError:
                    ev = None
                if isinstance(ev, dict):
                    self.events.append(ev)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_event(
        self, pred: Callable[[dict[str, Any]], bool], timeout: float
    ) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for ev in self.events[seen:]:
                    if pred(ev):
                        return ev
                seen = len(self.events)
                left = deadline - time.monotonic()
                if left <= 0 or (
                    self.proc is not None
                    and self.proc.poll() is not None
                    and not self._alive_reader()
                ):
                    return None
                self._cond.wait(min(left, 0.1))

    def _alive_reader(self) -> bool:
        return self._reader is not None and self._reader.is_alive()

    def wait_started(self, timeout: float = 15.0, processes: int = 1) -> None:
        """Until the primary has started and ``processes`` of the relay's processes (the primary
        and its workers each log it) have logged ``listening``."""
        listening = 0

        def started(e: dict[str, Any]) -> bool:
            nonlocal listening
            listening += e.get("event") == "listening"
            return listening >= processes

        ev = self.wait_event(lambda e: e.get("event") == "started", timeout)
        if ev is not None and processes > 1:
            ev = self.wait_event(started, timeout)
        if ev is None:
            self.kill()
            raise AssertionError("relay did not start:\n" + "\n".join(self.raw[-30:]))

    def named(self, event: str) -> list[dict[str, Any]]:
        with self._cond:
            return [e for e in self.events if e.get("event") == event]

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.killed = True
        self.wait(10)

    def terminate(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int | None:
        assert self.proc is not None
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        if not self.ended_at:
            self.ended_at = time.time()
        if self._reader is not None:
            self._reader.join(5)
        return rc


def relay_env(*, relay_port: int, sink_port: int, spool: Path, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PYRELAY_", "RELAYHOST", "POSTFIX_", "ALLOW", "MASQUERADE"))
    }
    env.update(
        RELAYHOST=f"[127.0.0.1]:{sink_port}",
        RELAYHOST_TLS_LEVEL="none",
        ALLOWED_SENDER_DOMAINS="example.org",
        PYRELAY_LISTEN=f"127.0.0.1:{relay_port}",
        PYRELAY_SPOOL_DIR=str(spool),
        PYRELAY_HOSTNAME="relay.test",
        PYRELAY_MIN_BACKOFF="0.2s",
        PYRELAY_MAX_BACKOFF="1s",
        PYRELAY_LOG_FORMAT="json",
        PYRELAY_CONCURRENCY="4",
        PYRELAY_UPSTREAM_IDLE_TIMEOUT="1s",
        PYRELAY_UPSTREAM_CONNECT_TIMEOUT="3s",
        PYRELAY_UPSTREAM_COMMAND_TIMEOUT="5s",
        PYRELAY_UPSTREAM_DATA_TIMEOUT="5s",
        PYRELAY_SHUTDOWN_GRACE="3s",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


# -- sink subprocess ------------------------------------------------------------------------


@dataclass
class Delivery:
    t: float
    test_id: str
    queue_id: str
    size: int
    hops: int = 0  # Received: headers
    sender: str = ""
    rcpts: tuple[str, ...] = ()
    epoch: int = 0  # SinkProc.set_epoch() when the relay opened the connection


class SinkProc:
    """The recording upstream in its own process; survives relay kills."""

    def __init__(
        self,
        workdir: Path,
        *,
        delay: tuple[float, float] = (0.0, 0.0),
        defer_prob: float = 0.0,
    ) -> None:
        self.record = workdir / "sink-record.jsonl"
        self.arrivals_file = workdir / "sink-record.jsonl.arrivals"
        self.control = workdir / "sink-control"
        self.control.mkdir(parents=True, exist_ok=True)
        self.record.touch()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "sink",
                str(self.record),
                str(self.control),
                str(delay[0]),
                str(delay[1]),
                str(defer_prob),
            ],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        if not line.startswith("READY "):
            self.proc.kill()
            raise AssertionError(f"sink did not start: {line!r}")
        self.port = int(line.split()[1])

    def deliveries(self) -> list[Delivery]:
        out = []
        for line in self.record.read_text().splitlines():
            try:
                d = json.loads(line)
            except ValueError:
                continue
            out.append(
                Delivery(
                    d["t"],
                    d["id"],
                    d["qid"],
                    d["n"],
                    d.get("hops", 0),
                    d.get("from", ""),
                    tuple(d.get("rcpt", ())),
                    d.get("epoch", 0),
                )
            )
        return out

    def arrivals(self) -> list[tuple[float, str]]:
        """(time, test id) of every message whose DATA the sink has received, before it waits."""
        out = []
        with contextlib.suppress(FileNotFoundError):
            for line in self.arrivals_file.read_text().splitlines():
                try:
                    d = json.loads(line)
                except ValueError:
                    continue
                out.append((d["t"], d["id"]))
        return out

    def set_defer(self, on: bool) -> None:
        path = self.control / "defer"
        if on:
            path.touch()
        else:
            path.unlink(missing_ok=True)

    def set_epoch(self, epoch: int) -> None:
        """Stamp the records of connections opened from now on with ``epoch``."""
        tmp = self.control / "epoch.tmp"
        tmp.write_text(str(epoch))
        os.replace(tmp, self.control / "epoch")

    def set_nodelay(self, on: bool) -> None:
        path = self.control / "nodelay"
        if on:
            path.touch()
        else:
            path.unlink(missing_ok=True)

    def arm_kill(self, pid: int, mode: str, delay: float = 0.0) -> None:
        tmp = self.control / "kill.tmp"
        tmp.write_text(f"{pid} {mode} {delay}")
        os.replace(tmp, self.control / "kill")

    def disarm_kill(self) -> bool:
        """True if the armed kill was still pending (and is now cancelled)."""
        try:
            os.unlink(self.control / "kill")
            return True
        except FileNotFoundError:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _sink_main(record: str, control: str, dmin: str, dmax: str, defer_prob: str) -> None:
    import asyncio
    import random

    from aiosmtpd.smtp import SMTP

    ctl = Path(control)
    lo, hi, p_defer = float(dmin), float(dmax), float(defer_prob)
    out = open(record, "ab", buffering=0)  # noqa: SIM115 - lives as long as the process
    arrived = open(record + ".arrivals", "ab", buffering=0)  # noqa: SIM115 - likewise

    def take_kill() -> tuple[int, str, float] | None:
        mine = ctl / f"kill.taken.{os.getpid()}.{random.random()}"
        try:
            os.rename(ctl / "kill", mine)
        except FileNotFoundError:
            return None
        pid, mode, delay = mine.read_text().split()
        mine.unlink()
        return int(pid), mode, float(delay)

    def do_kill(pid: int) -> None:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def current_epoch() -> int:
        try:
            return int((ctl / "epoch").read_text())
        except (OSError, ValueError):
            return 0

    class EpochSMTP(SMTP):
        epoch = 0

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self.epoch = current_epoch()

    class Handler:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            content: bytes = envelope.original_content or envelope.content or b""
            head = content.split(b"\r\n\r\n", 1)[0]
            tid = _TEST_ID.search(head)
            test_id = tid.group(1).decode() if tid else "?"
            epoch = getattr(server, "epoch", 0)
            arrival = {"t": time.time(), "id": test_id, "epoch": epoch}
            arrived.write(json.dumps(arrival).encode() + b"\n")
            # nodelay spares only the current epoch: connections a killed relay opened before
            # the epoch changed keep waiting, so the data they had sent is not answered.
            if hi > 0 and (not (ctl / "nodelay").exists() or 0 < epoch < current_epoch()):
                await asyncio.sleep(random.uniform(lo, hi))
            kill = take_kill()
            loop = asyncio.get_running_loop()
            if (ctl / "defer").exists() or random.random() < p_defer:
                if kill and kill[1] == "after451":
                    loop.call_later(kill[2], do_kill, kill[0])
                elif kill:  # not the moment it was armed for: re-arm
                    (ctl / "kill").write_text(f"{kill[0]} {kill[1]} {kill[2]}")
                return "451 4.3.0 try again later (test sink)"
            if kill and kill[1] == "after451":
                (ctl / "kill").write_text(f"{kill[0]} {kill[1]} {kill[2]}")
                kill = None
            qid = _QID.search(head)
            rec = {
                "t": time.time(),
                "id": test_id,
                "qid": qid.group(1).decode() if qid else "?",
                "n": len(content),
                "hops": len(re.findall(rb"^Received:", head, re.M | re.I)),
                "from": envelope.mail_from,
                "rcpt": list(envelope.rcpt_tos),
                "epoch": epoch,
            }
            out.write(json.dumps(rec).encode() + b"\n")
            if kill and kill[1] == "before250":
                do_kill(kill[0])
                await asyncio.sleep(0.05)
            elif kill and kill[1] == "after250":
                loop.call_later(kill[2], do_kill, kill[0])
            return "250 2.0.0 Ok: recorded"

    async def main() -> None:
        loop = asyncio.get_running_loop()
        handler = Handler()
        server = await loop.create_server(
            lambda: EpochSMTP(handler, hostname="sink.test", enable_SMTPUTF8=True, loop=loop),
            host="127.0.0.1",
            port=0,
        )
        port = server.sockets[0].getsockname()[1]
        sys.stdout.write(f"READY {port}\n")
        sys.stdout.flush()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        server.close()

    asyncio.run(main())


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == "sink":
        _sink_main(*sys.argv[2:])
    else:
        sys.exit("usage: procs.py sink RECORD CONTROL DELAY_MIN DELAY_MAX DEFER_PROB")
