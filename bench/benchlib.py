"""Shared by ``bench/memory.py`` and ``bench/queue_scale.py``: run ``python -m pyrelay`` as a
black box (configured by environment variables), count its JSON log events, start sinks, and
always clean up the processes they started."""

from __future__ import annotations

import collections
import contextlib
import os
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from memcg import MB, Sampler, cpu_of, io_of, mem_of, tree_pids  # noqa: E402

__all__ = ["MB", "REPO", "Relay", "Sampler", "Sink", "cpu_of", "io_of", "mem_of", "tree_pids"]

SENDER = "app@example.org"
RCPT = "user@dest.test"
_EVENT = re.compile(rb'"event": "([a-z_]+)"')
# Log lines kept for diagnostics besides those that are no event: errors, warnings, deferrals.
_TAIL = re.compile(rb'"level": "error"|"warning"|"event": "deferred"')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def ready_port(proc: subprocess.Popen[bytes], what: str, timeout: float = 15.0) -> int:
    """The port in a helper's first line of output, ``READY <port>``, waited for at most
    ``timeout`` seconds."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        line = proc.stdout.readline().decode() if selector.select(timeout) else ""
    if not line.startswith("READY "):
        raise RuntimeError(f"{what} did not start: {line!r}")
    return int(line.split()[1])


def wait_accepting(
    port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 10.0
) -> None:
    """Until ``proc`` accepts TCP connections on ``port``; ``RuntimeError`` if it exits first or
    ``timeout`` seconds pass (the caller stops it)."""
    deadline = time.monotonic() + timeout
    while not accepts(port):
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.02)


def stop_process(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """SIGTERM ``proc``, SIGKILL it if it is still there after ``grace`` seconds; reaped."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(grace)


def relay_env(port: int, upstream_port: int, spool: Path, **extra: str) -> dict[str, str]:
    """The product defaults, except what a local benchmark must set."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PYRELAY_", "RELAYHOST", "POSTFIX_", "ALLOW", "MASQUERADE"))
    }
    env.update(
        RELAYHOST=f"[127.0.0.1]:{upstream_port}",
        RELAYHOST_TLS_LEVEL="none",
        ALLOWED_SENDER_DOMAINS="example.org",
        PYRELAY_LISTEN=f"127.0.0.1:{port}",
        PYRELAY_SPOOL_DIR=str(spool),
        PYRELAY_HOSTNAME="relay.bench",
        PYRELAY_LOG_FORMAT="json",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def fs_type(path: Path) -> str:
    """File system type of the mount holding ``path`` (from /proc/mounts)."""
    best, kind = "", "?"
    path = path.resolve()
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            mnt = parts[1]
            if (str(path) + "/").startswith(mnt.rstrip("/") + "/") and len(mnt) >= len(best):
                best, kind = mnt, parts[2]
    return kind


class Relay:
    """``python -m pyrelay`` with its log events counted by a thread (no JSON parsing)."""

    def __init__(self, env: dict[str, str], argv_prefix: list[str] | None = None) -> None:
        self.env = env
        self.port = int(env["PYRELAY_LISTEN"].rsplit(":", 1)[1])
        self.counts: collections.Counter[str] = collections.Counter()
        self.tail: collections.deque[str] = collections.deque(maxlen=40)
        self._lock = threading.Lock()
        self.exec_at = time.monotonic()
        self.proc = subprocess.Popen(
            [*(argv_prefix or []), sys.executable, "-m", "pyrelay"],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self._known: dict[int, str] = {}  # pid -> start time, so a reused pid is never killed
        self._remember(self.proc.pid)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            events = _EVENT.findall(line)
            with self._lock:
                for ev in events:
                    self.counts[ev.decode()] += 1
                if not events or _TAIL.search(line):
                    self.tail.append(line.decode(errors="replace").rstrip()[:300])

    def count(self, event: str) -> int:
        with self._lock:
            return self.counts[event]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    @staticmethod
    def _started(pid: int) -> str:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
        except (OSError, IndexError):
            return ""

    def _remember(self, pid: int) -> None:
        if pid not in self._known:
            self._known[pid] = self._started(pid)

    def pids(self) -> list[int]:
        """The relay and its workers (remembered, so a kill reaches workers that got orphaned;
        a remembered pid counts only while it is the same process)."""
        if self.alive():
            for pid in tree_pids(self.pid):
                self._remember(pid)
        return [p for p, t in self._known.items() if t and self._started(p) == t]

    def wait_listening(self, timeout: float) -> float:
        """Seconds from exec until the port accepts a TCP connection."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if accepts(self.port):
                return time.monotonic() - self.exec_at
            if not self.alive():
                raise RuntimeError(f"relay exited {self.proc.returncode}:\n" + self.log_tail())
            time.sleep(0.01)
        raise RuntimeError(f"relay not listening after {timeout:.0f}s:\n" + self.log_tail())

    def log_tail(self) -> str:
        with self._lock:
            return "\n".join(self.tail)

    def quiesce(self, timeout: float, cpu_share: float = 0.25, window: float = 1.0) -> float:
        """Wait until the tree uses under ``cpu_share`` of a core over ``window`` seconds (its
        own work done; background retries of a large queue may still use a little)."""
        start = time.monotonic()
        last = cpu_of(self.pids())
        while time.monotonic() - start < timeout and self.alive():
            time.sleep(window)
            now = cpu_of(self.pids())
            if now - last < cpu_share * window:
                break
            last = now
        return time.monotonic() - start

    def kill9(self) -> None:
        """SIGKILL the relay and every worker at once (like the OOM killer or ``docker kill``)."""
        pids = self.pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._reap(10)

    def stop(self, grace: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL whatever is left after ``grace``."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        code = self._reap(grace)
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if code is None:
            code = self._reap(5)
        return code

    def _reap(self, timeout: float) -> int | None:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        self._reader.join(5)
        return code


class Sink:
    """An upstream on 127.0.0.1: Postfix's ``smtp-sink`` if installed (and ``prefer_postfix``),
    else ``bench/sink.py`` (offering STARTTLS with ``tls_cert``, a PEM file with the certificate
    chain and key).  ``received()`` and ``stats()`` count only for bench/sink.py."""

    def __init__(
        self,
        workdir: Path,
        *,
        port: int = 0,
        delay: float = 0.0,
        prefer_postfix: bool = False,
        tls_cert: Path | None = None,
    ) -> None:
        self.count_file = workdir / f"sink-{time.monotonic_ns()}.count"
        smtp_sink = shutil.which("smtp-sink") or (
            "/usr/sbin/smtp-sink" if os.path.exists("/usr/sbin/smtp-sink") else None
        )
        if prefer_postfix and smtp_sink and delay == 0 and port and tls_cert is None:
            self.kind = "postfix smtp-sink"
            cmd = [smtp_sink, "-c", f"127.0.0.1:{port}", "1024"]
            if os.geteuid() == 0:
                cmd[1:1] = ["-u", "nobody"]
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            self.port = port
            try:
                wait_accepting(port, self.proc, "smtp-sink")
            except RuntimeError:
                self.stop()
                raise
            return
        self.kind = "bench/sink.py"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(REPO / "bench" / "sink.py"),
                "--port",
                str(port),
                "--delay",
                str(delay),
                "--count-file",
                str(self.count_file),
                *(["--tls-cert", str(tls_cert)] if tls_cert else []),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        try:
            self.port = ready_port(self.proc, "bench/sink.py")
        except RuntimeError:
            self.stop()
            raise

    def received(self) -> int:
        return int(self.stats()["messages"])

    def stats(self) -> dict[str, float]:
        """bench/sink.py's counters: ``messages``, ``last_at`` (``time.monotonic()`` of the last
        message), ``connections``, ``connections_peak`` (most open at once), ``tls`` (completed
        handshakes); zeros until it has written them."""
        keys = ("messages", "last_at", "connections", "connections_peak", "tls")
        try:
            values = [float(v) for v in self.count_file.read_text().split()]
        except (OSError, ValueError):
            values = []
        if len(values) != len(keys):
            values = [0.0] * len(keys)
        return dict(zip(keys, values, strict=True))

    def stop(self) -> None:
        stop_process(self.proc)
        with contextlib.suppress(OSError):
            self.count_file.unlink()


def mb(n: float) -> str:
    return f"{n / MB:.1f}"
