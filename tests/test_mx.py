"""PYRELAY_DELIVERY=mx against a DNS server started here (dnspython on a UDP socket) and three
local upstreams on the same port at 127.0.0.2-4: healthy, slow and dead."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import dns.message
import dns.rcode
import dns.rrset
import pytest

from conftest import MESSAGE, LogCapture, wait_until
from pyrelay.config import HostPort
from pyrelay.mx import MXResolver, group_by_domain
from pyrelay.sink import SinkState, start_sink

pytestmark = pytest.mark.timeout(60)

ZONE: dict[tuple[str, str], list[str]] = {
    ("good.test", "MX"): ["10 mx.good.test."],
    ("mx.good.test", "A"): ["127.0.0.2"],
    ("slow.test", "MX"): ["10 mx.slow.test."],
    ("mx.slow.test", "A"): ["127.0.0.3"],
    ("dead.test", "MX"): ["10 mx.dead.test."],
    ("mx.dead.test", "A"): ["127.0.0.4"],
    ("nullmx.test", "MX"): ["0 ."],
    ("implicit.test", "A"): ["127.0.0.2"],
    ("twomx.test", "MX"): ["20 mx.good.test.", "10 mx.dead.test."],
}
NAMES = {name for name, _ in ZONE}


class DNSServer(asyncio.DatagramProtocol):
    """Answers from ZONE; NXDOMAIN for names it does not know, NOERROR/no data otherwise."""

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        query = dns.message.from_wire(data)
        response = dns.message.make_response(query)
        question = query.question[0]
        name = question.name.to_text(omit_final_dot=True).lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        records = ZONE.get((name, rdtype))
        if records:
            response.answer.append(
                dns.rrset.from_text_list(question.name, 60, "IN", rdtype, records)
            )
        elif name not in NAMES:
            response.set_rcode(dns.rcode.NXDOMAIN)
        self.transport.sendto(response.to_wire(), addr)


@pytest.fixture
async def dns_port() -> AsyncIterator[int]:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(DNSServer, local_addr=("127.0.0.1", 0))
    yield transport.get_extra_info("sockname")[1]
    transport.close()


def mx_settings(dns_port: int, mx_port: int) -> dict[str, Any]:
    return {
        "relayhost": HostPort("", 0),
        "delivery": "mx",
        "dns_servers": f"127.0.0.1:{dns_port}",
        "mx_port": mx_port,
        "relayhost_username": "",
        "relayhost_password": "",
        "concurrency": 8,
        "upstream_connect_timeout": "4s",
        "upstream_data_timeout": "30s",
    }


def common_port() -> int:
    """A port free on 127.0.0.2, .3 and .4."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.2", 0))
            port = int(s.getsockname()[1])
        try:
            for host in ("127.0.0.3", "127.0.0.4"):
                with socket.socket() as t:
                    t.bind((host, port))
            return port
        except OSError:
            continue
    raise AssertionError("no common free port")


async def test_resolver_mx_order_null_mx_nxdomain_and_implicit(dns_port: int) -> None:
    from conftest import relay_settings

    settings = relay_settings(__import__("pathlib").Path("/tmp"), None, None).replace(
        dns_servers=(HostPort("127.0.0.1", dns_port),), upstream_connect_timeout=3.0
    )
    resolver = MXResolver(settings)
    assert await resolver.exchangers("twomx.test") == ["mx.dead.test", "mx.good.test"]
    assert await resolver.exchangers("implicit.test") == ["implicit.test"]
    assert await resolver.addresses("mx.good.test") == ["127.0.0.2"]
    for domain, dsn in (("nullmx.test", "5.1.10"), ("nowhere.test", "5.1.2")):
        with pytest.raises(Exception) as err:
            await resolver.exchangers(domain)
        assert getattr(err.value, "permanent", False) and err.value.dsn == dsn  # type: ignore[attr-defined]
    assert group_by_domain(["a@X.test", "b@x.test", "c@y.test"]) == {
        "x.test": ["a@X.test", "b@x.test"],
        "y.test": ["c@y.test"],
    }


async def test_slow_and_dead_domains_do_not_delay_the_healthy_one(
    dns_port: int, make_relay: Callable[..., Any], server_tls: Any, logs: LogCapture
) -> None:
    port = common_port()
    good, slow = SinkState(), SinkState()
    slow.data_gate = asyncio.Event()  # answers the end of DATA only when the test ends
    servers = [
        await start_sink(good, host="127.0.0.2", port=port, tls_context=server_tls),
        await start_sink(slow, host="127.0.0.3", port=port, tls_context=server_tls),
    ]
    # dead: accepts connections (the kernel does) and never greets.
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.4", port))
    blackhole.listen(100)
    try:
        async with make_relay(None, **mx_settings(dns_port, port)) as relay:
            for i in range(4):
                await relay.asend("app@example.org", [f"s{i}@slow.test"], MESSAGE)
                await relay.asend("app@example.org", [f"d{i}@dead.test"], MESSAGE)
            await wait_until(lambda: slow.at_data_end.is_set(), what="slow upstream busy")
            start = time.monotonic()
            for i in range(4):
                await relay.asend("app@example.org", [f"g{i}@good.test"], MESSAGE)
            await wait_until(lambda: len(good.messages) == 4, timeout=10, what="healthy mail")
            healthy = time.monotonic() - start
            # Null MX and NXDOMAIN bounce at once (no retry).
            await relay.asend("app@example.org", ["u@nullmx.test", "v@nowhere.test"], MESSAGE)
            await wait_until(lambda: logs.has("event=bounced", "to=<u@nullmx.test>"), timeout=5)
            assert logs.has("event=bounced", "to=<u@nullmx.test>", "dsn=5.1.10")
            assert logs.has("event=bounced", "to=<v@nowhere.test>", "dsn=5.1.2")
            await wait_until(lambda: logs.has("event=deferred", "to=<d0@dead.test>"), timeout=10)
            slow.data_gate.set()
            await wait_until(lambda: len(slow.messages) == 4, timeout=15, what="slow mail")
    finally:
        blackhole.close()
        for server in servers:
            server.close()
    # The dead domain's greeting timeout is 4 s, the slow one never answers until released.
    assert healthy < 2.0, healthy
    assert all(m.tls for m in good.messages)  # opportunistic STARTTLS
    assert logs.has("event=sent", "to=<g0@good.test>", f"relay=mx.good.test[127.0.0.2]:{port}")
    assert logs.has("event=deferred", "to=<s", "is busy")
