"""``Relay``: start-up and shutdown order (spool recovery -> scheduler -> listener), signals."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from typing import Any

from pyrelay import __version__
from pyrelay.config import Settings, known_env_names
from pyrelay.constants import PID_FILE
from pyrelay.errors import ConfigError
from pyrelay.logging import get_logger
from pyrelay.metrics import Metrics, enable_multiprocess
from pyrelay.scheduler import Scheduler
from pyrelay.server import Listener
from pyrelay.spool import Spool
from pyrelay.workers import WorkerPool, fork_workers

log = get_logger("pyrelay")


class Relay:
    """One relay process.  ``worker`` 0 is the primary (recovery, retries, CLI signals); others
    are secondary listener/delivery processes started by it (see ``pyrelay.workers``)."""

    def __init__(
        self, settings: Settings, *, worker: int = 0, prefork: Prefork | None = None
    ) -> None:
        self.settings = settings
        self.worker = worker
        self.prefork = prefork
        self.metrics = Metrics()
        self.spool = Spool(settings.spool_dir, worker=worker)
        self.scheduler = Scheduler(settings, self.spool, self.metrics, primary=worker == 0)
        self.listener = Listener(settings, self.spool, self.metrics, self.scheduler.submit)
        self.pool: WorkerPool | None = None
        self.started = asyncio.Event()
        self._exit = asyncio.Event()

    async def startup(self) -> None:
        """Start everything or nothing (like uvicorn): a failure stops what already started
        and raises ``ConfigError`` naming the variable."""
        try:
            await self._startup()
        except BaseException:
            await self._stop_started()
            raise

    async def _startup(self) -> None:
        if self.worker:
            # The primary has prepared and recovered the spool; this process only serves.
            self.scheduler.start()
            await self._listen()
            self.started.set()
            return
        s = self.settings
        log.info(
            "starting",
            version=__version__,
            pid=os.getpid(),
            **{k.lower(): v for k, v in s.dump().items()},
        )
        warn_unknown_postfix_variables()
        if self.prefork is None:
            prepare_spool(s, self.spool)
            recovered = self.scheduler.recover()
        else:
            recovered = self.prefork.recovered
        if recovered:
            log.info("queue_recovered", requeued=recovered)
        self.scheduler.start()
        await self._listen()
        self.metrics.watch_queue(self.scheduler.queue_stats)
        if s.metrics_listen is not None:
            try:
                self.metrics.serve(s.metrics_listen)
            except OSError as exc:
                raise ConfigError(
                    f"PYRELAY_METRICS_LISTEN: cannot listen on {s.metrics_listen}: "
                    f"{exc.strerror or exc}"
                ) from None
            log.info("metrics_listening", address=str(s.metrics_listen))
        if self.prefork is not None:
            self.pool = WorkerPool(s, self.scheduler, self.prefork.pids)
            self.pool.start()
        pid_file = s.spool_dir / PID_FILE
        pid_file.write_text(f"{os.getpid()}\n")
        os.chmod(pid_file, 0o600)
        asyncio.get_running_loop().run_in_executor(self.spool.executor, self.spool.sweep_orphans)
        self.started.set()
        log.info("started", version=__version__, workers=s.workers)

    async def _listen(self) -> None:
        try:
            await self.listener.start()
        except OSError as exc:
            raise ConfigError(f"PYRELAY_LISTEN: cannot listen: {exc.strerror or exc}") from None

    async def _stop_started(self) -> None:
        with contextlib.suppress(Exception):
            await self.listener.stop(0)
        with contextlib.suppress(Exception):
            await self.scheduler.stop(0)
        self.metrics.close()
        self.spool.close()

    async def shutdown(self) -> None:
        grace = self.settings.shutdown_grace
        log.info("stopping", grace=grace, worker=self.worker)
        if self.pool is not None:
            # Secondaries drain in parallel with this process (they got SIGTERM too).
            pool_stopped = asyncio.create_task(self.pool.stop(grace))
        # One grace period for the whole shutdown, not one per stage (container runtimes
        # SIGKILL after theirs; Docker: 10 s): sessions in DATA finish while in-flight
        # deliveries finish, and the scheduler starts no new ones (they stay queued).
        await asyncio.gather(self.listener.stop(grace), self.scheduler.stop(grace))
        if self.pool is not None:
            await pool_stopped
        self.spool.close()
        self.metrics.close()
        if not self.worker:
            with contextlib.suppress(OSError):
                (self.settings.spool_dir / PID_FILE).unlink()
        log.info("stopped", worker=self.worker)

    async def serve(self) -> None:
        with self._signals():
            await self.startup()
            try:
                await self._exit.wait()
            finally:
                await self.shutdown()

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        installed: list[signal.Signals] = []
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._on_exit_signal, sig)
                installed.append(sig)
            # The routes file is read again (each worker also notices a change by itself).
            loop.add_signal_handler(signal.SIGHUP, self._on_reload)
            installed.append(signal.SIGHUP)
            if not self.worker:  # deferred entries belong to the primary alone
                loop.add_signal_handler(signal.SIGUSR1, self._on_flush)
                loop.add_signal_handler(signal.SIGUSR2, self.scheduler.scan_now)
                installed += [signal.SIGUSR1, signal.SIGUSR2]
        except (NotImplementedError, RuntimeError, ValueError):
            pass  # not the main thread (tests run relays in-process)
        try:
            yield
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)

    def _on_exit_signal(self, sig: int) -> None:
        if self._exit.is_set():
            log.warning("forced_exit", signal=signal.Signals(sig).name)
            os._exit(1)
        log.info("signal", signal=signal.Signals(sig).name)
        self._exit.set()

    def _on_reload(self) -> None:
        log.info("signal", signal="SIGHUP")
        self.scheduler.agents.routes.reload()

    def _on_flush(self) -> None:
        count = self.scheduler.flush()
        log.info("flush", deferred=count)


def warn_unknown_postfix_variables() -> None:
    known = known_env_names()
    unknown = sorted(
        k for k in os.environ if k.upper().startswith("POSTFIX_") and k.lower() not in known
    )
    if unknown:
        log.warning(
            "unsupported_postfix_variables",
            names=" ".join(unknown),
            note="ignored: pyrelay maps only the POSTFIX_ parameters listed in the README",
        )


@dataclass
class Prefork:
    """What the primary prepared before forking its workers."""

    pids: dict[int, int]
    recovered: int


def prepare_spool(settings: Settings, spool: Spool) -> None:
    try:
        spool.prepare()
    except OSError as exc:
        raise ConfigError(
            f"PYRELAY_SPOOL_DIR: {settings.spool_dir} is not writable: {exc.strerror or exc}"
        ) from None


def _prefork(settings: Settings) -> Prefork:
    spool = Spool(settings.spool_dir, threads=1)
    try:
        prepare_spool(settings, spool)
        if settings.metrics_listen is not None:
            enable_multiprocess(settings.spool_dir / "metrics")
        # Leftovers are requeued before any worker can add entries of its own.
        recovered = Scheduler(settings, spool, Metrics()).recover()
    finally:
        spool.close()
    return Prefork(fork_workers(settings, serve_worker), recovered)


def _run_loop(main: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - optional speed-up
        asyncio.run(main)
    else:
        uvloop.run(main)


def run(settings: Settings) -> None:
    """Run the relay in the foreground until SIGTERM/SIGINT."""
    prefork = _prefork(settings) if settings.workers > 1 else None
    try:
        _run_loop(Relay(settings, prefork=prefork).serve())
    finally:
        if prefork is not None:
            _stop_children(prefork.pids)


def _stop_children(pids: dict[int, int]) -> None:
    """Only matters when start-up failed: a clean shutdown has already reaped the workers."""
    for pid in pids.values():
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(pid, signal.SIGTERM)
            os.waitpid(pid, 0)


def serve_worker(settings: Settings, worker: int) -> None:
    """Entry point of a secondary worker process (forked, or ``pyrelay worker N``)."""
    _run_loop(Relay(settings, worker=worker).serve())
