"""``Relay``: start-up and shutdown order (spool recovery -> scheduler -> listener), signals."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Iterator

from pyrelay import __version__
from pyrelay.config import Settings, known_env_names
from pyrelay.errors import ConfigError
from pyrelay.logging import get_logger
from pyrelay.metrics import Metrics
from pyrelay.scheduler import Scheduler
from pyrelay.server import Listener
from pyrelay.spool import Spool

log = get_logger("pyrelay")

PID_FILE = "pyrelay.pid"


class Relay:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.spool = Spool(settings.spool_dir)
        self.scheduler = Scheduler(settings, self.spool, self.metrics)
        self.listener = Listener(settings, self.spool, self.metrics, self.scheduler.submit)
        self.started = asyncio.Event()
        self._exit = asyncio.Event()

    def request_exit(self) -> None:
        self._exit.set()

    async def startup(self) -> None:
        s = self.settings
        log.info(
            "starting",
            version=__version__,
            pid=os.getpid(),
            **{k.lower(): v for k, v in s.dump().items()},
        )
        warn_unknown_postfix_variables()
        try:
            self.spool.prepare()
        except OSError as exc:
            raise ConfigError(
                f"PYRELAY_SPOOL_DIR: {s.spool_dir} is not writable: {exc.strerror or exc}"
            ) from None
        recovered = self.scheduler.recover()
        if recovered:
            log.info("queue_recovered", messages=recovered)
        self.scheduler.start()
        try:
            await self.listener.start()
        except OSError as exc:
            await self.scheduler.stop(0)
            raise ConfigError(f"PYRELAY_LISTEN: cannot listen: {exc.strerror or exc}") from None
        self.metrics.queue_size.set_function(lambda: self.scheduler.queue_stats()[0])
        self.metrics.oldest_age.set_function(lambda: self.scheduler.queue_stats()[1])
        if s.metrics_listen is not None:
            self.metrics.serve(s.metrics_listen)
            log.info("metrics_listening", address=str(s.metrics_listen))
        (s.spool_dir / PID_FILE).write_text(f"{os.getpid()}\n")
        self.started.set()
        log.info("started", version=__version__)

    async def shutdown(self) -> None:
        grace = self.settings.shutdown_grace
        log.info("stopping", grace=grace)
        await self.listener.stop(grace)
        await self.scheduler.stop(grace)
        self.spool.close()
        with contextlib.suppress(OSError):
            (self.settings.spool_dir / PID_FILE).unlink()
        log.info("stopped")

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
            loop.add_signal_handler(signal.SIGUSR1, self._on_flush)
            installed.append(signal.SIGUSR1)
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


def run(settings: Settings) -> None:
    """Run the relay in the foreground until SIGTERM/SIGINT."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - optional speed-up
        asyncio.run(_serve(settings))
    else:
        uvloop.run(_serve(settings))


async def _serve(settings: Settings) -> None:
    await Relay(settings).serve()
