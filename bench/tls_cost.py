"""Cost of STARTTLS on the listener (issue 11): pyrelay and Postfix, each with and without TLS.

N messages of ``--size`` bytes (default 1000 x 5000) are sent by ``-c`` concurrent clients: Python
threads using stdlib ``smtplib`` the way a web app does, one message per connection (connect,
EHLO, ``starttls()`` with an unverified context in the TLS configs, ``sendmail``, QUIT).  Each run
gets a fresh relay and a fresh Postfix ``smtp-sink`` upstream on 127.0.0.1.  The configs:

- ``pyrelay-plain``: ``PYRELAY_SMTPD_TLS_LEVEL=none``, clients without STARTTLS;
- ``pyrelay-tls``:   ``PYRELAY_SMTPD_TLS_LEVEL=may`` (self-signed RSA-2048 certificate the relay
  generates in its spool before it listens), clients with STARTTLS;
- ``postfix-plain``: a private Postfix instance under a temp dir configured like
  ``shared/bench/relay_bench.sh`` (``smtpd_tls_security_level = none``), clients without STARTTLS;
- ``postfix-tls``:   the same plus ``smtpd_tls_security_level = may`` and a self-signed RSA-2048
  certificate generated here, clients with STARTTLS.

Everything else is the product default (``PYRELAY_WORKERS`` unset, ``RELAYHOST_TLS_LEVEL=none``,
``ALLOWED_SENDER_DOMAINS`` = the sender's domain).  Runs are interleaved (for each repeat, each
config) and each prints one line:

- ``accept_msgs_per_s``: messages answered 250 / wall time from the first connect until the last
  client finished;
- ``e2e_msgs_per_s``: messages ``smtp-sink`` received / time from the first connect until it had
  them all (``smtp-sink -c`` counters read through a pty; bounded by ``--e2e-timeout``);
- ``cpu_s_per_1000``: user+system CPU of the relay's whole process tree (reaped children
  included: Postfix's smtpd/cleanup/smtp processes come and go) from the first connect until the
  sink had everything, per 1000 accepted messages; ``client_cpu_s`` is this script's own CPU
  (the client threads), which shares the machine's cores with the relay.

Then per config the median [min-max] over repeats, and the ratios TLS/plain per relay and
pyrelay/Postfix per listener mode, each computed within a repeat (paired) and summarised the same
way.

    python bench/tls_cost.py                      # 1000 messages, 10 clients, 3 repeats
    python bench/tls_cost.py -n 200 -r 1          # smoke run
    python bench/tls_cost.py --configs pyrelay-plain,pyrelay-tls

Needs Debian's ``postfix`` package (``smtp-sink``, and ``postfix`` for the Postfix configs) and
root for the private Postfix instance.  Every wait is bounded; the relays, sinks and temp dirs
are removed on any exit (also on SIGTERM/SIGINT).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pty
import re
import shutil
import signal
import smtplib
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from benchlib import (
    RCPT,
    SENDER,
    Relay,
    accepts,
    free_port,
    relay_env,
    stop_process,
    tree_pids,
    wait_accepting,
)

CONFIGS = ("pyrelay-plain", "pyrelay-tls", "postfix-plain", "postfix-tls")
PF_HOSTNAME = "relay-bench.localdomain"


def say(text: str) -> None:
    print(text, flush=True)


class Stoppable(Protocol):
    def stop(self) -> None: ...


# Everything started and not yet stopped; guarded() stops what is left on any exit.  A
# termination signal raises KeyboardInterrupt, but not between a process's start and its
# registration here (``signals_held``: the interrupt is raised at the end of the block instead).
LIVE: list[Stoppable] = []
_held = 0
_pending: list[int] = []


def interrupted(signum: int, _frame: object) -> None:
    if _held:
        _pending.append(signum)
    else:
        raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    global _held
    _held += 1
    try:
        yield
    finally:
        _held -= 1
    if _pending and not _held:
        raise KeyboardInterrupt(f"signal {_pending[0]}")


def sbin(name: str) -> str | None:
    return shutil.which(name) or (
        f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None
    )


# -- shared by the scripts that drive a relay beside Postfix (bench/distant.py too) -----------


def common_options(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--e2e-timeout", type=float, default=120, help="wait for the sink (s)")
    ap.add_argument("--start-timeout", type=float, default=60, help="relay start limit (s)")
    ap.add_argument("--workdir", default=None, help="parent of the temp dir (default: TMPDIR)")


def parse_configs(ap: argparse.ArgumentParser, text: str, choices: Sequence[str]) -> list[str]:
    configs = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in configs if c not in choices]
    if unknown or not configs:
        ap.error(f"unknown config(s) {unknown}; choose from {','.join(choices)}")
    return configs


def need_postfix(ap: argparse.ArgumentParser, what: str) -> None:
    """Exit with usage if ``postfix`` cannot run a private instance (/usr/sbin joins PATH)."""
    if not shutil.which("postfix") and Path("/usr/sbin/postfix").exists():
        os.environ["PATH"] += ":/usr/sbin"
    if not shutil.which("postfix") or os.geteuid() != 0:
        ap.error(f"{what} need the postfix command and root")


def wait_delivered(
    received: Callable[[], int], want: int, relay: PyRelay | Postfix, deadline: float
) -> None:
    """Until ``received()`` reaches ``want``, ``deadline`` (monotonic) passes or the relay dies
    (checked twice a second)."""
    checked = time.monotonic()
    while received() < want and time.monotonic() < deadline:
        if time.monotonic() - checked > 0.5:
            if not relay.alive():
                return
            checked = time.monotonic()
        time.sleep(0.01)


def guarded(prefix: str, workdir: str | None, body: Callable[[Path], int]) -> int:
    """``body(work)`` with a fresh temp dir (mode 0755: the postfix user must reach its queue and
    files below it); SIGTERM/SIGHUP unwind like Ctrl-C (exit code 130), and on any exit whatever
    is left in ``LIVE`` is stopped and the temp dir removed."""
    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    for signum in signals:
        signal.signal(signum, interrupted)
    work: Path | None = None
    try:
        work = Path(tempfile.mkdtemp(prefix=prefix, dir=workdir))
        work.chmod(0o755)
        return body(work)
    except KeyboardInterrupt as exc:
        say(f"interrupted ({exc or 'SIGINT'}); cleaning up")
        return 130
    finally:
        for signum in signals:
            signal.signal(signum, signal.SIG_IGN)  # a second signal must not cut the cleanup
        for leftover in reversed(LIVE[:]):
            with contextlib.suppress(Exception):
                leftover.stop()
            with contextlib.suppress(ValueError):
                LIVE.remove(leftover)
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)


# -- CPU of a process tree, reaped children included ------------------------------------------


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


class Tree:
    """A process tree's CPU (utime+stime+cutime+cstime).  Pids are remembered with their start
    time, so a process that exits keeps counting through its parent's cutime/cstime and a reused
    pid is never counted or killed."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.known: dict[int, str] = {}

    def pids(self) -> list[int]:
        for pid in tree_pids(self.root):
            st = _stat(pid)
            if st and pid not in self.known:
                self.known[pid] = st[19]
        alive = []
        for pid, start in self.known.items():
            st = _stat(pid)
            if st and st[19] == start and st[0] != "Z":
                alive.append(pid)
        return alive

    def cpu(self) -> float:
        total = 0
        for pid in self.pids():
            st = _stat(pid)
            if st:
                total += sum(int(x) for x in st[11:15])
        return total / os.sysconf("SC_CLK_TCK")

    def kill(self, grace: float) -> None:
        """SIGTERM what is left, SIGKILL it after ``grace`` seconds."""
        pids = self.pids()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                pids = self.pids()
                if not pids:
                    return
                time.sleep(0.05)


# -- the upstream: smtp-sink, its counters read through a pty ------------------------------------


class SmtpSink:
    """``smtp-sink -c``: it writes its counters only to a terminal, so it gets a pty and a thread
    keeps the latest ``mesg=`` count."""

    _MESG = re.compile(rb"mesg=(\d+)")

    def __init__(self, port: int) -> None:
        binary = sbin("smtp-sink")
        if binary is None:
            raise RuntimeError("smtp-sink not found (Debian's postfix package)")
        self.port = port
        self.received = 0
        master, slave = pty.openpty()
        cmd = [binary, "-c", f"127.0.0.1:{port}", "1024"]
        if os.geteuid() == 0:
            cmd[1:1] = ["-u", "nobody"]
        self._fd = master
        self._reader = threading.Thread(target=self._read, daemon=True)
        try:
            with signals_held():
                self.proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=slave,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
                LIVE.append(self)
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
        self._reader.start()
        try:
            wait_accepting(port, self.proc, "smtp-sink")
        except RuntimeError:
            self.stop()
            raise

    def _read(self) -> None:
        tail = b""
        while True:
            try:
                chunk = os.read(self._fd, 65536)
            except OSError:  # EIO once the sink is gone
                break
            if not chunk:
                break
            tail = (tail + chunk)[-256:]
            counts = self._MESG.findall(tail)
            if counts:
                self.received = int(counts[-1])

    def stop(self) -> None:
        stop_process(self.proc)
        if self._reader.is_alive():
            self._reader.join(2)
        with contextlib.suppress(OSError):
            os.close(self._fd)
        with contextlib.suppress(ValueError):
            LIVE.remove(self)


# -- the relays --------------------------------------------------------------------------------


def self_signed(directory: Path, hostname: str) -> tuple[Path, Path]:
    """The same kind of key and certificate pyrelay generates for itself (one PEM file with
    both, which Postfix reads as cert and key file alike)."""
    from pyrelay.smtpd_tls import generate_self_signed

    pem = directory / "tls.pem"
    generate_self_signed(pem, hostname)
    return pem, pem


class PyRelay:
    name = "pyrelay"

    def __init__(self, work: Path, port: int, sink_port: int, tls: bool, **extra: str) -> None:
        """``extra``: more environment variables (e.g. the upstream's TLS settings)."""
        env = relay_env(
            port,
            sink_port,
            work / "spool",
            PYRELAY_SMTPD_TLS_LEVEL="may" if tls else "none",
            **extra,
        )
        env["ALLOWED_SENDER_DOMAINS"] = SENDER.rsplit("@", 1)[1]
        with signals_held():
            self.relay = Relay(env)
            LIVE.append(self)
        self.tree = Tree(self.relay.pid)

    def wait_listening(self, timeout: float) -> None:
        self.relay.wait_listening(timeout)
        self.tree.pids()

    def alive(self) -> bool:
        return self.relay.alive()

    def diagnostics(self) -> str:
        return self.relay.log_tail()

    def stop(self) -> None:
        self.relay.stop(grace=15)
        self.tree.kill(5)
        with contextlib.suppress(ValueError):
            LIVE.remove(self)


class Postfix:
    """A private Postfix instance in ``work``, configured like ``relay_bench.sh``'s pf_start;
    ``settings`` replace or add main.cf parameters (e.g. ``relayhost``, ``smtp_tls_*``),
    ``services`` enables master.cf services that are commented out (e.g. ``tlsproxy``)."""

    name = "postfix"

    def __init__(
        self,
        work: Path,
        port: int,
        sink_port: int,
        tls: tuple[Path, Path] | None,
        settings: dict[str, str] | None = None,
        services: tuple[str, ...] = (),
    ) -> None:
        self.port = port
        self.dir = work / "pf"
        self.etc = self.dir / "etc"
        self.tree: Tree | None = None
        for sub in ("etc", "queue", "data"):
            (self.dir / sub).mkdir(parents=True)
        master = []
        for line in Path("/etc/postfix/master.cf").read_text().splitlines():
            if line.startswith("#") and line[1:].split()[:1] in ([s] for s in services):
                line = line[1:]
            fields = line.split()
            if re.match(r"[a-z]", line) and len(fields) >= 8:
                if fields[0] == "smtp" and fields[1] == "inet":
                    fields[0] = f"127.0.0.1:{port}"
                fields[4] = "n"  # no chroot
                line = " ".join(fields)
            master.append(line)
        (self.etc / "master.cf").write_text("\n".join(master) + "\n")
        d = self.dir
        main = f"""\
compatibility_level = 3.6
queue_directory = {d}/queue
data_directory = {d}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = {PF_HOSTNAME}
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
relayhost = [127.0.0.1]:{sink_port}
smtp_tls_security_level = none
maillog_file = {d}/maillog
maillog_file_prefixes = {d}
biff = no
"""
        if tls:
            cert, key = tls
            main += (
                "smtpd_tls_security_level = may\n"
                f"smtpd_tls_cert_file = {cert}\nsmtpd_tls_key_file = {key}\n"
            )
        else:
            main += "smtpd_tls_security_level = none\n"
        for name, value in (settings or {}).items():
            line = f"{name} = {value}"
            escaped = line.replace("\\", "\\\\")  # a replacement template
            main, found = re.subn(rf"(?m)^{re.escape(name)} = .*$", escaped, main)
            if not found:
                main += line + "\n"
        (self.etc / "main.cf").write_text(main)
        shutil.chown(self.dir / "data", "postfix")
        self._postfix("check")
        with signals_held():
            LIVE.append(self)  # stop() runs `postfix stop` even if the master's pid is unknown
        out = self._postfix("start")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and self._find_master() is None:
            time.sleep(0.05)
        if self.tree is None:
            raise RuntimeError(f"postfix did not start: {out}\n{self.diagnostics()}")

    def _find_master(self) -> Tree | None:
        if self.tree is None:
            pid_file = self.dir / "queue" / "pid" / "master.pid"
            with contextlib.suppress(OSError, ValueError):
                self.tree = Tree(int(pid_file.read_text().strip()))
        return self.tree

    def _postfix(self, command: str) -> str:
        proc = subprocess.run(
            ["postfix", "-c", str(self.etc), command],
            capture_output=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        return (proc.stdout + proc.stderr).decode(errors="replace").strip()

    def wait_listening(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not accepts(self.port):
            if time.monotonic() > deadline or not self.alive():
                raise RuntimeError("postfix not listening:\n" + self.diagnostics())
            time.sleep(0.02)
        assert self.tree is not None
        self.tree.pids()

    def alive(self) -> bool:
        return self.tree is not None and self.tree.root in self.tree.pids()

    def diagnostics(self) -> str:
        with contextlib.suppress(OSError):
            return "\n".join((self.dir / "maillog").read_text().splitlines()[-15:])
        return ""

    def stop(self) -> None:
        tree = self._find_master()
        if tree is not None:
            tree.pids()  # remember the children before the master goes
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._postfix("stop")
        tree = self._find_master()
        if tree is not None:
            deadline = time.monotonic() + 10
            while tree.pids() and time.monotonic() < deadline:
                time.sleep(0.1)
            tree.kill(5)
        with contextlib.suppress(ValueError):
            LIVE.remove(self)


# -- the clients -------------------------------------------------------------------------------


def make_message(size: int) -> bytes:
    head = (
        f"From: <{SENDER}>\r\nTo: <{RCPT}>\r\nSubject: tls cost bench\r\n"
        f"Message-ID: <{time.time_ns()}@example.org>\r\n\r\n"
    ).encode()
    line = b"x" * 76 + b"\r\n"
    body = line * max(0, (size - len(head)) // len(line) + 1)
    return head + body[: max(0, size - len(head) - 2)] + b"\r\n"


@dataclass
class Send:
    ok: int = 0
    failed: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    first_error: str = ""
    tls: str = "-"
    lock: threading.Lock = field(default_factory=threading.Lock)


def send_all(
    port: int,
    n: int,
    clients: int,
    msg: bytes,
    starttls: bool,
    conn_timeout: float,
    deadline: float,
) -> Send:
    """``n`` messages, one per connection, from ``clients`` threads; stops taking new messages
    at ``deadline`` (monotonic)."""
    result = Send()
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    todo = iter(range(n))
    todo_lock = threading.Lock()

    def one() -> None:
        smtp = smtplib.SMTP("127.0.0.1", port, timeout=conn_timeout)
        try:
            smtp.ehlo()
            if starttls:
                smtp.starttls(context=ctx)
                sock = smtp.sock
                if result.tls == "-" and isinstance(sock, ssl.SSLSocket):
                    cipher = sock.cipher()
                    result.tls = f"{sock.version()}/{cipher[0] if cipher else '?'}"
            smtp.sendmail(SENDER, [RCPT], msg)
            smtp.quit()
        finally:
            smtp.close()

    def client() -> None:
        while time.monotonic() < deadline:
            with todo_lock:
                if next(todo, None) is None:
                    return
            try:
                one()
            except (OSError, smtplib.SMTPException) as exc:
                with result.lock:
                    result.failed += 1
                    kind = type(exc).__name__
                    result.errors[kind] = result.errors.get(kind, 0) + 1
                    result.first_error = result.first_error or f"{kind}: {exc}"[:200]
            else:
                with result.lock:
                    result.ok += 1

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()) + conn_timeout * 4 + 5)
    with result.lock:
        if any(t.is_alive() for t in threads):
            result.first_error = result.first_error or "client threads still running at deadline"
        result.failed = n - result.ok  # messages never sent count as failed too
    return result


# -- one run -----------------------------------------------------------------------------------


def run_one(
    args: argparse.Namespace,
    rep: int,
    config: str,
    work: Path,
    pf_cert: tuple[Path, Path] | None,
) -> dict[str, float] | None:
    relay_name, mode = config.split("-")
    tls = mode == "tls"
    run_dir = Path(tempfile.mkdtemp(prefix=f"{config}.", dir=work))
    run_dir.chmod(0o755)
    sink: SmtpSink | None = None
    relay: PyRelay | Postfix | None = None
    tag = f"config={config}"
    try:
        sink = SmtpSink(free_port())
        port = free_port()
        if relay_name == "pyrelay":
            relay = PyRelay(run_dir, port, sink.port, tls)
        else:
            relay = Postfix(run_dir, port, sink.port, pf_cert if tls else None)
        relay.wait_listening(args.start_timeout)
        msg = make_message(args.size)
        cpu0, own0 = relay.tree.cpu(), sum(os.times()[:2])
        t0 = time.monotonic()
        sent = send_all(port, args.n, args.clients, msg, tls, args.conn_timeout, t0 + args.timeout)
        t1 = time.monotonic()
        own1 = sum(os.times()[:2])
        wait_delivered(lambda: sink.received, sent.ok, relay, t1 + args.e2e_timeout)
        t2 = time.monotonic()
        cpu1 = relay.tree.cpu()
        received = sink.received
        complete = received >= sent.ok and sent.ok > 0
        row = {
            "accept": sent.ok / (t1 - t0),
            "e2e": received / (t2 - t0) if complete else float("nan"),
            "cpu1000": (cpu1 - cpu0) * 1000 / max(1, sent.ok),
        }
        errors = ",".join(f"{k}:{v}" for k, v in sorted(sent.errors.items())) or "-"
        say(
            f"run={rep}/{args.repeats} {tag} n={args.n} clients={args.clients} "
            f"size={len(msg)} ok={sent.ok} failed={sent.failed} delivered={received}"
            f"{'' if complete else ' (INCOMPLETE)'} send_s={t1 - t0:.2f} e2e_s={t2 - t0:.2f} "
            f"accept_msgs_per_s={row['accept']:.1f} e2e_msgs_per_s={row['e2e']:.1f} "
            f"relay_cpu_s={cpu1 - cpu0:.2f} cpu_s_per_1000={row['cpu1000']:.2f} "
            f"client_cpu_s={own1 - own0:.2f} tls={sent.tls} errors={errors}"
        )
        if sent.first_error:
            say(f"  first error: {sent.first_error}")
        if not complete or not relay.alive():
            say(
                f"  relay {'alive' if relay.alive() else 'DEAD'}; log tail:\n" + relay.diagnostics()
            )
        return row
    except Exception as exc:  # one failed run must not lose the others
        run_failed(f"run={rep}/{args.repeats} {tag}", exc, relay)
        return None
    finally:
        run_cleanup(run_dir, relay, sink)


def run_failed(tag: str, exc: Exception, relay: PyRelay | Postfix | None) -> None:
    """Say why a run failed, with the relay's log tail (the other runs go on)."""
    say(f"{tag} FAILED: {type(exc).__name__}: {exc}")
    if relay is not None:
        say(relay.diagnostics())


def run_cleanup(run_dir: Path, *things: Stoppable | None) -> None:
    """Stop what a run started, in order, and remove its directory."""
    for thing in things:
        if thing is not None:
            thing.stop()
    shutil.rmtree(run_dir, ignore_errors=True)


# -- summary -----------------------------------------------------------------------------------


def spread(values: list[float], fmt: str = ".1f") -> str:
    values = [v for v in values if v == v]  # drop NaN (incomplete runs)
    if not values:
        return "n/a"
    return f"{statistics.median(values):{fmt}} [{min(values):{fmt}}-{max(values):{fmt}}]"


def summarize(results: dict[str, list[dict[str, float] | None]], configs: list[str]) -> None:
    say("summary: median [min-max] over repeats")
    for config in configs:
        rows = [r for r in results[config] if r is not None]
        say(
            f"  {config:14} runs={len(rows)}"
            f" accept_msgs_per_s={spread([r['accept'] for r in rows])}"
            f" e2e_msgs_per_s={spread([r['e2e'] for r in rows])}"
            f" cpu_s_per_1000={spread([r['cpu1000'] for r in rows], '.2f')}"
        )
    pairs = [
        ("pyrelay tls/plain", "pyrelay-tls", "pyrelay-plain"),
        ("postfix tls/plain", "postfix-tls", "postfix-plain"),
        ("pyrelay/postfix plain", "pyrelay-plain", "postfix-plain"),
        ("pyrelay/postfix tls", "pyrelay-tls", "postfix-tls"),
    ]
    say("ratios (paired within each repeat): median [min-max]")
    for label, a, b in pairs:
        if a not in results or b not in results:
            continue
        ratios: dict[str, list[float]] = {"accept": [], "e2e": [], "cpu1000": []}
        for ra, rb in zip(results[a], results[b], strict=True):
            if ra is None or rb is None:
                continue
            for key in ratios:
                if rb[key] and rb[key] == rb[key] and ra[key] == ra[key]:
                    ratios[key].append(ra[key] / rb[key])
        say(
            f"  {label:22} accept={spread(ratios['accept'], '.2f')} "
            f"e2e={spread(ratios['e2e'], '.2f')} cpu_per_msg={spread(ratios['cpu1000'], '.2f')}"
        )


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("-n", type=int, default=1000, help="messages per run")
    ap.add_argument("-c", "--clients", type=int, default=10, help="concurrent client threads")
    ap.add_argument("-s", "--size", type=int, default=5000, help="message size in bytes")
    ap.add_argument("-r", "--repeats", type=int, default=3, help="interleaved repeats")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma list of configs")
    ap.add_argument("--timeout", type=float, default=600, help="send phase limit per run (s)")
    ap.add_argument("--conn-timeout", type=float, default=30, help="client socket timeout (s)")
    common_options(ap)
    args = ap.parse_args()
    configs = parse_configs(ap, args.configs, CONFIGS)
    if sbin("smtp-sink") is None:
        ap.error("smtp-sink not found: install Debian's postfix package")
    if any(c.startswith("postfix") for c in configs):
        need_postfix(ap, "the postfix configs")

    def body(work: Path) -> int:
        results: dict[str, list[dict[str, float] | None]] = {c: [] for c in configs}
        pf_cert = None
        if any(c == "postfix-tls" for c in configs):
            certs = work / "certs"
            certs.mkdir()
            pf_cert = self_signed(certs, PF_HOSTNAME)
        say(
            f"tls_cost: n={args.n} clients={args.clients} size={args.size} "
            f"repeats={args.repeats} configs={','.join(configs)} python={sys.version.split()[0]} "
            f"openssl={ssl.OPENSSL_VERSION.split()[1]} cpus={os.cpu_count()} "
            f"load1={os.getloadavg()[0]:.2f}"
        )
        for rep in range(1, args.repeats + 1):
            for config in configs:
                results[config].append(run_one(args, rep, config, work, pf_cert))
        summarize(results, configs)
        failed = sum(r is None for rows in results.values() for r in rows)
        return 1 if failed else 0

    return guarded("tls_cost.", args.workdir, body)


if __name__ == "__main__":
    sys.exit(main())
