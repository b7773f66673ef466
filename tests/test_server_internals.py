"""Guards for the two places where the listener leans on aiosmtpd internals for speed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import relay_settings
from pyrelay.metrics import Metrics
from pyrelay.server import Listener, RelaySMTP
from pyrelay.spool import Spool


def _listener(tmp_path: Path) -> Listener:
    s = relay_settings(tmp_path, None, None, tls_level="none")
    return Listener(s, Spool(s.spool_dir), Metrics(), lambda env, msg: None)


async def test_fast_connection_init_matches_aiosmtpd_init(tmp_path: Path) -> None:
    listener = _listener(tmp_path)
    full = listener.factory()  # builds the template with aiosmtpd's own __init__
    fast = listener.factory()
    assert listener.template is not None and fast is not listener.template
    assert set(vars(fast)) == set(vars(full))
    assert set(fast._smtp_methods) == set(full._smtp_methods)
    for name, method in fast._smtp_methods.items():
        assert method.__self__ is fast, name
    assert fast._closed is not full._closed
    assert fast.session is None and fast.envelope is None and fast.transport is None


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


def _slow(arg: str) -> Any:
    return SMTP._getaddr(_PROTO, arg)


_PROTO: Any = None


async def test_fast_address_parse_agrees_with_aiosmtpd(tmp_path: Path) -> None:
    global _PROTO
    _PROTO = _listener(tmp_path).factory()
    for arg in ADDRESSES:
        assert RelaySMTP._getaddr(_PROTO, arg) == _slow(arg), arg


@settings(max_examples=300, deadline=None)
@given(st.from_regex(r"\A\s?<[A-Za-z0-9.+_%-]{1,12}@[A-Za-z0-9.-]{1,12}>( [A-Z=0-9]{0,8})?\Z"))
def test_fast_address_parse_agrees_on_generated_paths(arg: str) -> None:
    if _PROTO is None:
        return
    assert RelaySMTP._getaddr(_PROTO, arg) == _slow(arg)
