"""Contract tests for the library internals pyrelay relies on (issue 8, item 5).

pyrelay leans on a few private parts of aiosmtpd, aiosmtplib, asyncio and prometheus-client
for speed or for features the public APIs lack.  pyproject.toml pins those libraries to the
versions these tests were run against; each test below names the pyrelay code that depends on
the internal and fails if the library changes it.  To upgrade a pinned library: install the
new version, run this file, re-verify the pyrelay code each failing test names, then widen
the pin in pyproject.toml and regenerate constraints.txt.

Everything runs against real peers: an aiosmtpd server on 127.0.0.1, aiosmtplib clients
connected to it, prometheus-client counting into real files from two processes.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import importlib.metadata
import inspect
import os
import ssl
import subprocess
import sys
import textwrap
import types
import weakref
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiosmtpd
import aiosmtplib
import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import relay_settings
from pyrelay.metrics import Metrics
from pyrelay.server import Listener, RelaySMTP
from pyrelay.spool import Spool
from pyrelay.transaction import ConnectionLost, Transaction, run_transaction

# --------------------------------------------------------------------------------------------
# aiosmtpd: RelaySMTP._init_from (pyrelay/server.py)
# --------------------------------------------------------------------------------------------

# Values compared with ``==``; everything else is compared by structure.
_PLAIN = (type(None), bool, int, float, complex, str, bytes, range, enum.Enum)
# Objects that cannot change, so sharing one between connections is harmless.
_IMMUTABLE = (*_PLAIN, frozenset, type, types.FunctionType, types.BuiltinFunctionType)
_MAX_DEPTH = 4


def _listener(tmp_path: Path) -> Listener:
    s = relay_settings(tmp_path, None, None, tls_level="none")
    return Listener(s, Spool(s.spool_dir), Metrics(enabled=False), lambda env, msg: None)


def _by_aiosmtpd(listener: Listener) -> RelaySMTP:
    """A protocol built by aiosmtpd's own ``SMTP.__init__`` (no template), with the
    listener's arguments: what ``_init_from`` must reproduce."""
    saved, listener.template = listener.template, None
    try:
        return listener._build()
    finally:
        listener.template = saved


def _differences(
    slow: Any, fast: Any, path: str, owners: tuple[Any, Any], depth: int = 0
) -> list[str]:
    """How ``fast`` differs from ``slow``: equal plain values, same structure, bound methods
    of the same function, and references to the protocol itself pointing at its own."""
    slow_self, fast_self = owners
    if slow is slow_self or fast is fast_self:
        if slow is slow_self and fast is fast_self:
            return []
        return [f"{path}: refers to the connection itself in only one of them"]
    if slow is fast:
        return []  # one object both refer to: an argument (handler, loop) or a constant
    if type(slow) is not type(fast):
        return [f"{path}: {type(slow).__name__} != {type(fast).__name__}"]
    if isinstance(slow, types.MethodType):
        out = []
        if slow.__func__ is not fast.__func__:
            out.append(f"{path}: bound to {fast.__func__!r}, aiosmtpd binds {slow.__func__!r}")
        return out + _differences(slow.__self__, fast.__self__, f"{path}.__self__", owners, depth)
    if isinstance(slow, types.FunctionType):
        return [] if slow.__code__ is fast.__code__ else [f"{path}: a different function"]
    if isinstance(slow, weakref.ref):
        return _differences(slow(), fast(), f"{path}()", owners, depth)
    if isinstance(slow, dict):
        if slow.keys() != fast.keys():
            return [f"{path}: keys differ: {sorted(map(repr, slow.keys() ^ fast.keys()))}"]
        out = []
        if isinstance(slow, collections.defaultdict):
            out += _differences(
                slow.default_factory, fast.default_factory, f"{path}.default_factory", owners
            )
        for key in slow:
            out += _differences(slow[key], fast[key], f"{path}[{key!r}]", owners, depth + 1)
        return out
    if isinstance(slow, list | tuple | collections.deque):
        if len(slow) != len(fast):
            return [f"{path}: length {len(fast)}, aiosmtpd's has {len(slow)}"]
        out = []
        for i, (a, b) in enumerate(zip(slow, fast, strict=True)):
            out += _differences(a, b, f"{path}[{i}]", owners, depth + 1)
        return out
    if isinstance(slow, (*_PLAIN, set, frozenset, bytearray)):
        return [] if slow == fast else [f"{path}: {fast!r}, aiosmtpd sets {slow!r}"]
    if isinstance(slow, asyncio.Future):
        return [] if slow.done() == fast.done() else [f"{path}: done() differs"]
    if not hasattr(slow, "__dict__") or depth >= _MAX_DEPTH:
        return []  # same type, opaque (a C object) or deep enough
    return _dict_differences(vars(slow), vars(fast), path, owners, depth + 1)


def _dict_differences(
    slow: dict[str, Any], fast: dict[str, Any], path: str, owners: tuple[Any, Any], depth: int
) -> list[str]:
    out = []
    if slow.keys() != fast.keys():
        out.append(
            f"{path}: attributes only aiosmtpd sets: {sorted(slow.keys() - fast.keys())}, "
            f"only the fast copy sets: {sorted(fast.keys() - slow.keys())}"
        )
    for name in sorted(slow.keys() & fast.keys()):
        out += _differences(slow[name], fast[name], f"{path}.{name}", owners, depth)
    return out


def _mutable(value: Any) -> bool:
    return not isinstance(value, _IMMUTABLE)


def _shared(
    a: Any, b: Any, sa: Any, sb: Any, path: str, owners: tuple[Any, Any], depth: int = 0
) -> list[str]:
    """Mutable objects that two connections built by the fast path (``a``, ``b``) share while
    two connections built by aiosmtpd (``sa``, ``sb``) each have their own."""
    if a is owners[0] or b is owners[1]:
        return []
    if depth > _MAX_DEPTH or type(a) is not type(sa):
        return []  # the equivalence test reports type differences
    if a is b:
        if isinstance(a, types.MethodType):  # a shared method object is only as bad as its self
            return _shared(a.__self__, a.__self__, sa.__self__, sb.__self__, path, owners, depth)
        if isinstance(a, tuple):
            return [
                p
                for i, x in enumerate(a)
                for p in _shared(x, x, sa[i], sb[i], f"{path}[{i}]", owners, depth + 1)
            ]
        if _mutable(a) and sa is not sb:
            return [f"{path}: one {type(a).__name__} shared by two connections"]
        return []
    if isinstance(a, types.MethodType):
        return _shared(a.__self__, b.__self__, sa.__self__, sb.__self__, path, owners, depth)
    if isinstance(a, weakref.ref):
        return _shared(a(), b(), sa(), sb(), f"{path}()", owners, depth)
    if isinstance(a, dict):
        keys = a.keys() & b.keys() & sa.keys() & sb.keys()
        return [
            p
            for k in keys
            for p in _shared(a[k], b[k], sa[k], sb[k], f"{path}[{k!r}]", owners, depth + 1)
        ]
    if isinstance(a, list | tuple | collections.deque):
        return [
            p
            for i, items in enumerate(zip(a, b, sa, sb, strict=False))
            for p in _shared(*items, f"{path}[{i}]", owners, depth + 1)
        ]
    if hasattr(a, "__dict__") and not isinstance(a, type):
        va, vb, vsa, vsb = vars(a), vars(b), vars(sa), vars(sb)
        keys = va.keys() & vb.keys() & vsa.keys() & vsb.keys()
        return [
            p
            for k in sorted(keys)
            for p in _shared(va[k], vb[k], vsa[k], vsb[k], f"{path}.{k}", owners, depth + 1)
        ]
    return []


def test_aiosmtpd_is_the_version_init_from_was_checked_against() -> None:
    """pyrelay/server.py ``RelaySMTP._init_from`` replaces ``SMTP.__init__`` for every
    connection; it must be re-verified line by line against any other aiosmtpd version."""
    assert aiosmtpd.__version__ == "1.4.6", (
        f"aiosmtpd {aiosmtpd.__version__}: re-verify RelaySMTP._init_from (pyrelay/server.py) "
        "against this version's SMTP.__init__, then update this test and the pin"
    )


async def test_fast_connection_init_matches_aiosmtpd_init(tmp_path: Path) -> None:
    """pyrelay/server.py ``RelaySMTP._init_from``: a connection built from the template has
    the same attributes with the same values as one built by aiosmtpd's ``SMTP.__init__``;
    its methods are the same functions bound to itself, not to the template."""
    listener = _listener(tmp_path)
    slow = _by_aiosmtpd(listener)
    fast = listener.factory()
    template = listener.template
    assert template is not None and fast is not template and not isinstance(slow, type)
    problems = _dict_differences(vars(slow), vars(fast), "conn", (slow, fast), 0)
    assert not problems, "RelaySMTP._init_from differs from SMTP.__init__:\n" + "\n".join(problems)
    # The tables _init_from rebuilds really are rebound, not the template's.
    assert fast._smtp_methods and fast._auth_methods
    for name, method in fast._smtp_methods.items():
        assert method.__self__ is fast, name
    for name, impl in fast._auth_methods.items():
        assert not impl.is_builtin or impl.method.__self__ is fast, name


async def test_aiosmtpd_calls_pyrelays_auth_mechanisms(tmp_path: Path) -> None:
    """pyrelay/server.py ``RelaySMTP.auth_PLAIN``/``auth_LOGIN`` replace aiosmtpd's (which
    check passwords synchronously, in the event loop): aiosmtpd 1.4.6 finds ``auth_*`` methods
    on the protocol by name, calls them as ``method(self, args)``, and takes a successful
    ``AuthResult``'s ``auth_data`` as ``session.auth_data``."""
    listener = _listener(tmp_path)
    conn = listener.factory()
    assert sorted(conn._auth_methods) == ["LOGIN", "PLAIN"]
    for name, impl in conn._auth_methods.items():
        assert impl.is_builtin
        assert impl.method.__func__ is getattr(RelaySMTP, f"auth_{name}"), name
    source = inspect.getsource(SMTP.smtp_AUTH)
    assert "auth_result = await auth_method.method(self, args)" in source
    assert "self.session.auth_data = _auth_data" in source
    assert "status = auth_result.message or CODE_SUCCESS" in source
    # RelaySMTP.encrypted reads Session.ssl, which aiosmtpd sets only after STARTTLS.
    made = inspect.getsource(SMTP.connection_made)
    assert "self.session.ssl = self._tls_protocol._extra" in made


def test_aiosmtpd_answers_ehlo_only_through_push() -> None:
    """pyrelay/server.py ``RelaySMTP.smtp_EHLO`` collects the lines aiosmtpd pushes one by one
    and writes them at once to ``self._writer``: aiosmtpd 1.4.6 sends every line of its EHLO
    reply through ``self.push`` (none straight to the transport) and keeps the connection's
    ``StreamWriter`` in ``_writer``.  ``tests/test_relay_e2e.py`` checks the result on the
    wire (one write, the same lines)."""
    ehlo = inspect.getsource(SMTP.smtp_EHLO)
    assert "await self.push(r)" in ehlo and "await self.push('501 Syntax: EHLO hostname')" in ehlo
    assert "_writer" not in ehlo and "transport" not in ehlo
    assert "self._writer = writer" in inspect.getsource(SMTP._cb_client_connected)


async def test_fast_connections_share_no_mutable_state(tmp_path: Path) -> None:
    """pyrelay/server.py ``RelaySMTP._init_from``: no list, dict, set, bytearray, event,
    stream reader, future ... is shared between two connections (or with the template),
    except what aiosmtpd itself shares between connections (the handler, the loop)."""
    listener = _listener(tmp_path)
    slow_a, slow_b = _by_aiosmtpd(listener), _by_aiosmtpd(listener)
    fast_a, fast_b = listener.factory(), listener.factory()
    template = listener.template
    problems = []
    for other in (fast_b, template):
        owners = (fast_a, other)
        va, vb = vars(fast_a), vars(other)
        for name in sorted(va.keys() & vb.keys() & vars(slow_a).keys() & vars(slow_b).keys()):
            problems += _shared(
                va[name], vb[name], vars(slow_a)[name], vars(slow_b)[name], f"conn.{name}", owners
            )
    assert not problems, "state shared between connections:\n" + "\n".join(sorted(set(problems)))


def _class_containers(cls: type) -> dict[str, Any]:
    """Mutable containers stored on the protocol's classes (per-process, not per-connection)."""
    found = {}
    for klass in cls.__mro__:
        if klass.__module__.startswith(("aiosmtpd", "pyrelay")):
            for name, value in vars(klass).items():
                if name.startswith("__") or not isinstance(value, dict | list | set):
                    continue
                if f"{klass.__name__}.{name}" not in found:
                    found[f"{klass.__name__}.{name}"] = value
    return found


def _mark(container: Any) -> None:
    if isinstance(container, dict):
        container["__contract_marker__"] = 0
    elif isinstance(container, list):
        container.append("__contract_marker__")
    else:
        container.add("__contract_marker__")


def _unmark(container: Any) -> bool:
    """Remove the marker; whether it was still there."""
    try:
        if isinstance(container, dict):
            del container["__contract_marker__"]
        else:
            container.remove("__contract_marker__")
    except (KeyError, ValueError):
        return False
    return True


async def test_fast_connection_init_resets_class_level_state_like_aiosmtpd(
    tmp_path: Path,
) -> None:
    """pyrelay/server.py ``RelaySMTP._init_from``: ``SMTP.__init__`` also resets state kept on
    the class (aiosmtpd 1.4 clears ``SMTP.command_size_limits``, which EHLO raises); the fast
    copy must do the same, or the MAIL command limit grows with every connection."""
    listener = _listener(tmp_path)
    listener.factory()  # the template exists: factory() below takes the fast path
    containers = _class_containers(RelaySMTP)
    assert "SMTP.command_size_limits" in containers  # what aiosmtpd 1.4.6 has

    def effects(build: Any) -> dict[str, bool]:
        for container in containers.values():
            _mark(container)
        build()
        return {name: _unmark(container) for name, container in containers.items()}

    by_aiosmtpd = effects(lambda: _by_aiosmtpd(listener))
    by_copy = effects(listener.factory)
    assert by_copy == by_aiosmtpd, "True: left alone, False: reset by __init__"


async def test_mail_command_limit_does_not_grow_with_connections(tmp_path: Path) -> None:
    """The class-level reset above, seen from a client: after many EHLO sessions, a MAIL
    command longer than aiosmtpd's limit is still refused."""
    listener = _listener(tmp_path)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(listener.factory, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        for _ in range(60):  # each EHLO adds 10 (SMTPUTF8) to the class-wide MAIL limit
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            await reader.readline()
            writer.write(b"EHLO client.test\r\n")
            while not (await reader.readline()).startswith(b"250 "):
                pass
            writer.close()
            await writer.wait_closed()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await reader.readline()
        writer.write(b"EHLO client.test\r\n")
        while not (await reader.readline()).startswith(b"250 "):
            pass
        local = "a" * (SMTP.command_size_limit + 10 + 50)
        writer.write(f"MAIL FROM:<{local}@example.org>\r\n".encode())
        reply = await reader.readline()
        writer.close()
        await writer.wait_closed()
    finally:
        server.close()
        await server.wait_closed()
    assert reply.startswith(b"500"), reply


# --------------------------------------------------------------------------------------------
# asyncio: StreamReader._buffer (pyrelay/server.py RelaySMTP._read_data)
# --------------------------------------------------------------------------------------------


async def test_stream_reader_buffer_push_back() -> None:
    """pyrelay/server.py ``RelaySMTP._read_data`` reads DATA in large chunks and puts the
    bytes after ``<CRLF>.<CRLF>`` (pipelined commands) back with
    ``reader._buffer[0:0] = rest``: the buffer must be a bytearray that ``readline()`` reads
    from, ahead of what arrives later."""
    reader = asyncio.StreamReader(limit=64 * 1024)
    assert isinstance(reader._buffer, bytearray)  # type: ignore[attr-defined]
    reader.feed_data(b"NOOP\r\n")
    reader._buffer[0:0] = b"RSET\r\nQUIT"  # type: ignore[attr-defined]
    assert await reader.readline() == b"RSET\r\n"
    reader.feed_data(b"\r\n")
    assert await reader.readline() == b"QUITNOOP\r\n"
    reader._buffer[0:0] = b"MAIL FROM:<a@b.c>\r\n"  # type: ignore[attr-defined]
    assert await reader.readline() == b"MAIL FROM:<a@b.c>\r\n"
    reader.feed_eof()
    assert await reader.readline() == b"\r\n"
    assert reader.at_eof()


# --------------------------------------------------------------------------------------------
# aiosmtpd: SMTP._getaddr (pyrelay/server.py RelaySMTP._getaddr)
# --------------------------------------------------------------------------------------------

ADDRESSES = [
    "<a@b.c>",
    "<a@b.c> SIZE=12 BODY=8BITMIME",
    " <first.last+tag@sub.example.org>",
    "<.a@b.c>",
    "<a..b@c.d>",
    '<"quoted local"@b.c>',
    "<>",
    "<@route.a,@route.b:user@c.d>",
    "<user@[192.0.2.1]>",
    "user@b.c",
    "<a@b.c",
]

_PROTO: Any = None


async def test_fast_address_parse_agrees_with_aiosmtpd(tmp_path: Path) -> None:
    """pyrelay/server.py ``RelaySMTP._getaddr`` parses the common ``<local@domain>`` form
    itself and leaves the rest to aiosmtpd's ``SMTP._getaddr``: both must agree."""
    global _PROTO
    _PROTO = _listener(tmp_path).factory()
    for arg in ADDRESSES:
        assert RelaySMTP._getaddr(_PROTO, arg) == SMTP._getaddr(_PROTO, arg), arg


@settings(max_examples=300, deadline=None)
@given(st.from_regex(r"\A\s?<[A-Za-z0-9.+_%-]{1,12}@[A-Za-z0-9.-]{1,12}>( [A-Z=0-9]{0,8})?\Z"))
def test_fast_address_parse_agrees_on_generated_paths(arg: str) -> None:
    if _PROTO is None:
        return
    assert RelaySMTP._getaddr(_PROTO, arg) == SMTP._getaddr(_PROTO, arg)


# --------------------------------------------------------------------------------------------
# aiosmtplib: the transport it opens, used by pyrelay/transaction.py
# --------------------------------------------------------------------------------------------


class _Recorder:
    """aiosmtpd handler keeping each DATA payload as aiosmtpd received it."""

    def __init__(self) -> None:
        self.contents: list[bytes] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        assert isinstance(envelope.original_content, bytes)
        self.contents.append(envelope.original_content)
        return "250 2.0.0 Ok: queued as C1"


@pytest.fixture
async def smtpd() -> AsyncIterator[tuple[int, _Recorder]]:
    recorder = _Recorder()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SMTP(recorder, hostname="up.test"), "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], recorder
    finally:
        server.close()
        await asyncio.wait_for(server.wait_closed(), 5)


def test_aiosmtplib_is_the_minor_the_transaction_seam_was_checked_against() -> None:
    """pyrelay/transaction.py takes the transport aiosmtplib opened (``SMTP.transport``, kept
    current across STARTTLS) for one transaction and hands it back afterwards."""
    assert aiosmtplib.__version__.startswith("5.1."), (
        f"aiosmtplib {aiosmtplib.__version__}: re-verify pyrelay/transaction.py's hand-over "
        "of the transport (tests below), then widen the pin in pyproject.toml"
    )


class _Body:
    """A message in many chunks, like ``SpoolBody`` reading a queue file."""

    def __init__(self, line: bytes, count: int) -> None:
        self.line, self.count = line, count

    @property
    def size(self) -> int:
        return len(self.line) * self.count

    async def chunks(self) -> Any:
        for _ in range(self.count // 1000):
            yield self.line * 1000


async def _one_client(port: int, tls: ssl.SSLContext | None, pipelining: bool) -> list[str]:
    """Connect with aiosmtplib, run two transactions through the seam, then use aiosmtplib
    again on the same connection.  Returns what happened, for the assertions."""
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, use_tls=False, start_tls=False)
    await client.connect()
    await client.ehlo()
    if tls is not None:
        await client.starttls(tls_context=tls)
        await client.ehlo()
    seen = [f"tls={client.get_transport_info('sslcontext') is not None}"]
    body = _Body(b"x" * 62 + b"\r\n", 200_000)  # 13 MB: the write buffer fills up
    for reset in (False, True):
        transport = client.transport
        # Duck-typed: uvloop's transports do not derive from asyncio's classes.
        assert transport is not None and hasattr(transport, "set_protocol")
        tx = Transaction(transport, 10.0)  # type: ignore[arg-type]
        async with tx:
            replies = await run_transaction(
                tx,
                b"MAIL FROM:<a@example.org>",
                [("b@example.net", b"<b@example.net>")],
                body,
                pipelining=pipelining,
                reset_first=reset,
            )
        assert replies.final is not None
        seen.append(str(replies.final))
    # aiosmtplib owns the connection again and works.
    seen.append(str((await client.noop()).code))
    await client.quit()
    return seen


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
@pytest.mark.parametrize("pipelining", [True, False])
@pytest.mark.parametrize("tls", [False, True], ids=["plain", "starttls"])
async def test_transaction_seam_on_aiosmtplib_transports(
    ca: Any, loop_kind: str, pipelining: bool, tls: bool
) -> None:
    """``transport.set_protocol`` works on aiosmtplib's plain and STARTTLS transports under both
    event loops the relay runs on; flow control reaches the seam's protocol; afterwards the
    aiosmtplib client works on the same connection."""
    recorder = _Recorder()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(recorder, hostname="up.test", tls_context=server_ctx if tls else None),
        "127.0.0.1",
        0,
    )
    port = server.sockets[0].getsockname()[1]
    ctx = client_ctx if tls else None
    try:
        if loop_kind == "uvloop":
            import uvloop

            seen = await asyncio.to_thread(uvloop.run, _one_client(port, ctx, pipelining))
        else:
            seen = await _one_client(port, ctx, pipelining)
    finally:
        server.close()
        await asyncio.wait_for(server.wait_closed(), 5)
    queued = "250 2.0.0 Ok: queued as C1"
    assert seen == [f"tls={tls}", queued, queued, "250"]
    assert [len(c) for c in recorder.contents] == [12_800_000, 12_800_000]


async def test_connection_lost_during_the_seam_reaches_aiosmtplib() -> None:
    """When the upstream drops the connection while the seam owns it, aiosmtplib learns it too
    (``is_connected`` false), so the session is never reused."""

    async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 up.test\r\n")
        await reader.readline()
        writer.write(b"250 up.test\r\n")
        await reader.readline()  # MAIL
        writer.close()

    server = await asyncio.start_server(drop, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, use_tls=False, start_tls=False)
    await client.connect()
    await client.ehlo()
    tx = Transaction(client.transport, 5.0)  # type: ignore[arg-type]
    with pytest.raises(ConnectionLost):
        async with tx:
            await run_transaction(
                tx,
                b"MAIL FROM:<a@example.org>",
                [("b@example.net", b"<b@example.net>")],
                _Body(b"x\r\n", 1000),
                pipelining=False,
                reset_first=False,
            )
    assert not client.is_connected
    server.close()


# --------------------------------------------------------------------------------------------
# prometheus-client: values.ValueClass (pyrelay/metrics.py enable_multiprocess)
# --------------------------------------------------------------------------------------------

_MULTIPROCESS_SCRIPT = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from prometheus_client import CollectorRegistry, generate_latest, values
    from prometheus_client.multiprocess import MultiProcessCollector
    from pyrelay.metrics import MULTIPROC_ENV, Metrics, enable_multiprocess

    assert MULTIPROC_ENV not in os.environ
    assert values.ValueClass is values.MutexValue, values.ValueClass
    directory = Path(sys.argv[1])
    enable_multiprocess(directory)
    Metrics(enabled=True).received.inc()
    pid = os.fork()
    if pid == 0:  # a worker: counts into its own file
        Metrics(enabled=True).received.inc(2)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert status == 0, status
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))
    sys.stdout.write(generate_latest(registry).decode())
    """
)


def test_prometheus_client_is_the_minor_metrics_was_checked_against() -> None:
    """pyrelay/metrics.py ``enable_multiprocess`` swaps ``prometheus_client.values.ValueClass``."""
    version = importlib.metadata.version("prometheus-client")
    assert version.startswith("0.26."), (
        f"prometheus-client {version}: re-verify enable_multiprocess (pyrelay/metrics.py), "
        "then update the pin"
    )


def test_value_class_swap_makes_metrics_count_across_processes(tmp_path: Path) -> None:
    """pyrelay/metrics.py ``enable_multiprocess`` assigns
    ``values.ValueClass = values.MultiProcessValue()`` after prometheus-client was imported
    (it chose ``MutexValue``, the variable being unset then).  That works only while metrics
    look ``values.ValueClass`` up when they are created, not at import: then counts from this
    process and a forked worker both land in the directory and the collector sums them.
    Run in a child process, as the swap is process-wide."""
    env = {k: v for k, v in os.environ.items() if k.lower() != "prometheus_multiproc_dir"}
    proc = subprocess.run(
        [sys.executable, "-c", _MULTIPROCESS_SCRIPT, str(tmp_path / "metrics")],
        env=env,
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "pyrelay_messages_received_total 3.0" in proc.stdout.splitlines(), proc.stdout
    assert sorted(p.name for p in (tmp_path / "metrics").iterdir())[0].startswith("counter_")
