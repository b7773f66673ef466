"""XOAUTH2 against real peers: an OAuth2 token endpoint (a small HTTP server) started here, and
an aiosmtpd upstream that accepts ``AUTH XOAUTH2`` only with the endpoint's current access
token.  Tokens expire every couple of seconds while mail keeps flowing, the refresh token is
rotated, the grant is revoked and restored, the relay restarts with only its saved token."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import ssl
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

from conftest import LogCapture, relay_settings, running, wait_until
from pyrelay.commands import _probe_upstream
from pyrelay.sink import SinkState, _Handler
from pyrelay.xoauth2 import token_path

MAILBOX = "relay@example.org"
CLIENT_ID = "client-1234.apps.example"
CLIENT_SECRET = "client-secret-QWERTY"
INITIAL_REFRESH = "refresh-initial-ZZZ"
MESSAGE = b"From: a@example.org\r\nTo: b@dest.test\r\nSubject: hi\r\n\r\nhello\r\n"


# ------------------------------------------------------------------------------- the peers


@dataclass
class TokenServer:
    """Google/Microsoft-style token endpoint: form-encoded POST, JSON answers."""

    lifetime: float = 2.0
    rotate: bool = False
    revoked: bool = False
    refresh_tokens: set[str] = field(default_factory=lambda: {INITIAL_REFRESH})
    access: dict[str, float] = field(default_factory=dict)  # token -> expiry
    requests: list[dict[str, str]] = field(default_factory=list)
    issued: list[str] = field(default_factory=list)
    counter: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    lock: threading.Lock = field(default_factory=threading.Lock)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def handle(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        with self.lock:
            self.requests.append(form)
            if form.get("client_id") != CLIENT_ID or form.get("client_secret") != CLIENT_SECRET:
                return 401, {"error": "invalid_client", "error_description": "Unauthorized"}
            if form.get("grant_type") != "refresh_token":
                return 400, {"error": "unsupported_grant_type"}
            if self.revoked or form.get("refresh_token") not in self.refresh_tokens:
                return 400, {
                    "error": "invalid_grant",
                    "error_description": "Token has been expired or revoked.",
                }
            n = next(self.counter)
            token = f"access-{n}-SECRETTOKEN"
            self.access[token] = time.time() + self.lifetime
            self.issued.append(token)
            answer: dict[str, Any] = {
                "access_token": token,
                "expires_in": self.lifetime,
                "token_type": "Bearer",
            }
            if self.rotate:
                new = f"refresh-{n}-ROTATED"
                self.refresh_tokens = {new}
                answer["refresh_token"] = new
            return 200, answer

    def valid(self, token: str) -> bool:
        with self.lock:
            return self.access.get(token, 0) > time.time()

    def revoke_access(self) -> None:
        with self.lock:
            self.access.clear()


@pytest.fixture
def token_server() -> Iterator[TokenServer]:
    state = TokenServer()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            length = int(self.headers.get("Content-Length", 0))
            ctype = self.headers.get("Content-Type", "")
            body = self.rfile.read(length).decode()
            form = dict(urllib.parse.parse_qsl(body)) if "form-urlencoded" in ctype else {}
            status, answer = state.handle(form)
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


@dataclass
class OAuthUpstream:
    state: SinkState
    server: asyncio.Server
    port: int
    auths: list[tuple[str, bool]] = field(default_factory=list)  # (token, accepted)

    @property
    def relayhost(self) -> str:
        return f"[127.0.0.1]:{self.port}"


class _XOAuthSMTP(SMTP):
    """Offers only AUTH XOAUTH2; answers a bad token like Gmail (334 + JSON, then 535)."""

    def __init__(self, up: OAuthUpstream, tokens: TokenServer, **kwargs: Any) -> None:
        super().__init__(_Handler(up.state), **kwargs)
        self._up = up
        self._tokens = tokens

    async def auth_XOAUTH2(self, _: Any, args: list[str]) -> AuthResult:  # noqa: N802
        if len(args) != 2:
            return AuthResult(success=False, handled=False, message="501 5.5.2 syntax")
        raw = base64.b64decode(args[1]).decode()
        parts = dict(p.split("=", 1) for p in raw.split("\x01") if "=" in p)
        token = parts.get("auth", "").removeprefix("Bearer ")
        ok = parts.get("user") == MAILBOX and self._tokens.valid(token)
        self._up.auths.append((token, ok))
        if ok:
            return AuthResult(success=True, auth_data=LoginPassword(MAILBOX.encode(), b""))
        challenge = json.dumps({"status": "401", "schemes": "bearer", "scope": "mail"})
        await self.challenge_auth(base64.b64encode(challenge.encode()), encode_to_b64=False)
        return AuthResult(
            success=False,
            handled=False,
            message="535 5.7.8 Username and Password not accepted",
        )


@pytest.fixture
async def oauth_upstream(
    server_tls: ssl.SSLContext, token_server: TokenServer
) -> AsyncIterator[OAuthUpstream]:
    loop = asyncio.get_running_loop()
    state = SinkState(username=MAILBOX, password=None)
    holder: list[OAuthUpstream] = []

    def factory() -> SMTP:
        return _XOAuthSMTP(
            holder[0],
            token_server,
            hostname="smtp.upstream.test",
            tls_context=server_tls,
            auth_require_tls=True,
            auth_exclude_mechanism=["LOGIN", "PLAIN"],
            loop=loop,
        )

    server = await loop.create_server(factory, host="127.0.0.1", port=0)
    up = OAuthUpstream(state, server, server.sockets[0].getsockname()[1])
    holder.append(up)
    yield up
    server.close()


def oauth_settings(
    tmp_path: Path, up: OAuthUpstream, tokens: TokenServer, ca_file: Path, **overrides: Any
) -> Any:
    values: dict[str, Any] = {
        "relayhost_username": MAILBOX,
        "relayhost_password": "",
        "xoauth2_client_id": CLIENT_ID,
        "xoauth2_secret": CLIENT_SECRET,
        "xoauth2_initial_refresh_token": INITIAL_REFRESH,
        "xoauth2_token_endpoint": tokens.url,
        "masquerade_domains": "",
    }
    values.update(overrides)
    return relay_settings(tmp_path, up, ca_file, **values)  # type: ignore[arg-type]


def secrets_of(tokens: TokenServer) -> list[str]:
    return [CLIENT_SECRET, INITIAL_REFRESH, *tokens.issued, *tokens.refresh_tokens]


def assert_no_secrets(tmp_path: Path, logs: LogCapture, tokens: TokenServer) -> None:
    text = logs.getvalue()
    for secret in secrets_of(tokens):
        assert secret not in text, "a token leaked into the log"
    spool = tmp_path / "spool"
    for path in spool.rglob("*"):
        if path.is_file() and "xoauth2" not in path.parts:
            data = path.read_bytes()
            for secret in secrets_of(tokens):
                assert secret.encode() not in data, f"a token leaked into {path}"


# ----------------------------------------------------------------------------------- tests


async def test_tokens_expiring_every_second_and_a_half_are_refreshed_while_mail_flows(
    oauth_upstream: OAuthUpstream,
    token_server: TokenServer,
    tmp_path: Path,
    ca_file: Path,
    logs: LogCapture,
) -> None:
    token_server.rotate = True
    token_server.lifetime = 1.5
    settings = oauth_settings(
        tmp_path, oauth_upstream, token_server, ca_file, upstream_idle_timeout="0.3s"
    )
    async with running(settings) as relay:
        for i in range(6):
            await relay.asend("a@example.org", [f"b{i}@dest.test"], MESSAGE)
            await wait_until(lambda n=i: len(oauth_upstream.state.messages) == n + 1)
            await asyncio.sleep(0.8)
    assert len(oauth_upstream.state.messages) == 6
    # Every AUTH the upstream saw carried a token valid at that moment: refreshed before expiry.
    assert all(ok for _, ok in oauth_upstream.auths), oauth_upstream.auths
    assert len(oauth_upstream.auths) >= 5
    assert len(token_server.issued) >= 3
    assert len({token for token, _ in oauth_upstream.auths}) >= 3
    # The rotated refresh token was used for the next refresh, and is saved.
    used = [r["refresh_token"] for r in token_server.requests]
    assert used[0] == INITIAL_REFRESH and used[1] == "refresh-1-ROTATED"
    saved = json.loads(token_path(tmp_path / "spool", MAILBOX).read_text())
    assert saved["refresh_token"] in token_server.refresh_tokens
    assert saved["access_token"] == token_server.issued[-1]
    mode = token_path(tmp_path / "spool", MAILBOX).stat().st_mode & 0o777
    assert mode == 0o600
    assert logs.has("event=xoauth2_token_refreshed", f"mailbox={MAILBOX}")
    assert_no_secrets(tmp_path, logs, token_server)


async def test_a_refused_token_is_refreshed_once_and_auth_retried(
    oauth_upstream: OAuthUpstream,
    token_server: TokenServer,
    tmp_path: Path,
    ca_file: Path,
    logs: LogCapture,
) -> None:
    token_server.lifetime = 3600
    settings = oauth_settings(tmp_path, oauth_upstream, token_server, ca_file)
    async with running(settings) as relay:
        await relay.asend("a@example.org", ["b@dest.test"], MESSAGE)
        await wait_until(lambda: len(oauth_upstream.state.messages) == 1)
        # The provider revokes the access token long before its expiry.
        token_server.revoke_access()
        await asyncio.sleep(1.2)  # the idle connection is closed: the next delivery AUTHs
        await relay.asend("a@example.org", ["c@dest.test"], MESSAGE)
        await wait_until(lambda: len(oauth_upstream.state.messages) == 2)
    assert [ok for _, ok in oauth_upstream.auths] == [True, False, True]
    assert len(token_server.issued) == 2
    assert logs.has("event=xoauth2_token_refused", "535")
    assert not logs.has("event=deferred")
    assert_no_secrets(tmp_path, logs, token_server)


async def test_revoked_grant_defers_with_the_endpoint_error_and_recovers(
    oauth_upstream: OAuthUpstream,
    token_server: TokenServer,
    tmp_path: Path,
    ca_file: Path,
    logs: LogCapture,
) -> None:
    token_server.revoked = True
    settings = oauth_settings(tmp_path, oauth_upstream, token_server, ca_file)
    report = await _probe_upstream(settings, 5.0)
    assert not report["ok"] and report["failed_step"] == "token"
    assert [s["step"] for s in report["steps"]] == ["dns", "tcp", "greeting", "tls", "token"]
    assert "invalid_grant (Token has been expired or revoked.)" in report["error"]
    assert "XOAUTH2_INITIAL_REFRESH_TOKEN" in report["hint"]
    async with running(settings) as relay:
        await relay.asend("a@example.org", ["b@dest.test"], MESSAGE)
        await wait_until(lambda: logs.has("event=deferred", "to=<b@dest.test>"))
        assert logs.has(
            "event=deferred",
            "dsn=4.7.0",
            "XOAUTH2: token endpoint http://127.0.0.1",
            "invalid_grant (Token has been expired or revoked.)",
        )
        assert logs.has("event=xoauth2_refresh_failed", "invalid_grant")
        assert oauth_upstream.auths == []  # no AUTH without a token
        token_server.revoked = False  # the operator fixed the grant
        await wait_until(lambda: len(oauth_upstream.state.messages) == 1, timeout=15)
    report = await _probe_upstream(settings, 5.0)
    assert report["ok"]
    steps = [s["step"] for s in report["steps"]]
    assert steps.index("token") == steps.index("auth") - 1
    assert_no_secrets(tmp_path, logs, token_server)


async def test_restart_with_only_the_saved_token(
    oauth_upstream: OAuthUpstream,
    token_server: TokenServer,
    tmp_path: Path,
    ca_file: Path,
    logs: LogCapture,
) -> None:
    token_server.rotate = True
    token_server.lifetime = 3600
    settings = oauth_settings(tmp_path, oauth_upstream, token_server, ca_file)
    async with running(settings) as relay:
        await relay.asend("a@example.org", ["b@dest.test"], MESSAGE)
        await wait_until(lambda: len(oauth_upstream.state.messages) == 1)
    # The initial refresh token is spent (rotated); the relay restarts without any initial
    # token, and the access token it saved is revoked: only the saved refresh token remains.
    assert INITIAL_REFRESH not in token_server.refresh_tokens
    token_server.revoke_access()
    settings = oauth_settings(
        tmp_path, oauth_upstream, token_server, ca_file, xoauth2_initial_refresh_token=""
    )
    async with running(settings) as relay:
        await relay.asend("a@example.org", ["c@dest.test"], MESSAGE)
        await wait_until(lambda: len(oauth_upstream.state.messages) == 2)
    assert [r["refresh_token"] for r in token_server.requests] == [
        INITIAL_REFRESH,
        "refresh-1-ROTATED",
    ]
    assert_no_secrets(tmp_path, logs, token_server)


def test_config_masks_tokens_and_reads_file_variants(tmp_path: Path, ca_file: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text(CLIENT_SECRET + "\n")
    refresh_file = tmp_path / "refresh"
    refresh_file.write_text(INITIAL_REFRESH + "\n")
    s = relay_settings(
        tmp_path,
        None,
        ca_file,
        relayhost="[smtp.gmail.com]:587",
        relayhost_username=MAILBOX,
        relayhost_password="",
        xoauth2_client_id=CLIENT_ID,
        xoauth2_secret_file=secret_file,
        xoauth2_initial_refresh_token_file=refresh_file,
        xoauth2_initial_access_token="access-initial-SECRET",
    )
    assert s.xoauth2_secret.get_secret_value() == CLIENT_SECRET
    assert s.xoauth2_initial_refresh_token.get_secret_value() == INITIAL_REFRESH
    # Google's documented endpoint for smtp.gmail.com, Microsoft's for Office 365.
    assert s.token_endpoint == "https://oauth2.googleapis.com/token"
    o365 = s.replace(relayhost=s.relayhost._replace(host="smtp.office365.com"))
    assert o365.token_endpoint.startswith("https://login.microsoftonline.com/")
    dump = s.dump()
    text = json.dumps(dump)
    for secret in (CLIENT_SECRET, INITIAL_REFRESH, "access-initial-SECRET"):
        assert secret not in text
    assert dump["XOAUTH2_SECRET"] == "********"
    assert dump["XOAUTH2_CLIENT_ID"] == CLIENT_ID
    assert "XOAUTH2_SECRET_FILE" not in dump


async def test_worker_processes_share_refreshes_and_rotated_tokens(
    token_server: TokenServer, tmp_path: Path, ca_file: Path, logs: LogCapture
) -> None:
    from pyrelay.xoauth2 import XOAuth2

    token_server.rotate = True
    token_server.lifetime = 3600
    settings = relay_settings(
        tmp_path,
        None,
        ca_file,
        relayhost_username=MAILBOX,
        relayhost_password="",
        xoauth2_client_id=CLIENT_ID,
        xoauth2_secret=CLIENT_SECRET,
        xoauth2_initial_refresh_token=INITIAL_REFRESH,
        xoauth2_token_endpoint=token_server.url,
    )
    # Two processes' views of the same mailbox (each has its own XOAuth2 object).
    first, second = XOAuth2(settings), XOAuth2(settings)
    a = await first.token()
    # The second never saw the rotation: it takes the saved tokens instead of refreshing with
    # the spent initial refresh token (which the endpoint would refuse).
    b = await second.token()
    assert a == b and len(token_server.requests) == 1
    # The upstream refuses the token in the second process: one refresh, with the rotated
    # refresh token; the first process then adopts the result when the token is refused there.
    c = await second.token(stale=b)
    assert c != b
    assert [r["refresh_token"] for r in token_server.requests] == [
        INITIAL_REFRESH,
        "refresh-1-ROTATED",
    ]
    assert await first.token(stale=a) == c
    assert len(token_server.requests) == 2
