"""The smtp(8) client: one reusable connection to RELAYHOST, per-recipient outcomes.

Every failure is mapped to Postfix's wording so that operators can grep for it
("Connection refused", "SASL authentication failed", "TLS is required, but was not offered").
Credentials are only ever sent over an encrypted connection, whatever the TLS level.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import ssl
import weakref
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import cast

import aiosmtplib
from aiosmtplib import SMTPResponse

from pyrelay.config import HostPort, Settings, TLSLevel
from pyrelay.errors import DeliveryError
from pyrelay.logging import get_logger
from pyrelay.transaction import (
    BadCommand,
    ConnectionLost,
    Garbled,
    MessageBody,
    Replies,
    Reply,
    ReplyTimeout,
    Transaction,
    command_arg,
    run_transaction,
)
from pyrelay.xoauth2 import TokenError, XOAuth2

log = get_logger("pyrelay.delivery")

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$)")


class Outcome(StrEnum):
    SENT = "sent"
    DEFERRED = "deferred"
    BOUNCED = "bounced"


@dataclass(frozen=True, slots=True)
class RecipientResult:
    recipient: str
    outcome: Outcome
    dsn: str
    reply: str  # what the upstream (or pyrelay) said, for logs and bounces


def dsn_of(code: int, text: str) -> str:
    """The enhanced status code in a reply, or one derived from the basic code."""
    if not 200 <= code < 600:
        return "4.5.0"  # not an SMTP reply at all (aiosmtplib reports -1): protocol error
    match = _ENHANCED.match(text)
    if match and match.group(1) == str(code)[0]:
        return match.group(0)
    return f"{str(code)[0]}.0.0"


def outcome_of(code: int) -> Outcome:
    if 200 <= code < 300:
        return Outcome.SENT
    if 500 <= code < 600:
        return Outcome.BOUNCED
    return Outcome.DEFERRED


def one_line(text: str) -> str:
    return " ".join(text.split())


def make_tls_context(settings: Settings) -> ssl.SSLContext:
    """``verify``/``secure``: system CAs (``SSL_CERT_FILE`` honoured) plus
    ``RELAYHOST_TLS_CA_FILE``; ``may``/``encrypt``: encryption without authentication (Postfix)."""
    if settings.tls_level.verifies:
        ctx = ssl.create_default_context()
        if settings.tls_ca_file is not None:
            ctx.load_verify_locations(cafile=str(settings.tls_ca_file))
    else:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


class Step(StrEnum):
    DNS = "dns"
    TCP = "tcp"
    GREETING = "greeting"
    TLS = "tls"
    TOKEN = "token"
    AUTH = "auth"


@dataclass(frozen=True, slots=True)
class Tried:
    """One transaction attempt on one upstream: per-recipient results, the relay that gave them,
    and the connection-level failure, if that is what happened."""

    results: list[RecipientResult]
    relay: str
    error: DeliveryError | None = None


@dataclass(slots=True)
class Session:
    """An open, ready-to-use upstream connection."""

    client: aiosmtplib.SMTP
    relay: str
    dirty: bool = False


class InMemoryBody:
    """A small message still in memory from its acceptance."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    @property
    def size(self) -> int:
        return len(self.data)

    async def chunks(self) -> AsyncIterator[bytes]:
        yield self.data


async def _resolve(host: str, port: int, timeout: float) -> list[tuple[int, tuple[str, int]]]:
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), timeout
        )
    except (OSError, TimeoutError) as exc:
        raise DeliveryError(
            "4.4.3",
            f"Host or domain name not found. Name service error for name={host} type=A: "
            f"{getattr(exc, 'strerror', None) or 'Host not found, try again'}",
            kind=Step.DNS,
        ) from None
    return [(family, addr[:2]) for family, _, _, _, addr in infos]  # type: ignore[misc]


async def _tcp_connect(
    host: str, port: int, addrs: Sequence[tuple[int, tuple[str, int]]], timeout: float
) -> tuple[socket.socket, str]:
    loop = asyncio.get_running_loop()
    last: DeliveryError | None = None
    for family, addr in addrs:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        relay = f"{host}[{addr[0]}]:{port}"
        try:
            await asyncio.wait_for(loop.sock_connect(sock, addr), timeout)
        except TimeoutError:
            sock.close()
            last = DeliveryError(
                "4.4.1", f"connect to {relay}: Connection timed out", kind=Step.TCP
            )
        except OSError as exc:
            sock.close()
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            last = DeliveryError("4.4.1", f"connect to {relay}: {reason}", kind=Step.TCP)
        else:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock, relay
    assert last is not None
    raise last


def _tls_failure(relay: str, exc: BaseException) -> DeliveryError:
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, ssl.SSLError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, ssl.SSLCertVerificationError):
        reason = cause.verify_message or str(cause)
        return DeliveryError(
            "4.7.5", f"Server certificate not verified: {relay}: {reason}", kind=Step.TLS
        )
    detail = str(cause) if cause is not None else str(exc)
    return DeliveryError(
        "4.7.5", f"Cannot start TLS: handshake failure with {relay}: {detail}", kind=Step.TLS
    )


class Upstream:
    """Opens sessions to RELAYHOST and runs SMTP transactions on them."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.target: HostPort = settings.relayhost
        self.tls_context = (
            make_tls_context(settings) if settings.tls_level is not TLSLevel.NONE else None
        )
        self._clients: weakref.WeakSet[aiosmtplib.SMTP] = weakref.WeakSet()
        self.oauth = XOAuth2(settings) if settings.xoauth2 else None

    def abort_all(self) -> None:
        """Close every open upstream connection (shutdown, after the grace period): whatever
        waits for an upstream reply fails at once, and its message stays queued."""
        for client in list(self._clients):
            client.close()

    async def open(self, *, steps: list[tuple[Step, str]] | None = None) -> Session:
        """Connect, greet, STARTTLS and AUTH as configured; raise ``DeliveryError`` on failure.

        ``steps`` (when given) receives one line per completed step, for ``check-upstream``.
        """
        s = self.settings
        host, port = self.target
        addrs = await _resolve(host, port, s.upstream_connect_timeout)
        if steps is not None:
            steps.append((Step.DNS, ", ".join(a[0] for _, a in addrs)))
        sock, relay = await _tcp_connect(host, port, addrs, s.upstream_connect_timeout)
        if steps is not None:
            steps.append((Step.TCP, f"connected to {relay}"))
        implicit = s.implicit_tls and self.tls_context is not None
        client = aiosmtplib.SMTP(
            hostname=host,
            sock=sock,
            local_hostname=s.hostname,
            timeout=s.upstream_command_timeout,
            use_tls=implicit,
            start_tls=False,
            tls_context=self.tls_context if implicit else None,
            validate_certs=s.tls_level.verifies,
        )
        self._clients.add(client)
        try:
            await self._handshake(client, relay, implicit, steps)
        except BaseException:
            client.close()
            raise
        return Session(client=client, relay=relay)

    async def _handshake(
        self,
        client: aiosmtplib.SMTP,
        relay: str,
        implicit: bool,
        steps: list[tuple[Step, str]] | None,
    ) -> None:
        s = self.settings
        try:
            greeting = await client.connect(timeout=s.upstream_connect_timeout)
        except aiosmtplib.SMTPConnectResponseError as exc:
            raise DeliveryError(
                dsn_of(exc.code, exc.message) if exc.code >= 400 else "4.0.0",
                f"host {relay} refused to talk to me: {exc.code} {one_line(exc.message)}",
                kind=Step.GREETING,
            ) from None
        except aiosmtplib.SMTPResponseException as exc:
            # Not an SMTP server (RELAYHOST pointing at an HTTP port, say): defer, never crash.
            raise DeliveryError(
                "4.5.0",
                f"host {relay} refused to talk to me: protocol error: {one_line(exc.message)}",
                kind=Step.GREETING,
            ) from None
        except (aiosmtplib.SMTPConnectError, aiosmtplib.SMTPTimeoutError) as exc:
            if implicit and _is_tls_error(exc):
                raise _tls_failure(relay, exc) from None
            kind = Step.TLS if implicit else Step.GREETING
            text = (
                f"conversation with {relay} timed out while receiving the initial server greeting"
                if isinstance(exc, aiosmtplib.SMTPTimeoutError)
                else f"lost connection with {relay} while receiving the initial server greeting"
            )
            raise DeliveryError("4.4.2", text, kind=kind) from None
        if steps is not None:
            if implicit:
                steps.append((Step.TLS, f"implicit TLS ({_cipher(client)})"))
            steps.append((Step.GREETING, f"{greeting.code} {one_line(greeting.message)}"))
        await _ehlo(client, relay)
        if not implicit and self.tls_context is not None:
            if client.supports_extension("starttls"):
                try:
                    await client.starttls(
                        tls_context=self.tls_context, server_hostname=self.target.host
                    )
                except aiosmtplib.SMTPResponseException as exc:
                    if s.tls_level.requires_tls or s.has_credentials:
                        raise DeliveryError(
                            "4.7.5",
                            f"Cannot start TLS: {relay} said: {exc.code} {one_line(exc.message)}",
                            kind=Step.TLS,
                        ) from None
                except aiosmtplib.SMTPTimeoutError as exc:
                    if _is_tls_error(exc):
                        raise _tls_failure(relay, exc) from None
                    raise DeliveryError(
                        "4.4.2",
                        f"conversation with {relay} timed out while sending STARTTLS",
                        kind=Step.TLS,
                    ) from None
                except (aiosmtplib.SMTPException, OSError) as exc:
                    raise _tls_failure(relay, exc) from None
                else:
                    await _ehlo(client, relay)
                    if steps is not None:
                        steps.append((Step.TLS, f"STARTTLS ({_cipher(client)})"))
            elif s.tls_level.requires_tls:
                raise DeliveryError(
                    "4.7.4", f"TLS is required, but was not offered by host {relay}", kind=Step.TLS
                )
        encrypted = client.get_transport_info("sslcontext") is not None
        if not s.has_credentials:
            return
        if not encrypted:
            # Never, at any TLS level: a relay's credentials are worth more than one message.
            if implicit or not client.supports_extension("starttls"):
                why = "the server did not offer STARTTLS"
            elif self.tls_context is None:
                why = "TLS is disabled by RELAYHOST_TLS_LEVEL=none"
            else:
                why = "STARTTLS failed"
            raise DeliveryError(
                "4.7.4",
                f"refusing to send SASL credentials to {relay} over an unencrypted connection "
                f"({why})",
                kind=Step.TLS,
            )
        if not client.supports_extension("auth"):
            raise DeliveryError(
                "4.7.0",
                f"SASL authentication failed; server {relay} does not offer AUTH",
                kind=Step.AUTH,
            )
        try:
            if self.oauth is not None:
                reply = await self._auth_xoauth2(client, relay, self.oauth, steps)
            else:
                reply = await client.login(
                    s.relayhost_username.get_secret_value(),
                    s.relayhost_password.get_secret_value(),
                )
        except aiosmtplib.SMTPAuthenticationError as exc:
            raise DeliveryError(
                "4.7.0",
                f"SASL authentication failed; server {relay} said: "
                f"{exc.code} {one_line(exc.message)}",
                kind=Step.AUTH,
            ) from None
        except aiosmtplib.SMTPServerDisconnected:
            raise DeliveryError(
                "4.4.2", f"lost connection with {relay} during SASL authentication", kind=Step.AUTH
            ) from None
        except aiosmtplib.SMTPException as exc:
            raise DeliveryError(
                "4.7.0",
                f"SASL authentication failed; {relay}: {one_line(str(exc))}",
                kind=Step.AUTH,
            ) from None
        if steps is not None:
            steps.append((Step.AUTH, f"{reply.code} {one_line(reply.message)}"))

    async def _auth_xoauth2(
        self,
        client: aiosmtplib.SMTP,
        relay: str,
        oauth: XOAuth2,
        steps: list[tuple[Step, str]] | None,
    ) -> SMTPResponse:
        """AUTH XOAUTH2 with a current access token; when the upstream refuses it (334/535: a
        token revoked or expired early), refresh it once and try again."""

        async def get(stale: str = "") -> str:
            try:
                return await oauth.token(stale=stale)
            except TokenError as exc:
                raise DeliveryError(
                    "4.7.0", f"SASL authentication failed; XOAUTH2: {exc}", kind=Step.TOKEN
                ) from None

        token = await get()
        if steps is not None:
            steps.append((Step.TOKEN, f"access token for {oauth.mailbox} from {oauth._where()}"))
        if "xoauth2" not in client.server_auth_methods:
            raise DeliveryError(
                "4.7.0",
                f"SASL authentication failed; server {relay} does not offer AUTH XOAUTH2",
                kind=Step.AUTH,
            )
        try:
            return await client.auth_xoauth2(oauth.mailbox, token)
        except aiosmtplib.SMTPAuthenticationError as exc:
            if exc.code not in (334, 535):
                raise
            log.info(
                "xoauth2_token_refused",
                relay=relay,
                reply=f"{exc.code} {one_line(exc.message)}",
                action="refreshing the token once",
            )
        return await client.auth_xoauth2(oauth.mailbox, await get(stale=token))

    async def transaction(
        self,
        session: Session,
        sender: str,
        recipients: Sequence[str],
        message: MessageBody,
        *,
        smtputf8: bool = False,
        eightbit: bool = False,
    ) -> list[RecipientResult]:
        """MAIL, RCPT…, DATA on an open session, pipelined when the upstream offers it.
        Raises ``DeliveryError`` when the connection fails (the caller defers every recipient
        without a result and drops the session)."""
        client = session.client
        relay = session.relay
        transport = client.transport
        if transport is None or transport.is_closing():
            raise DeliveryError("4.4.2", f"lost connection with {relay}", kind="connection")
        options: list[bytes] = []
        if client.supports_extension("size"):
            options.append(b"SIZE=%d" % message.size)
        if eightbit and client.supports_extension("8bitmime"):
            options.append(b"BODY=8BITMIME")
        if smtputf8:
            if not client.supports_extension("smtputf8"):
                return [
                    RecipientResult(
                        r,
                        Outcome.BOUNCED,
                        "5.6.7",
                        f"SMTPUTF8 is required, but was not offered by host {relay}",
                    )
                    for r in recipients
                ]
            options.append(b"SMTPUTF8")
        encoding = "utf-8" if smtputf8 else "ascii"
        try:
            mail = b" ".join([b"MAIL FROM:" + command_arg(sender, encoding), *options])
        except BadCommand as exc:
            # Retrying cannot help: bounce instead of failing forever.
            reason = f"bad sender address syntax: {exc}"
            return [RecipientResult(r, Outcome.BOUNCED, "5.1.7", reason) for r in recipients]
        results: dict[str, RecipientResult] = {}
        valid: list[tuple[str, bytes]] = []
        for rcpt in recipients:
            try:
                valid.append((rcpt, command_arg(rcpt, encoding)))
            except BadCommand as exc:
                reason = f"bad recipient address syntax: {exc}"
                results[rcpt] = RecipientResult(rcpt, Outcome.BOUNCED, "5.1.3", reason)
        if valid:
            replies = await self._exchange(session, transport, mail, valid, message)
            results.update(self._map(session, replies, [r for r, _ in valid]))
        return [results[r] for r in recipients]

    async def _exchange(
        self,
        session: Session,
        transport: asyncio.BaseTransport,
        mail: bytes,
        recipients: list[tuple[str, bytes]],
        message: MessageBody,
    ) -> Replies:
        s = self.settings
        tx = Transaction(
            cast(asyncio.Transport, transport),
            s.upstream_command_timeout,
            data_timeout=s.upstream_data_timeout,
        )
        dirty, session.dirty = session.dirty, True
        try:
            async with tx:
                return await run_transaction(
                    tx,
                    mail,
                    recipients,
                    message,
                    pipelining=session.client.supports_extension("pipelining"),
                    reset_first=dirty,
                )
        except Garbled as exc:
            session.client.close()
            raise DeliveryError(
                "4.5.0",
                f"conversation with {session.relay}: protocol error while sending {tx.stage}: "
                f"{one_line(exc.text)[:200]}",
                kind="protocol",
            ) from None
        except (ConnectionLost, ReplyTimeout, OSError) as exc:
            session.client.close()
            what = (
                "conversation with {} timed out"
                if isinstance(exc, TimeoutError)
                else ("lost connection with {}")
            )
            raise DeliveryError(
                "4.4.2", f"{what.format(session.relay)} while sending {tx.stage}", kind="connection"
            ) from None

    def _map(
        self, session: Session, replies: Replies, recipients: list[str]
    ) -> dict[str, RecipientResult]:
        """Per-recipient outcomes from the replies of one transaction."""
        relay = session.relay
        mail = replies.mail
        self._check(session, mail, "MAIL FROM")
        if not mail.ok:
            if mail.code == 421:
                # The server is closing this connection (often an idle one we kept open): a
                # connection failure, so the agent retries once on a fresh one.
                session.client.close()
                raise DeliveryError(
                    dsn_of(mail.code, mail.text),
                    f"host {relay} said: 421 {one_line(mail.text)} (in reply to MAIL FROM command)",
                    kind="connection",
                )
            return {r: _result(r, mail.code, mail.text, relay, "MAIL FROM") for r in recipients}
        results: dict[str, RecipientResult] = {}
        accepted: list[str] = []
        for rcpt in recipients:
            reply = replies.rcpts.get(rcpt)
            if reply is None:
                continue
            self._check(session, reply, "RCPT TO")
            if reply.ok:
                accepted.append(rcpt)
            else:
                results[rcpt] = _result(rcpt, reply.code, reply.text, relay, "RCPT TO")
        data, final = replies.data, replies.final
        if data is not None and data.code != 354:
            self._check(session, data, "DATA")
            for rcpt in accepted:
                results[rcpt] = _result(rcpt, data.code, data.text, relay, "DATA")
        elif final is not None:
            self._check(session, final, "end of DATA")
            for rcpt in accepted:
                if final.ok:
                    results[rcpt] = RecipientResult(
                        rcpt, Outcome.SENT, dsn_of(final.code, final.text), one_line(str(final))
                    )
                else:
                    results[rcpt] = _result(rcpt, final.code, final.text, relay, "end of DATA")
            if final.ok:
                session.dirty = False
        if any(r.code == 421 for r in (mail, *replies.rcpts.values(), data, final) if r):
            session.client.close()  # the server is closing: never reuse this connection
        return results

    @staticmethod
    def _check(session: Session, reply: Reply, stage: str) -> None:
        """A reply that is not SMTP at all leaves the conversation out of step: drop the
        connection and defer every pending recipient rather than pair later replies with the
        wrong command."""
        if 200 <= reply.code < 600:
            return
        session.client.close()
        raise DeliveryError(
            "4.5.0",
            f"conversation with {session.relay}: protocol error while sending {stage}: "
            f"{one_line(reply.text)[:200]}",
            kind="protocol",
        )

    async def close(self, session: Session) -> None:
        try:
            if session.client.is_connected:
                await asyncio.wait_for(session.client.quit(), 2)
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            pass
        finally:
            session.client.close()


def _result(rcpt: str, code: int, message: str, relay: str, stage: str) -> RecipientResult:
    text = f"host {relay} said: {code} {one_line(message)} (in reply to {stage} command)"
    return RecipientResult(rcpt, outcome_of(code), dsn_of(code, message), text)


async def _ehlo(client: aiosmtplib.SMTP, relay: str) -> None:
    """EHLO, falling back to HELO.  A stall, a dropped connection or a refusal here defers the
    message like any other connection failure (it must never escape as an unexpected error)."""
    stage = "while performing the EHLO handshake"
    try:
        try:
            await client.ehlo()
        except aiosmtplib.SMTPHeloError:
            await client.helo()
    except aiosmtplib.SMTPTimeoutError:
        raise DeliveryError(
            "4.4.2", f"conversation with {relay} timed out {stage}", kind=Step.GREETING
        ) from None
    except aiosmtplib.SMTPResponseException as exc:
        raise DeliveryError(
            "4" + dsn_of(exc.code, exc.message)[1:],
            f"host {relay} said: {exc.code} {one_line(exc.message)} (in reply to EHLO command)",
            kind=Step.GREETING,
        ) from None
    except (aiosmtplib.SMTPException, OSError):
        raise DeliveryError(
            "4.4.2", f"lost connection with {relay} {stage}", kind=Step.GREETING
        ) from None


def _is_tls_error(exc: BaseException) -> bool:
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLError):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def _cipher(client: aiosmtplib.SMTP) -> str:
    obj = client.get_transport_info("ssl_object")
    if isinstance(obj, ssl.SSLObject):
        cipher = obj.cipher()
        return f"{obj.version()}, {cipher[0] if cipher else '?'}"
    return "TLS"
