"""DKIM signing: signatures made by the relay verify with dkimpy and with Perl's Mail::DKIM
(an implementation that shares nothing with pyrelay or dkimpy), both resolving the public key
through a DNS stub; the streamed body hash equals dkimpy's canonicalisation; keys are
generated once and survive restarts; ``pyrelay dkim show|check``."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import dkim as dkimpy
import dns.asyncresolver
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from dkim.canonicalization import Relaxed, Simple
from dns_stub import DNSStub
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import LogCapture, Upstream, relay_settings, running, wait_until
from pyrelay import dkim
from pyrelay.cli import main as cli_main
from pyrelay.queuefile import Envelope
from pyrelay.spool import Spool, SpoolBody

HERE = Path(__file__).resolve().parent

MESSAGE = (
    b"From: OpenDLP <noreply@mail.example.org>\r\n"
    b"To: Alice <alice@dest.test>\r\n"
    b"Subject: Your   registration\r\n"
    b"  (folded)\r\n"
    b"List-Unsubscribe: <https://example.org/u>\r\n"
    b"X-Not-Signed: 1\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"Hello Alice,  \r\n"
    b".leading dot line\r\n"
    b"tabs\tand  spaces \t\r\n"
    b"\r\n"
    b"Bye\r\n"
    b"\r\n"
    b"\r\n"
)


def _mail_dkim() -> bool:
    if shutil.which("perl") is None:
        return False
    probe = subprocess.run(
        ["perl", "-MMail::DKIM::Verifier", "-e1"], capture_output=True, check=False
    )
    return probe.returncode == 0


def verify_mail_dkim(message: bytes, stub: DNSStub) -> tuple[bool, str]:
    """Perl Mail::DKIM's verdict on every signature of ``message``."""
    if not _mail_dkim():
        if os.environ.get("CI"):
            pytest.fail("Perl Mail::DKIM is missing (.ci/run installs libmail-dkim-perl)")
        pytest.skip("Perl Mail::DKIM (libmail-dkim-perl) is not installed")
    r = subprocess.run(
        ["perl", str(HERE / "dkim_verify.pl"), str(stub.port)],
        input=message,
        capture_output=True,
        timeout=30,
        check=False,
    )
    return r.returncode == 0, (r.stdout + r.stderr).decode(errors="replace")


def verify_dkimpy(message: bytes, stub: DNSStub) -> bool:
    """dkimpy, every signature, public keys from the stub's zone (its ``dnsfunc``)."""

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        txt = stub.zone.get(name.decode().lower())
        return txt.encode() if txt is not None else None

    d = dkimpy.DKIM(message)
    count = sum(1 for n, _ in d.headers if n.lower() == b"dkim-signature")
    try:
        return count > 0 and all(d.verify(idx=i, dnsfunc=dnsfunc) for i in range(count))
    except dkimpy.DKIMException:
        return False


@pytest.fixture
def stub() -> Iterator[DNSStub]:
    s = DNSStub()
    yield s
    s.close()


@pytest.fixture(autouse=True)
def _fresh_signers() -> Iterator[None]:
    dkim.forget_signers()
    yield
    dkim.forget_signers()


def publish(stub: DNSStub, key_dir: Path, selector: str = "mail") -> list[dkim.DomainKey]:
    keys = dkim.Signer.load(key_dir, dkim.Selectors.parse(selector)).all_keys()
    for key in keys:
        stub.zone[key.record_name + "."] = key.record
    return keys


def wire(message: bytes) -> bytes:
    """Dot-stuffed, as the spool keeps it."""
    stuffed = message.replace(b"\r\n.", b"\r\n..")
    return b"." + stuffed if stuffed.startswith(b".") else stuffed


# ------------------------------------------------------------------------ body hash (unit)

_LINE = st.lists(
    st.sampled_from([b"a", b"b", b" ", b"\t", b".", b"..", b"x y", b"\xc3\xa9", b"  ", b"From:"]),
    max_size=12,
).map(b"".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lines=st.lists(_LINE, max_size=25),
    terminated=st.booleans(),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=8),
)
def test_streamed_body_hash_equals_dkimpy(
    lines: list[bytes], terminated: bool, cuts: list[int]
) -> None:
    body = b"\r\n".join(lines) + (b"\r\n" if terminated and lines else b"")
    stuffed = wire(body)
    hasher = dkim.BodyHash()
    hasher._PARTIAL = 5  # exercise the long-line path too
    pos = 0
    for cut in sorted(set(cuts)):
        if pos <= cut <= len(stuffed):
            hasher.update(stuffed[pos:cut])
            pos = cut
    hasher.update(stuffed[pos:])
    relaxed, simple = hasher.digests()

    def b64(data: bytes) -> bytes:
        import hashlib

        return base64.b64encode(hashlib.sha256(data).digest())

    assert relaxed == b64(Relaxed.canonicalize_body(body))
    assert simple == b64(Simple.canonicalize_body(body))


def test_signature_fields_and_tampering_are_seen_by_both_verifiers(
    tmp_path: Path, stub: DNSStub
) -> None:
    dkim.generate_keys(tmp_path, ["example.org"])
    publish(stub, tmp_path, "sel1")
    signer = dkim.Signer.load(tmp_path, dkim.Selectors.parse("sel1"))
    message = MESSAGE.replace(b"mail.example.org", b"example.org")
    head, _, body = message.partition(b"\r\n\r\n")
    hasher = dkim.BodyHash()
    hasher.update(wire(body))
    sig = signer.sign(wire(head + b"\r\n\r\n"), hasher)
    assert sig.startswith(b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.org;")
    fields = dkim._tags(sig.partition(b":")[2])
    assert fields[b"s"] == b"sel1"
    # The recommended fields present, List-*, From oversigned; X-Not-Signed left out.
    assert fields[b"h"] == (b"from:to:subject:list-unsubscribe:mime-version:content-type:from")
    signed = sig + message
    assert verify_dkimpy(signed, stub)
    ok, out = verify_mail_dkim(signed, stub)
    assert ok, out
    for tampered in (
        signed.replace(b"Bye", b"Bye!"),
        signed.replace(b"Subject: Your", b"Subject: Our"),
        signed.replace(b"\r\n\r\n", b"\r\nFrom: evil@attacker.test\r\n\r\n", 1),
    ):
        assert not verify_dkimpy(tampered, stub)
        ok, out = verify_mail_dkim(tampered, stub)
        assert not ok and "fail" in out, out
    # A record with another key: both verifiers refuse the signature.
    other = tmp_path / "other"
    dkim.generate_keys(other, ["example.org"])
    stub.zone.clear()
    publish(stub, other, "sel1")
    assert not verify_dkimpy(signed, stub)
    assert not verify_mail_dkim(signed, stub)[0]


def test_ed25519_key_adds_a_second_signature(tmp_path: Path, stub: DNSStub) -> None:
    dkim.generate_keys(tmp_path, ["example.org"])
    ed = ed25519.Ed25519PrivateKey.generate()
    (tmp_path / "example.org.ed25519.private").write_bytes(
        ed.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    keys = publish(stub, tmp_path)
    assert [(k.selector, k.algorithm) for k in keys] == [
        ("mail", b"rsa-sha256"),
        ("mail-ed25519", b"ed25519-sha256"),
    ]
    assert keys[1].record.startswith("v=DKIM1; k=ed25519; p=")
    signer = dkim.Signer.load(tmp_path, dkim.Selectors.parse("mail"))
    message = b"From: a@example.org\r\nSubject: hi\r\n\r\nbody\r\n"
    hasher = dkim.BodyHash()
    hasher.update(b"body\r\n")
    sigs = signer.sign(message.partition(b"\r\n\r\n")[0] + b"\r\n\r\n", hasher)
    assert sigs.count(b"DKIM-Signature:") == 2 and b"a=ed25519-sha256" in sigs
    assert verify_dkimpy(sigs + message, stub)
    assert not verify_dkimpy(sigs + message.replace(b"body", b"bodY"), stub)


def test_selectors_setting() -> None:
    sel = dkim.Selectors.parse("default,example.org=sel1,example.com=sel2")
    assert sel.for_domain("example.org") == "sel1"
    assert sel.for_domain("example.com") == "sel2"
    assert sel.for_domain("other.test") == "default"
    assert dkim.Selectors.parse("").for_domain("x.test") == "mail"
    with pytest.raises(dkim.DKIMError):
        dkim.Selectors.parse("bad selector!")


# ---------------------------------------------------------------- queue file with a prepend


@pytest.mark.parametrize("size", [100, 300_000])
async def test_spool_round_trip_with_prepend(tmp_path: Path, size: int) -> None:
    spool = Spool(tmp_path / "spool")
    spool.prepare()
    try:
        env = Envelope(
            queue_id=spool.new_id(), sender="a@b.test", recipients=["c@d.test"], arrival=1.0
        )
        writer = spool.writer(env)
        writer.reserve(dkim.PREPEND_RESERVE)
        message = b"Subject: x\r\n\r\n" + b"y" * size + b"\r\n"
        for i in range(0, len(message), 8192):
            await writer.write(message[i : i + 8192])
        prepend = b"DKIM-Signature: v=1; b=abc\r\n\tdef\r\n"
        assert writer.set_prepend(prepend)
        await writer.commit(smtputf8=False, eightbit=False)
        entry = spool.open_entry("incoming", env.queue_id)
        try:
            assert entry.envelope.prepend == prepend.decode()
            assert entry.envelope.size == len(message)
            body = SpoolBody(spool, entry)
            assert body.size == len(prepend) + len(message)
            got = b"".join([c async for c in body.chunks()])
            assert got == prepend + message
            assert (await body.head(40)) == (prepend + message)[:40]
        finally:
            entry.close()
        # Too large for the room kept: refused when the message already spilled to the file.
        env2 = Envelope(queue_id=spool.new_id(), sender="", recipients=["c@d.test"], arrival=1.0)
        writer = spool.writer(env2)
        writer.reserve(10)
        await writer.write(b"z" * 200_000)
        assert not writer.set_prepend(b"X" * 100)
        await writer.commit(smtputf8=False, eightbit=False)
        assert spool.read_envelope("incoming", env2.queue_id).prepend == ""
    finally:
        spool.close()


# ------------------------------------------------------------------------- through the relay


@pytest.fixture
async def dkim_relay(
    tmp_path: Path, ca_file: Path, logs: LogCapture, stub: DNSStub
) -> AsyncIterator[Any]:
    def make(up: Upstream, **overrides: Any) -> Any:
        values: dict[str, Any] = {"dkim_autogenerate": "true"}
        values.update(overrides)
        return running(relay_settings(tmp_path, up, ca_file, **values))

    yield make


def _resolver_to(stub: DNSStub) -> dns.asyncresolver.Resolver:
    res = dns.asyncresolver.Resolver(configure=False)
    res.nameservers = ["127.0.0.1"]
    res.port = stub.port
    return res


@pytest.fixture
def dns_via_stub(stub: DNSStub, monkeypatch: pytest.MonkeyPatch) -> DNSStub:
    """pyrelay's lookups (dnspython's default resolver) go to the stub."""
    monkeypatch.setattr(dns.asyncresolver, "default_resolver", _resolver_to(stub))
    return stub


async def test_relayed_message_is_signed_after_masquerading_and_received(
    upstream: Upstream,
    dkim_relay: Any,
    tmp_path: Path,
    stub: DNSStub,
    dns_via_stub: DNSStub,
    logs: LogCapture,
) -> None:
    big = MESSAGE + b"".join(b"line %d  with  spaces \r\n" % i for i in range(8000))
    async with dkim_relay(upstream) as relay:
        key_dir = tmp_path / "spool" / "dkim"
        (key,) = publish(stub, key_dir)
        await relay.asend("noreply@mail.example.org", ["alice@dest.test"], MESSAGE)
        # Over the spool's 64 KB in-memory limit: streamed to the file, signature pwritten.
        await relay.asend("noreply@mail.example.org", ["bob@dest.test"], big)
        await wait_until(lambda: len(upstream.state.messages) == 2, what="delivery")
    assert logs.has("event=dkim_key_generated", "domain=example.org", "IN TXT")
    for got, original in zip(upstream.state.messages, (MESSAGE, big), strict=True):
        content = got.content
        assert content.startswith(b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed;")
        # Signed after the relay's rewriting: the masqueraded From, the relay's Received
        # (which precedes the message's own fields) are in what was signed.
        sig_end = content.index(b"\r\nReceived: ") + 2
        rest = content[sig_end:]
        assert rest.startswith(b"Received: from app.test")
        assert b"From: OpenDLP <noreply@example.org>\r\n" in rest
        # Byte for byte: everything after the relay's own header fields is what was sent.
        orig_head, _, orig_body = original.partition(b"\r\n\r\n")
        assert rest.endswith(b"\r\n\r\n" + orig_body)
        assert verify_dkimpy(content, stub)
        ok, out = verify_mail_dkim(content, stub)
        assert ok, out
        tampered = content.replace(b"Bye", b"Bye.")
        assert not verify_dkimpy(tampered, stub)
        assert not verify_mail_dkim(tampered, stub)[0]
    assert key.domain == "example.org"


async def test_retry_sends_the_same_signature(
    upstream: Upstream, dkim_relay: Any, tmp_path: Path, stub: DNSStub, dns_via_stub: DNSStub
) -> None:
    upstream.state.mail_replies = ["451 4.3.0 try again later"]
    async with dkim_relay(upstream) as relay:
        publish(stub, tmp_path / "spool" / "dkim")
        await relay.asend("noreply@example.org", ["alice@dest.test"], MESSAGE)
        await wait_until(lambda: len(upstream.state.messages) == 1, what="retry", timeout=15)
    content = upstream.state.messages[0].content
    assert verify_dkimpy(content, stub)
    # The deferred attempt read the queue file: the signature stored there is what was sent.
    sig = content[: content.index(b"Received: ")]
    assert sig.count(b"DKIM-Signature:") == 1


async def test_already_signed_message_is_not_signed_again(
    upstream: Upstream, dkim_relay: Any, tmp_path: Path, stub: DNSStub, dns_via_stub: DNSStub
) -> None:
    async with dkim_relay(upstream) as relay:
        key_dir = tmp_path / "spool" / "dkim"
        publish(stub, key_dir)
        signer = dkim.Signer.load(key_dir, dkim.Selectors.parse("mail"))
        message = MESSAGE.replace(b"mail.example.org", b"example.org")
        head, _, body = message.partition(b"\r\n\r\n")
        hasher = dkim.BodyHash()
        hasher.update(wire(body))
        signed = signer.sign(head + b"\r\n\r\n", hasher) + message
        # Signed by an application with our key: kept as it is, no second signature.
        await relay.asend("noreply@example.org", ["alice@dest.test"], signed)
        # A signature that does not verify (the body changed): the relay signs.
        await relay.asend("noreply@example.org", ["bob@dest.test"], signed + b"PS\r\n")
        await wait_until(lambda: len(upstream.state.messages) == 2, what="delivery")
    first, second = (m.content for m in upstream.state.messages)
    assert first.count(b"DKIM-Signature:") == 1 and first.startswith(b"Received: ")
    assert verify_dkimpy(first, stub)
    assert second.count(b"DKIM-Signature:") == 2 and second.startswith(b"DKIM-Signature:")
    d = dkimpy.DKIM(second)
    assert d.verify(idx=0, dnsfunc=lambda n, timeout=5: stub.zone[n.decode()].encode())


async def test_unlisted_domain_and_no_keys_mean_no_signature(
    upstream: Upstream, make_relay: Any, tmp_path: Path
) -> None:
    async with make_relay(upstream, allow_empty_sender_domains="true") as relay:
        await relay.asend("a@other.test", ["x@dest.test"], b"From: a@other.test\r\n\r\nhi\r\n")
        await wait_until(lambda: len(upstream.state.messages) == 1)
    assert b"DKIM-Signature" not in upstream.state.messages[0].content
    assert not (tmp_path / "spool" / "dkim").exists()


async def test_generated_keys_persist_across_restarts(
    upstream: Upstream,
    dkim_relay: Any,
    tmp_path: Path,
    logs: LogCapture,
    stub: DNSStub,
    dns_via_stub: DNSStub,
) -> None:
    key_file = tmp_path / "spool" / "dkim" / "example.org.private"
    async with dkim_relay(upstream, allowed_sender_domains="example.org example.net"):
        # Start-up compares DNS with the keys: nothing published yet.
        await wait_until(lambda: logs.has("event=dkim_dns_mismatch", "status=missing"))
    first = key_file.read_bytes()
    assert first.startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    assert (key_file.stat().st_mode & 0o777) == 0o600
    assert (tmp_path / "spool" / "dkim" / "example.net.private").exists()
    assert logs.has("event=dkim_key_generated", "domain=example.org")
    logs.truncate(0)
    logs.seek(0)
    publish(stub, tmp_path / "spool" / "dkim")
    async with dkim_relay(upstream, allowed_sender_domains="example.org example.net") as relay:
        await relay.asend("noreply@example.org", ["alice@dest.test"], MESSAGE)
        await wait_until(lambda: len(upstream.state.messages) == 1)
        await asyncio.sleep(0.3)
    assert key_file.read_bytes() == first
    assert not logs.has("event=dkim_key_generated")
    assert not logs.has("event=dkim_dns_mismatch")
    assert logs.has("event=dkim_key", "domain=example.org", "selector=mail")
    assert verify_dkimpy(upstream.state.messages[0].content, stub)


# ------------------------------------------------------------------------------ dkim command


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        cli_main(args)
    out = capsys.readouterr()
    return int(exc.value.code or 0), out.out, out.err


def test_dkim_show_and_check(
    tmp_path: Path,
    stub: DNSStub,
    dns_via_stub: DNSStub,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    key_dir = tmp_path / "keys"
    dkim.generate_keys(key_dir, ["example.org", "example.com"])
    for name, value in {
        "RELAYHOST": "[127.0.0.1]:25",
        "ALLOWED_SENDER_DOMAINS": "example.org example.com",
        "PYRELAY_SPOOL_DIR": str(tmp_path / "spool"),
        "PYRELAY_DKIM_KEY_DIR": str(key_dir),
        "DKIM_SELECTOR": "mail,example.com=sel2",
    }.items():
        monkeypatch.setenv(name, value)
    code, out, _ = _cli(["dkim", "show"], capsys)
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith('sel2._domainkey.example.com. IN TXT "v=DKIM1; k=rsa; p=MII')
    assert lines[1].startswith('mail._domainkey.example.org. IN TXT "v=DKIM1; k=rsa; p=')
    # Long values are split into quoted strings of at most 255 characters.
    strings = re.findall(r'"([^"]*)"', lines[1])
    assert len(strings) == 2 and all(len(s) <= 255 for s in strings)
    assert (
        "".join(strings)
        == dkim.Signer.load(key_dir, dkim.Selectors.parse("mail")).all_keys()[1].record
    )
    code, out, _ = _cli(["dkim", "show", "--json"], capsys)
    shown = json.loads(out)
    assert [k["name"] for k in shown] == [
        "sel2._domainkey.example.com.",
        "mail._domainkey.example.org.",
    ]
    keys = publish(stub, key_dir, "mail,example.com=sel2")
    # example.org published, example.com missing, then with another key.
    del stub.zone["sel2._domainkey.example.com."]
    code, out, _ = _cli(["dkim", "check"], capsys)
    assert code == 1
    assert "sel2._domainkey.example.com: missing" in out
    assert "mail._domainkey.example.org: ok" in out
    other = tmp_path / "other"
    dkim.generate_keys(other, ["example.com"])
    stub.zone["sel2._domainkey.example.com."] = (
        dkim.Signer.load(other, dkim.Selectors.parse("sel2")).all_keys()[0].record
    )
    code, out, _ = _cli(["dkim", "check", "--json"], capsys)
    report = {r["domain"]: r["status"] for r in json.loads(out)}
    assert code == 1 and report == {"example.com": "different key", "example.org": "ok"}
    publish(stub, key_dir, "mail,example.com=sel2")
    code, out, _ = _cli(["dkim", "check"], capsys)
    assert code == 0, out
    assert {k.domain for k in keys} == {"example.org", "example.com"}


def test_bad_key_file_stops_start_up(tmp_path: Path, ca_file: Path) -> None:
    from pyrelay.app import prepare_dkim
    from pyrelay.errors import ConfigError

    key_dir = tmp_path / "keys"
    key_dir.mkdir()
    (key_dir / "example.org.private").write_text("not a key")
    settings = relay_settings(tmp_path, None, ca_file, dkim_key_dir=key_dir)
    with pytest.raises(ConfigError, match="PYRELAY_DKIM_KEY_DIR: .*example.org.private"):
        prepare_dkim(settings)


async def test_queue_show_includes_the_signature(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    spool = Spool(tmp_path / "spool")
    spool.prepare()
    try:
        env = Envelope(
            queue_id=spool.new_id(), sender="a@example.org", recipients=["c@d.test"], arrival=1.0
        )
        writer = spool.writer(env)
        await writer.write(b"Subject: x\r\n\r\n..dot\r\n")
        writer.set_prepend(b"DKIM-Signature: v=1; d=example.org;\r\n\tb=abc\r\n")
        await writer.commit(smtputf8=False, eightbit=False)
    finally:
        spool.close()
    monkeypatch.setenv("RELAYHOST", "[127.0.0.1]:25")
    monkeypatch.setenv("ALLOWED_SENDER_DOMAINS", "example.org")
    monkeypatch.setenv("PYRELAY_SPOOL_DIR", str(tmp_path / "spool"))
    code, out, _ = _cli(["queue", "show", env.queue_id], capsys)
    assert code == 0
    assert "\n\nDKIM-Signature: v=1; d=example.org;\n\tb=abc\nSubject: x\n\n.dot\n" in out
    code, out, _ = _cli(["queue", "show", "--json", env.queue_id], capsys)
    assert json.loads(out)["message"].startswith("DKIM-Signature: v=1; d=example.org;\r\n\tb=abc")
