"""Send rate over time against an upstream that throttles like SES (the README's measurement).

    python bench/throttle.py [--messages 400] [--rate 20] [--limit 10]

Runs one relay in-process with a route ``rate = "<rate>/s"`` to a local upstream that accepts
at most ``<limit>`` messages in any one-second window and answers ``454 4.7.0 Throttling
failure: Maximum sending rate exceeded.`` beyond it.  Prints, per second: messages accepted by
the upstream, throttling replies, and the route's adapted rate.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import smtplib
import tempfile
import time
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP

from pyrelay.app import Relay
from pyrelay.config import load_settings
from pyrelay.logging import configure_logging


class SES:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.window: collections.deque[float] = collections.deque()
        self.sent: list[float] = []
        self.throttled: list[float] = []

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        now = time.monotonic()
        while self.window and now - self.window[0] >= 1.0:
            self.window.popleft()
        if len(self.window) >= self.limit:
            self.throttled.append(now)
            return "454 4.7.0 Throttling failure: Maximum sending rate exceeded."
        self.window.append(now)
        envelope.mail_from = address
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.sent.append(time.monotonic())
        return "250 2.0.0 Ok"


async def main(messages: int, rate: float, limit: int) -> None:
    configure_logging("console", "error")
    ses = SES(limit)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SMTP(ses), host="127.0.0.1", port=0)
    port = server.sockets[0].getsockname()[1]
    tmp = Path(tempfile.mkdtemp())
    routes = tmp / "routes.toml"
    routes.write_text(
        f'[[route]]\nsenders = ["example.org"]\nrelayhost = "[127.0.0.1]:{port}"\n'
        f'tls_level = "none"\nrate = "{rate:g}/s"\n'
    )
    settings = load_settings(
        _env_file=None,
        relayhost=f"[127.0.0.1]:{port}",
        tls_level="none",
        allowed_sender_domains="example.org",
        listen="127.0.0.1:0",
        spool_dir=tmp / "spool",
        hostname="relay.bench",
        routes_file=routes,
        min_backoff="60s",
        max_backoff="300s",
        concurrency=10,
        workers=1,
    )
    relay = Relay(settings)
    await relay.startup()
    limiter = relay.scheduler.agents.limiter
    relay_port = relay.listener.ports[0][1]

    def submit() -> None:
        with smtplib.SMTP("127.0.0.1", relay_port) as smtp:
            for i in range(messages):
                smtp.sendmail("app@example.org", [f"r{i}@dest.test"], b"Subject: x\r\n\r\nhi\r\n")

    start = time.monotonic()
    submitting = asyncio.create_task(asyncio.to_thread(submit))
    rates: dict[int, float] = {}
    while len(ses.sent) < messages and time.monotonic() - start < 180:
        await asyncio.sleep(0.25)
        second = int(time.monotonic() - start)
        rates[second] = limiter.current("example.org", rate)
    await submitting
    await relay.shutdown()
    server.close()
    sent = collections.Counter(int(t - start) for t in ses.sent)
    throttled = collections.Counter(int(t - start) for t in ses.throttled)
    print(f"route rate {rate:g}/s, upstream limit {limit}/s, {messages} messages")
    print("second  sent  454s  adapted rate/s")
    for second in range(max(rates) + 1):
        print(
            f"{second:6d}  {sent.get(second, 0):4d}  {throttled.get(second, 0):4d}  "
            f"{rates.get(second, 0.0):6.1f}"
        )
    total = ses.sent[-1] - start if ses.sent else 0.0
    print(
        f"delivered {len(ses.sent)} in {total:.1f} s ({len(ses.sent) / total:.1f}/s), "
        f"{len(ses.throttled)} throttling replies"
    )


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--messages", type=int, default=400)
    p.add_argument("--rate", type=float, default=20)
    p.add_argument("--limit", type=int, default=10)
    a = p.parse_args()
    asyncio.run(main(a.messages, a.rate, a.limit))
