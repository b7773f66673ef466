"""A recording upstream SMTP server (aiosmtpd) with STARTTLS and AUTH that checks credentials.

Used by ``pyrelay demo`` and by the test suite as the "real peer" standing in for SendGrid/SES:
it records every message, every AUTH attempt (and whether it arrived over TLS), and can be told
to answer particular recipients or stages with chosen replies.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    tls: bool
    user: str | None


@dataclass
class AuthAttempt:
    username: str
    password: str
    tls: bool
    ok: bool


@dataclass
class SinkState:
    username: str | None = None
    password: str | None = None
    messages: list[Received] = field(default_factory=list)
    auth_attempts: list[AuthAttempt] = field(default_factory=list)
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    mail_reply: str | None = None
    # Replies for the next MAIL commands, used up one at a time before ``mail_reply``.
    mail_replies: list[str] = field(default_factory=list)
    data_reply: str | None = None
    connections: int = 0
    # Drop the connection instead of answering the end of DATA (a crash mid-transaction).
    drop_at_data_end: bool = False
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    # When set, the end of DATA is answered only once the event is set (a slow upstream).
    data_gate: asyncio.Event | None = None
    at_data_end: asyncio.Event = field(default_factory=asyncio.Event)


class _Handler:
    def __init__(self, state: SinkState) -> None:
        self.state = state

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if self.state.username is not None and not session.authenticated:
            return "530 5.7.0 Authentication required"
        if self.state.mail_replies:
            return self.state.mail_replies.pop(0)
        if self.state.mail_reply:
            return self.state.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        reply = self.state.rcpt_replies.get(address.lower())
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.state.at_data_end.set()
        if self.state.data_gate is not None:
            await self.state.data_gate.wait()
        # Duck-typed: uvloop's transports do not derive from asyncio.Transport.
        abort = getattr(server.transport, "abort", None)
        if self.state.drop_at_data_end and abort is not None:
            abort()
            return "451 dropped"
        if self.state.data_reply:
            return self.state.data_reply
        content = envelope.original_content or b""
        user = None
        if isinstance(session.auth_data, LoginPassword):
            user = session.auth_data.login.decode()
        self.state.messages.append(
            Received(
                mail_from="" if envelope.mail_from in (None, "<>") else envelope.mail_from,
                rcpt_tos=list(envelope.rcpt_tos),
                content=content,
                tls=_encrypted(server),
                user=user,
            )
        )
        self.state.arrived.set()
        return f"250 2.0.0 Ok: queued as SINK{len(self.state.messages)}"


def _encrypted(server: SMTP) -> bool:
    transport = server.transport
    return transport is not None and transport.get_extra_info("sslcontext") is not None


class _SinkSMTP(SMTP):
    def __init__(self, state: SinkState, **kwargs: Any) -> None:
        super().__init__(_Handler(state), **kwargs)
        state.connections += 1


def _authenticator(state: SinkState) -> Any:
    def check(
        server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        if not isinstance(data, LoginPassword):
            return AuthResult(success=False, handled=False)
        user = data.login.decode(errors="replace")
        password = data.password.decode(errors="replace")
        ok = user == state.username and password == state.password
        state.auth_attempts.append(AuthAttempt(user, password, _encrypted(server), ok))
        if ok:
            return AuthResult(success=True, auth_data=data)
        return AuthResult(
            success=False, handled=False, message="535 5.7.8 Authentication credentials invalid"
        )

    return check


async def start_sink(
    state: SinkState,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    tls_context: ssl.SSLContext | None = None,
    implicit_tls: bool = False,
    hostname: str = "upstream.test",
    smtputf8: bool = True,
) -> asyncio.Server:
    """Start listening; ``tls_context`` enables STARTTLS (or implicit TLS).  Without TLS the
    server still offers AUTH, so that a client leaking credentials in clear would be caught."""
    loop = asyncio.get_running_loop()

    def factory() -> SMTP:
        return _SinkSMTP(
            state,
            hostname=hostname,
            tls_context=None if implicit_tls else tls_context,
            authenticator=_authenticator(state),
            auth_require_tls=tls_context is not None and not implicit_tls,
            enable_SMTPUTF8=smtputf8,
            loop=loop,
        )

    return await loop.create_server(
        factory, host=host, port=port, ssl=tls_context if implicit_tls else None
    )
