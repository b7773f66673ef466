"""Memory measurement helpers shared by ``tests/test_memory_cgroup.py`` and ``bench/*.py``.

* ``MemCgroup``: a cgroup v1 memory cgroup with a hard limit (and no swap around it).  Processes
  join it through ``wrapper()``, a ``sh`` that writes its own PID into ``cgroup.procs`` and then
  ``exec``s the real command, so the relay is inside before it forks its workers.  The cgroup is
  made under the memory cgroup this process is in (so the relay stays inside whatever limits the
  machine gives this session), or under the hierarchy root when that is not writable.
* ``tree_pids`` / ``mem_of`` / ``io_of``: a process and its descendants, their RSS and PSS (from
  ``/proc/PID/smaps_rollup``) and their I/O counters (``/proc/PID/io``).
* ``Sampler``: a thread that samples the tree (and the cgroup) every 50 ms and keeps the peaks.

Only the standard library: the bench scripts import this module with ``tests/`` on ``sys.path``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import signal
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

MEMCG_ROOT = Path("/sys/fs/cgroup/memory")
MB = 1024 * 1024


def _own_memcg() -> Path | None:
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if "memory" in controllers.split(","):
                return MEMCG_ROOT / path.lstrip("/")
    except (OSError, ValueError):
        pass
    return None


def memcg_parent() -> Path:
    """Where to create test cgroups: our own memory cgroup if writable, else the root."""
    own = _own_memcg()
    if own is not None and own.is_dir() and os.access(own, os.W_OK):
        return own
    return MEMCG_ROOT


def memcg_unavailable() -> str | None:
    """Why a memory cgroup cannot be made here, or None if it can."""
    if not (MEMCG_ROOT / "cgroup.procs").exists():
        return f"no cgroup v1 memory controller mounted at {MEMCG_ROOT}"
    parent = memcg_parent()
    if not os.access(parent, os.W_OK):
        return f"{parent} is not writable (needs root and a writable cgroup v1 memory hierarchy)"
    probe = parent / f"pyrelay-probe-{secrets.token_hex(4)}"
    try:
        probe.mkdir()
    except OSError as exc:
        return f"cannot create a memory cgroup under {parent}: {exc.strerror}"
    try:
        (probe / "memory.limit_in_bytes").write_text(str(128 * MB))
    except OSError as exc:
        return f"cannot set memory.limit_in_bytes under {parent}: {exc.strerror}"
    finally:
        with contextlib.suppress(OSError):
            probe.rmdir()
    return None


class MemCgroup:
    """A memory cgroup with a hard limit; ``remove()`` kills what is left in it and deletes it."""

    def __init__(self, limit: int, prefix: str = "pyrelay-test") -> None:
        self.limit = limit
        self.path = memcg_parent() / f"{prefix}-{secrets.token_hex(6)}"
        self.path.mkdir()
        try:
            self.write("memory.limit_in_bytes", str(limit))
            if (self.path / "memory.memsw.limit_in_bytes").exists():
                # memory+swap: the same limit, so it cannot swap its way around it.
                self.write("memory.memsw.limit_in_bytes", str(limit))
        except BaseException:
            self.path.rmdir()
            raise

    def __enter__(self) -> MemCgroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # -- files -----------------------------------------------------------------------------

    def read(self, name: str) -> str:
        return (self.path / name).read_text()

    def write(self, name: str, value: str) -> None:
        (self.path / name).write_text(value)

    def wrapper(self) -> list[str]:
        """Argv prefix: run the command that follows inside this cgroup (``exec``, same PID)."""
        return ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(self.path / "cgroup.procs")]

    def pids(self) -> list[int]:
        try:
            return [int(p) for p in self.read("cgroup.procs").split()]
        except FileNotFoundError:
            return []

    def usage(self) -> int:
        return int(self.read("memory.usage_in_bytes"))

    def max_usage(self) -> int:
        return int(self.read("memory.max_usage_in_bytes"))

    def reset_max_usage(self) -> None:
        self.write("memory.max_usage_in_bytes", "0")

    def failcnt(self) -> int:
        return int(self.read("memory.failcnt"))

    def oom_kills(self) -> int:
        """``oom_kill`` from ``memory.oom_control`` (kernel 4.13+; -1 if the line is missing)."""
        for line in self.read("memory.oom_control").splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return -1

    def stat(self) -> dict[str, int]:
        out = {}
        for line in self.read("memory.stat").splitlines():
            key, _, value = line.partition(" ")
            with contextlib.suppress(ValueError):
                out[key] = int(value)
        return out

    def anon(self) -> int:
        """Anonymous memory (heap, stacks) charged to the cgroup, without the page cache."""
        st = self.stat()
        return st.get("total_rss", st.get("rss", 0))

    def drop_cache(self) -> None:
        """Reclaim the page cache charged to the (empty) cgroup, e.g. spool files written by a
        killed run, so the next run's usage starts from what it allocates itself."""
        with contextlib.suppress(OSError):
            self.write("memory.force_empty", "0")

    # -- processes -------------------------------------------------------------------------

    def kill_all(self, timeout: float = 10.0) -> bool:
        """SIGKILL every process in the cgroup until it is empty.  True if it emptied."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pids = self.pids()
            if not pids:
                return True
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        return not self.pids()

    def wait_empty(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.pids():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def remove(self) -> None:
        if not self.path.exists():
            return
        if not self.kill_all():
            # Move stragglers (zombies whose parent has not reaped them) out, so rmdir works.
            for pid in self.pids():
                with contextlib.suppress(OSError):
                    (self.path.parent / "cgroup.procs").write_text(str(pid))
        for _ in range(100):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    raise
                time.sleep(0.05)
        self.path.rmdir()


# -- process trees ------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            out.extend(int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split())
        except (OSError, ValueError):
            continue
    return out


def tree_pids(root: int) -> list[int]:
    """``root`` and all its descendants (those alive now)."""
    seen: list[int] = []
    todo = [root]
    while todo:
        pid = todo.pop()
        if pid in seen or not os.path.exists(f"/proc/{pid}"):
            continue
        seen.append(pid)
        todo.extend(_children(pid))
    return seen


def _rollup(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in bytes; PSS falls back to RSS without smaps_rollup."""
    rss = pss = -1
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Rss:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith(b"Pss:"):
                    pss = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if rss < 0:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            return 0, 0
    return max(rss, 0), (pss if pss >= 0 else max(rss, 0))


def mem_of(pids: Iterable[int]) -> tuple[int, int]:
    """Summed (RSS, PSS) in bytes of ``pids``."""
    rss = pss = 0
    for pid in pids:
        r, p = _rollup(pid)
        rss += r
        pss += p
    return rss, pss


def io_of(pids: Iterable[int]) -> dict[str, int]:
    """Summed ``/proc/PID/io`` counters (write_bytes, wchar, ...) of ``pids`` (all threads)."""
    total: dict[str, int] = {}
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/io").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            key, _, value = line.partition(":")
            with contextlib.suppress(ValueError):
                total[key] = total.get(key, 0) + int(value)
    return total


def cpu_of(pids: Iterable[int]) -> float:
    """Summed user+system CPU seconds of ``pids``."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, ValueError, IndexError):
            continue
    return total / tick


# -- sampling -----------------------------------------------------------------------------------


@dataclass
class Peaks:
    rss: int = 0  # summed RSS of the tree (shared pages counted once per process)
    pss: int = 0  # summed PSS of the tree
    processes: int = 0
    cg_usage: int = 0  # cgroup usage, page cache included
    cg_anon: int = 0  # cgroup anonymous memory (memory.stat total_rss)
    samples: int = 0
    first_oom_at: float | None = None  # time.time() when oom_kill first went up
    last: tuple[int, int] = (0, 0)  # (RSS, PSS) of the latest sample

    def line(self) -> str:
        text = f"peak_rss_mb={self.rss / MB:.1f} peak_pss_mb={self.pss / MB:.1f}"
        if self.cg_usage:
            text += f" peak_cg_anon_mb={self.cg_anon / MB:.1f}"
        return text


@dataclass
class Sampler:
    """Samples a process tree (by root PID, or every process of a cgroup) every ``interval``."""

    root: int | None = None
    cgroup: MemCgroup | None = None
    interval: float = 0.05
    peaks: Peaks = field(default_factory=Peaks)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _oom_base: int = 0

    def pids(self) -> list[int]:
        if self.cgroup is not None:
            return self.cgroup.pids()
        return tree_pids(self.root) if self.root is not None else []

    def sample(self) -> None:
        pids = self.pids()
        rss, pss = mem_of(pids)
        p = self.peaks
        p.samples += 1
        p.last = (rss, pss)
        p.rss, p.pss, p.processes = max(p.rss, rss), max(p.pss, pss), max(p.processes, len(pids))
        if self.cgroup is not None:
            with contextlib.suppress(OSError, ValueError):
                p.cg_usage = max(p.cg_usage, self.cgroup.usage())
                p.cg_anon = max(p.cg_anon, self.cgroup.anon())
                if p.first_oom_at is None and self.cgroup.oom_kills() > self._oom_base:
                    p.first_oom_at = time.time()

    def start(self) -> Sampler:
        if self.cgroup is not None:
            self._oom_base = max(0, self.cgroup.oom_kills())
        self._thread = threading.Thread(target=self._run, daemon=True, name="mem-sampler")
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def stop(self) -> Peaks:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        return self.peaks

    def __enter__(self) -> Sampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
