"""``Relay``: start-up and shutdown order (spool recovery -> scheduler -> listener), signals."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from typing import Any

from pyrelay import __version__, dkim
from pyrelay.config import Settings, known_env_names
from pyrelay.constants import PID_FILE
from pyrelay.drain import DrainRequest, drain, take_request
from pyrelay.errors import ConfigError
from pyrelay.http import HttpServer
from pyrelay.logging import flush_logs, get_logger
from pyrelay.metrics import Metrics, enable_multiprocess
from pyrelay.scheduler import Scheduler
from pyrelay.server import Listener
from pyrelay.spool import Spool, probe_writable
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
        self.metrics = Metrics.for_settings(settings)
        self.spool = Spool(settings.spool_dir, worker=worker)
        self.scheduler = Scheduler(settings, self.spool, self.metrics, primary=worker == 0)
        self.listener = Listener(
            settings, self.spool, self.metrics, self.scheduler.submit, self.scheduler.takes_fresh
        )
        self.pool: WorkerPool | None = None
        self.http: HttpServer | None = None
        self.draining = False
        self._drain: asyncio.Task[int] | None = None
        self.started = asyncio.Event()
        self._exit = asyncio.Event()
        self._dkim_check: asyncio.Task[None] | None = None

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
            prepare_dkim(s)
            recovered = self.scheduler.recover()
        else:
            recovered = self.prefork.recovered
        if recovered:
            log.info("queue_recovered", requeued=recovered)
        self.scheduler.start()
        await self._listen()
        self.metrics.watch_queue(self.scheduler.queue_stats)
        if s.metrics_listen is not None:
            self.http = HttpServer(s.metrics_listen, self.metrics, self.not_ready)
            try:
                await self.http.start()
            except OSError as exc:
                self.http = None
                raise ConfigError(
                    f"PYRELAY_HTTP_LISTEN: cannot listen on {s.metrics_listen}: "
                    f"{exc.strerror or exc}"
                ) from None
            log.info("http_listening", address=f"{s.metrics_listen.host}:{self.http.port}")
        if self.prefork is not None:
            self.pool = WorkerPool(s, self.scheduler, self.prefork.pids)
            self.pool.start()
        pid_file = s.spool_dir / PID_FILE
        pid_file.write_text(f"{os.getpid()}\n")
        os.chmod(pid_file, 0o600)
        asyncio.get_running_loop().run_in_executor(self.spool.executor, self.spool.sweep_orphans)
        signer = dkim.signer_for(dkim.key_dir(s.spool_dir, s.dkim_key_dir), s.dkim_selector)
        if signer.domains:
            self._dkim_check = asyncio.create_task(check_dkim_records(signer))
        self.started.set()
        log.info("started", version=__version__, workers=s.workers)

    async def _listen(self) -> None:
        try:
            await self.listener.start()
        except OSError as exc:
            raise ConfigError(f"PYRELAY_LISTEN: cannot listen: {exc.strerror or exc}") from None

    def _cancel_dkim_check(self) -> None:
        if self._dkim_check is not None:
            self._dkim_check.cancel()

    async def _stop_started(self) -> None:
        self._cancel_dkim_check()
        with contextlib.suppress(Exception):
            await self.listener.stop(0)
        with contextlib.suppress(Exception):
            await self.scheduler.stop(0)
        if self.http is not None:
            await self.http.stop()
        self.spool.close()

    async def not_ready(self) -> str:
        """Why ``/readyz`` must say no, or "" (pyrelay.http)."""
        if self.draining:
            return "draining"
        if self.listener.closing or not any(srv.is_serving() for srv in self.listener.servers):
            return "listener not accepting"
        try:
            await asyncio.wait_for(
                self.spool.run(probe_writable, self.settings.spool_dir), timeout=2.0
            )
        except TimeoutError:
            return "spool write timed out"
        except OSError as exc:
            return f"spool not writable: {exc.strerror or exc}"
        return ""

    async def stop_listening(self) -> None:
        """Close the listener (and stop the secondary workers) like a shutdown does, but keep
        delivering (a drain)."""
        grace = self.settings.shutdown_grace
        if self.pool is not None:
            stopping = asyncio.create_task(self.pool.stop(grace))
            await asyncio.gather(self.listener.stop(grace), stopping)
            for index in self.pool.pids:
                self.scheduler.adopt_orphans(index)
        else:
            await self.listener.stop(grace)

    async def shutdown(self) -> None:
        grace = self.settings.shutdown_grace
        log.info("stopping", grace=grace, worker=self.worker)
        self._cancel_dkim_check()
        if self.pool is not None:
            # Secondaries drain in parallel with this process (they got SIGTERM too).
            pool_stopped = asyncio.create_task(self.pool.stop(grace))
        # One grace period for the whole shutdown, not one per stage (container runtimes
        # SIGKILL after theirs; Docker: 10 s): sessions in DATA finish while in-flight
        # deliveries finish, and the scheduler starts no new ones (they stay queued).
        await asyncio.gather(self.listener.stop(grace), self.scheduler.stop(grace))
        if self.pool is not None:
            await pool_stopped
        if self.http is not None:
            await self.http.stop()
        self.metrics.draining.set(0)
        self.spool.close()
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
                if self._drain is not None and not self._drain.done():
                    self._drain.cancel()  # SIGTERM during a drain: a plain shutdown
                    await asyncio.gather(self._drain, return_exceptions=True)
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
                loop.add_signal_handler(signal.SIGUSR2, self._on_usr2)
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
            if self.worker:
                # Ctrl-C in a terminal, `timeout` and systemd's default KillMode signal every
                # process of the relay, and the primary then passes the stop on: for a worker a
                # second signal is not an operator insisting.  A worker still running when
                # the grace is over is killed by the primary.
                return
            log.warning("forced_exit", signal=signal.Signals(sig).name)
            flush_logs()
            os._exit(1)
        log.info("signal", signal=signal.Signals(sig).name)
        self._exit.set()

    def _on_reload(self) -> None:
        log.info("signal", signal="SIGHUP")
        self.scheduler.agents.routes.reload()

    def _on_flush(self) -> None:
        count = self.scheduler.flush()
        log.info("flush", deferred=count)

    def _on_usr2(self) -> None:
        """``queue release`` (look for due entries) or ``pyrelay drain`` (a request file)."""
        request = take_request(self.settings.spool_dir)
        if request is None:
            self.scheduler.scan_now()
            return
        if self._drain is not None or self._exit.is_set():
            log.info("drain_already_running")
            return
        self._drain = asyncio.create_task(self._run_drain(request), name="pyrelay-drain")

    async def _run_drain(self, request: DrainRequest) -> int:
        try:
            return await drain(self, request)
        except Exception:
            log.exception("drain_failed")
            return -1
        finally:
            self._exit.set()


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


def prepare_dkim(settings: Settings) -> None:
    """``DKIM_AUTOGENERATE``, then load every key (a key that cannot be used stops start-up)."""
    directory = dkim.key_dir(settings.spool_dir, settings.dkim_key_dir)
    made: set[str] = set()
    try:
        if settings.dkim_autogenerate:
            made = {
                k.domain for k in dkim.generate_keys(directory, settings.allowed_sender_domains)
            }
        dkim.forget_signers()
        signer = dkim.signer_for(directory, settings.dkim_selector)
    except (dkim.DKIMError, OSError) as exc:
        raise ConfigError(f"PYRELAY_DKIM_KEY_DIR: {exc}") from None
    for key in signer.all_keys():
        if key.domain in made:
            log.warning(
                "dkim_key_generated",
                domain=key.domain,
                selector=key.selector,
                path=str(key.path),
                note="publish this DNS record",
                dns_record=key.zone_line(),
            )
        else:
            log.info(
                "dkim_key",
                domain=key.domain,
                selector=key.selector,
                algorithm=key.algorithm.decode(),
            )


async def check_dkim_records(signer: dkim.Signer) -> None:
    """Start-up: warn for each key whose DNS record is missing or holds another key."""
    for key in signer.all_keys():
        result = await dkim.check_record(key)
        if result.status == "ok":
            continue
        log.warning(
            "dkim_dns_mismatch",
            domain=key.domain,
            selector=key.selector,
            status=result.status,
            detail=result.detail,
            dns_record=key.zone_line(),
        )


def _prefork(settings: Settings) -> Prefork:
    spool = Spool(settings.spool_dir, threads=1)
    try:
        prepare_spool(settings, spool)
        prepare_dkim(settings)
        if settings.metrics_listen is not None:
            enable_multiprocess(settings.spool_dir / "metrics")
        # Leftovers are requeued before any worker can add entries of its own.
        recovered = Scheduler(settings, spool, Metrics.for_settings(settings)).recover()
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


def limit_malloc_arenas() -> None:
    """glibc gives every thread that allocates its own malloc arena (up to eight per core) and
    seldom returns what is freed in one: after an outage of 100 000 queued messages the spool
    threads' arenas held 7 MB (``/proc/PID/smaps``).  Two arenas are plenty for threads that
    mostly wait on the disk; the setting is inherited by forked workers."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(-8, 2)  # M_ARENA_MAX


def run(settings: Settings) -> None:
    """Run the relay in the foreground until SIGTERM/SIGINT."""
    limit_malloc_arenas()
    prefork = _prefork(settings) if settings.workers > 1 else None
    try:
        _run_loop(Relay(settings, prefork=prefork).serve())
    finally:
        if prefork is not None:
            _stop_children(prefork.pids)


def _stop_children(pids: dict[int, int]) -> None:
    """Only matters when start-up failed: a clean shutdown has already reaped the workers, and
    the PID of a reaped worker may belong to any other process by now, so only children that
    are still ours (waitpid knows them) are signalled."""
    for pid in pids.values():
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            if os.waitpid(pid, os.WNOHANG) != (0, 0):
                continue  # exited: reaped just now
            os.kill(pid, signal.SIGTERM)
            os.waitpid(pid, 0)


def serve_worker(settings: Settings, worker: int) -> None:
    """Entry point of a secondary worker process (forked, or ``pyrelay worker N``)."""
    limit_malloc_arenas()
    _run_loop(Relay(settings, worker=worker).serve())
