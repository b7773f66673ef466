"""The listener (smtpd): aiosmtpd with Postfix's replies, policy at MAIL/RCPT, and a DATA reader
that replies ``250`` only once the message is durable in the spool.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import re
import ssl
import types
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, cast

from aiosmtpd.smtp import SMTP, AuthResult
from aiosmtpd.smtp import Envelope as SMTPEnvelope
from aiosmtpd.smtp import Session as SMTPSession

from pyrelay.cleanup import Accepted, Cleanup, Sender
from pyrelay.config import Settings, SmtpdTLSLevel
from pyrelay.errors import SMTPReply, SpoolError
from pyrelay.logging import get_logger
from pyrelay.metrics import Metrics
from pyrelay.policy import Policy, Reason, Rejection, normalize_address_domain, split_address
from pyrelay.smtpd_tls import ListenerTLS, tls_wanted
from pyrelay.spool import Envelope, Spool
from pyrelay.users import Authenticator, User
from pyrelay.wire import TERMINATOR

log = get_logger("pyrelay.server")

# Memory per session in DATA is about the stream buffer (up to twice STREAM_LIMIT before
# StreamReader pauses the socket), one chunk, and the spool writer's spill size (about 0.5 MB in
# all, measured); large enough that a chunk costs little per byte: 32 KB reads cost 100 KB
# messages 20 % of their throughput.  (aiosmtpd's 1 KB default made the socket pause every
# 2 KB, which was a large part of its DATA cost.)
READ_CHUNK = 64 * 1024
STREAM_LIMIT = 32 * 1024

# ``<dot-atom@dot-atom>`` followed by anything (the ESMTP parameters).
_SIMPLE_PATH = re.compile(
    r"[ \t]*<((?![.])(?:[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]|[.](?![.@]))+"
    r"@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>[ \t]*(.*)\Z",
    re.S,
)
_REPLY = re.compile(r"^([2-5]\d\d)([ -])(.*)$", re.S)
_ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}(?:\s|$)")
# Enhanced status codes for aiosmtpd's built-in replies that have none (RFC 3463 / Postfix).
_DEFAULT_STATUS = {
    "221": "2.0.0",
    "250": "2.0.0",
    "252": "2.0.0",
    "421": "4.7.0",
    "451": "4.3.0",
    "452": "4.3.1",
    "500": "5.5.2",
    "501": "5.5.4",
    "502": "5.5.1",
    "503": "5.5.1",
    "504": "5.5.4",
    "530": "5.7.0",
    "550": "5.0.0",
    "552": "5.3.4",
    "553": "5.1.3",
    "554": "5.0.0",
    "555": "5.5.4",
}


def with_enhanced_status(reply: str) -> str:
    """Add an RFC 3463 code to a reply that lacks one (we advertise ENHANCEDSTATUSCODES)."""
    match = _REPLY.match(reply)
    if not match:
        return reply
    code, sep, text = match.groups()
    if _ENHANCED.match(text) or code not in _DEFAULT_STATUS:
        return reply
    return f"{code}{sep}{_DEFAULT_STATUS[code]} {text}"


def writable(transport: asyncio.BaseTransport | None) -> asyncio.WriteTransport | None:
    """``transport`` if it can still be written to.  Not ``isinstance``: uvloop's transports
    (the relay runs on uvloop, see ``app.run``) do not derive from asyncio's classes."""
    if transport is None or transport.is_closing() or not hasattr(transport, "write"):
        return None
    return cast(asyncio.WriteTransport, transport)


def client_ip(session: SMTPSession) -> str:
    peer = session.peer
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return str(peer or "unknown")


def recipient_key(address: str) -> str:
    """Identity of a recipient for duplicate removal: the local part as written (it may be
    case-sensitive), the domain case-insensitive and in one IDNA form."""
    parts = split_address(address)
    if parts is None:
        return address
    local, domain = parts
    return f"{local}@{normalize_address_domain(domain) or domain.lower()}"


class RelayEnvelope(SMTPEnvelope):
    """aiosmtpd's envelope plus the keys of the recipients already accepted."""

    def __init__(self) -> None:
        super().__init__()
        self.rcpt_keys: set[str] = set()


class RelaySession(SMTPSession):
    """aiosmtpd's session without the deprecation warning its ``login_data`` setter logs on
    every successful AUTH (pyrelay reads ``auth_data``, the ``User``)."""

    @property
    def login_data(self) -> Any:
        return self._login_data

    @login_data.setter
    def login_data(self, value: Any) -> None:
        self._login_data = value

    @property
    def user(self) -> User | None:
        return self.auth_data if isinstance(self.auth_data, User) else None


def session_user(session: SMTPSession) -> User | None:
    return session.auth_data if isinstance(session.auth_data, User) else None


# Exact texts (operators and the issue search for them).
TLS_NOT_AVAILABLE = "454 4.7.0 TLS not available"
TLS_ALREADY_ACTIVE = "554 5.5.1 Error: TLS already active"
AUTH_NEEDS_TLS = "538 5.7.11 Encryption required for requested authentication mechanism"
AUTH_FAILED = "535 5.7.8 Error: authentication failed"
AUTH_NOT_ENABLED = "503 5.5.1 Error: authentication not enabled"
AUTH_OK = "235 2.7.0 Authentication successful"
# Every client the relay turns away because it is stopping (SIGTERM, a drain) hears this.
SHUTTING_DOWN = "421 4.3.2 Service shutting down, closing transmission channel"

_SMTPCommand = Callable[[Any, str], Coroutine[Any, Any, Any]]


def _junk_limited(method: _SMTPCommand) -> _SMTPCommand:
    """Wrap an aiosmtpd command so that it counts against the junk command limit (keeping its
    HELP syntax attributes)."""

    @functools.wraps(method)
    async def wrapper(self: RelaySMTP, arg: str) -> None:
        if await self.junk_command():
            return
        await method(self, arg)

    return wrapper


class RelayHandler:
    """aiosmtpd hooks (MAIL, RCPT, EHLO): policy decisions and the EHLO keywords.  aiosmtpd
    reads the hook table once, from the template connection (see ``RelaySMTP._init_from``)."""

    def __init__(self, listener: Listener) -> None:
        self.listener = listener

    async def handle_EHLO(
        self,
        server: SMTP,
        session: SMTPSession,
        envelope: SMTPEnvelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        limit = self.listener.settings.message_size_limit
        lines = [f"250-{server.hostname}", "250-PIPELINING"]
        if limit:
            lines.append(f"250-SIZE {limit}")
        if isinstance(server, RelaySMTP):
            if server.tls_context is not None and not server.encrypted:
                lines.append("250-STARTTLS")
            if server.encrypted and self.listener.auth.enabled:
                lines.append("250-AUTH PLAIN LOGIN")
        lines += ["250-ENHANCEDSTATUSCODES", "250-8BITMIME", "250 SMTPUTF8"]
        return lines

    async def handle_MAIL(
        self,
        server: SMTP,
        session: SMTPSession,
        envelope: SMTPEnvelope,
        address: str,
        options: list[str],
    ) -> str:
        sender = "" if address == "<>" else address
        policy = self.listener.policy
        rejection = policy.check_sender(sender)
        if rejection is None:
            for opt in options:
                if opt.startswith("SIZE=") and opt[5:].isdigit():
                    rejection = policy.check_declared_size(int(opt[5:]))
        if rejection is not None:
            self.listener.rejected(session, rejection.reason, rejection.reply, sender=sender)
            return rejection.reply
        # "<>" keeps aiosmtpd's truthiness checks (nested MAIL, RCPT before MAIL) working.
        envelope.mail_from = address if sender else "<>"
        envelope.mail_options.extend(options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self,
        server: SMTP,
        session: SMTPSession,
        envelope: SMTPEnvelope,
        address: str,
        options: list[str],
    ) -> str:
        sender = "" if envelope.mail_from == "<>" else (envelope.mail_from or "")
        rejection = self.listener.policy.check_recipient(
            client_ip(session), sender, address, len(envelope.rcpt_tos), session_user(session)
        )
        if rejection is not None:
            self.listener.rejected(
                session, rejection.reason, rejection.reply, sender=sender, recipient=address
            )
            self._after_rejection(server, rejection)
            return rejection.reply
        # Postfix cleanup removes duplicate recipients; here they never enter the envelope, so
        # the upstream sees one RCPT per address (the domain compared case-insensitively).
        key = recipient_key(address)
        keys = envelope.rcpt_keys if isinstance(envelope, RelayEnvelope) else None
        if keys is not None:
            if key in keys:
                log.debug("duplicate_recipient", client=client_ip(session), to=f"<{address}>")
                return "250 2.1.5 Ok"
            keys.add(key)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 2.1.5 Ok"

    @staticmethod
    def _after_rejection(server: SMTP, rejection: Rejection) -> None:
        # A client outside MYNETWORKS can never relay: answer its 554 and hang up instead of
        # letting it hold a connection slot.
        if rejection.reason == Reason.CLIENT and isinstance(server, RelaySMTP):
            server.hang_up_after_reply = True


class RelaySMTP(SMTP):
    """aiosmtpd's protocol with Postfix reply texts, limits, and a chunked DATA reader."""

    line_length_limit = STREAM_LIMIT

    def __init__(self, listener: Listener, *, implicit_tls: bool = False, **kwargs: Any) -> None:
        template = listener.template
        if template is None:
            super().__init__(listener.handler, **kwargs)
        else:
            self._init_from(template)
        self.listener = listener
        # TLS per connection (aiosmtpd's public attributes): a tls:// connection is encrypted
        # from the start; a plain one gets the current certificate (re-read after a renewal)
        # when STARTTLS is on, and must use it first with `encrypt`.
        self.implicit_tls = implicit_tls
        self.tls_context = None if implicit_tls else listener.starttls_context()
        self.require_starttls = (
            self.tls_context is not None and listener.settings.smtpd_tls == SmtpdTLSLevel.ENCRYPT
        )
        self._refuse: str | None = None
        self._ehlo_lines: list[str] | None = None  # replies of an EHLO being answered
        self._junk = 0
        self.hang_up_after_reply = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._session_timer: asyncio.TimerHandle | None = None

    def _init_from(self, template: RelaySMTP) -> None:
        """Per-connection set-up without aiosmtpd's introspection.

        ``SMTP.__init__`` runs ``inspect.getmembers`` over the protocol and the handler on every
        connection to build its command and hook tables; with one message per connection (how
        web apps send) that was the largest single CPU cost.  The tables are the same for every
        connection, so copy them from a template built once and re-bind the methods to this
        instance; per-connection state is reset exactly as ``SMTP.__init__`` sets it.  Written
        against aiosmtpd 1.4.6 (pinned); tests/test_library_contracts.py compares the result
        with ``SMTP.__init__``'s attribute by attribute.
        """
        self.__dict__.update(template.__dict__)
        loop = template.loop
        asyncio.StreamReaderProtocol.__init__(
            self,
            asyncio.StreamReader(loop=loop, limit=self.line_length_limit),
            client_connected_cb=self._cb_client_connected,
            loop=loop,
        )
        self._smtp_methods = {
            name: types.MethodType(method.__func__, self)
            for name, method in template._smtp_methods.items()
        }
        self._auth_methods = {
            name: type(impl)(
                types.MethodType(impl.method.__func__, self)  # type: ignore[attr-defined]
                if impl.is_builtin
                else impl.method,
                impl.is_builtin,
            )
            for name, impl in template._auth_methods.items()
        }
        # Tables SMTP.__init__ builds afresh for each connection: a copy each, never one dict
        # shared by every connection (tests/test_library_contracts.py checks for sharing).
        self._handle_hooks = dict(template._handle_hooks)
        if template._enforce_call_limit:
            self._call_limit_base = dict(template._call_limit_base)
        # SMTP.__init__ also clears this class-wide table, which each EHLO raises (MAIL +10 for
        # SMTPUTF8); without the reset the MAIL length limit would grow with every connection.
        self.command_size_limits.clear()
        self.session = None
        self.envelope = None
        self.transport = None
        self._handler_coroutine = None
        self._timeout_handle = None
        self._tls_handshake_okay = True
        self._tls_protocol = None
        self._original_transport = None

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # The common ``<local@domain> [params]`` form without the email header parser (which
        # also defines a Protocol class on every call in aiosmtpd 1.4); anything unusual takes
        # aiosmtpd's full RFC 5322 path.
        match = _SIMPLE_PATH.match(arg)
        if match:
            return match.group(1), match.group(2)
        result: tuple[str | None, str | None] = super()._getaddr(arg)
        return result

    # -- connection ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None
        super().connection_made(transport)
        if first:
            self._refuse = self.listener.session_opened(self)
            self._session_timer = self.loop.call_later(
                self.listener.settings.session_timeout, self._session_expired
            )

    def connection_lost(self, error: Exception | None) -> None:
        if self._session_timer is not None:
            self._session_timer.cancel()
            self._session_timer = None
        self.listener.session_closed(self)
        super().connection_lost(error)

    def _session_expired(self) -> None:
        log.info("session_timeout", client=client_ip(self.session) if self.session else "?")
        transport = writable(self.transport)
        if transport is not None:
            transport.write(b"421 4.4.2 Error: session time limit exceeded\r\n")
            transport.close()

    def _timeout_cb(self) -> None:
        # aiosmtpd hangs up silently; Postfix's smtpd_timeout tells the client why.
        log.info("command_timeout", client=client_ip(self.session) if self.session else "?")
        transport = writable(self.transport)
        if transport is not None:
            transport.write(f"421 4.4.2 {self.hostname} Error: timeout exceeded\r\n".encode())
        super()._timeout_cb()  # type: ignore[no-untyped-call]

    async def _handle_client(self) -> None:
        if self._refuse:
            await self.push(self._refuse)
            assert self.transport is not None
            self.transport.close()
            return
        await super()._handle_client()

    def _create_envelope(self) -> SMTPEnvelope:
        return RelayEnvelope()

    def _create_session(self) -> SMTPSession:
        return RelaySession(self.loop)

    @property
    def encrypted(self) -> bool:
        """True on a ``tls://`` connection and after a successful STARTTLS."""
        return self.implicit_tls or (self.session is not None and self.session.ssl is not None)

    def _hang_up(self, reply: str | None = None) -> None:
        """Close after ``reply``; pipelined commands already read are dropped, never run."""
        self._reader._buffer.clear()  # type: ignore[attr-defined]
        transport = writable(self.transport)
        if transport is not None:
            if reply is not None:
                transport.write(reply.encode() + b"\r\n")
            transport.close()

    async def junk_command(self) -> bool:
        """Postfix ``smtpd_junk_command_limit``: count NOOP, RSET, VRFY, EXPN and HELP (and
        ETRN in Postfix, not implemented here); past the limit answer ``421`` and close.
        Postfix counts each further one as an error and closes at ``smtpd_hard_error_limit``;
        pyrelay closes at once.  True if the session is over."""
        limit = self.listener.settings.junk_command_limit
        self._junk += 1
        if not limit or self._junk <= limit:
            return False
        assert self.session is not None
        self.listener.metrics.rejected.labels(reason="junk_commands").inc()
        log.warning("junk_command_limit", client=client_ip(self.session), limit=limit)
        self._hang_up(f"421 4.7.0 {self.hostname} Error: too many errors")
        return True

    smtp_NOOP = _junk_limited(SMTP.smtp_NOOP)
    smtp_RSET = _junk_limited(SMTP.smtp_RSET)
    smtp_VRFY = _junk_limited(SMTP.smtp_VRFY)
    smtp_EXPN = _junk_limited(SMTP.smtp_EXPN)  # type: ignore[assignment]
    smtp_HELP = _junk_limited(SMTP.smtp_HELP)

    async def smtp_RCPT(self, arg: str | None) -> None:
        await super().smtp_RCPT(arg)
        if self.hang_up_after_reply:
            self._hang_up()

    functools.update_wrapper(smtp_RCPT, SMTP.smtp_RCPT)  # keeps HELP's syntax text

    # -- STARTTLS and AUTH -----------------------------------------------------------------

    async def smtp_STARTTLS(self, arg: str) -> None:
        assert self.session is not None
        if arg:
            await self.push("501 5.5.4 Syntax: STARTTLS")
            return
        if self.encrypted:
            await self.push(TLS_ALREADY_ACTIVE)
            return
        if self.tls_context is None:
            await self.push(TLS_NOT_AVAILABLE)
            self.listener.tls_refused(client_ip(self.session))
            return
        try:
            await super().smtp_STARTTLS(arg)
        except Exception as exc:
            log.info(
                "tls_handshake_failed",
                client=client_ip(self.session),
                reason=str(exc.__cause__ or exc) or type(exc).__name__,
            )
            raise

    functools.update_wrapper(smtp_STARTTLS, SMTP.smtp_STARTTLS)

    async def smtp_AUTH(self, arg: str) -> None:
        # Postfix smtpd_tls_auth_only: never a password over a plain connection.  aiosmtpd's
        # own TLS check knows STARTTLS only, so pyrelay makes it (tls:// connections too).
        session = self.session
        if session is not None and session.host_name and session.extended_smtp:
            if not self.listener.auth.enabled:
                await self.push(AUTH_NOT_ENABLED)
                return
            if not self.encrypted:
                await self.push(AUTH_NEEDS_TLS)
                return
        await super().smtp_AUTH(arg)

    functools.update_wrapper(smtp_AUTH, SMTP.smtp_AUTH)

    async def auth_PLAIN(self, _: SMTP, args: list[str]) -> AuthResult:
        if len(args) == 1:
            blob = await self.challenge_auth("")
            if not isinstance(blob, bytes):
                return AuthResult(success=False, handled=True)  # "*" or bad base64: answered
        else:
            try:
                blob = base64.b64decode(args[1].encode(), validate=True)
            except ValueError:
                await self.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        parts = blob.split(b"\0")
        if len(parts) != 3:
            await self.push("501 5.5.2 Can't split auth value")
            return AuthResult(success=False, handled=True)
        return await self._check_login("PLAIN", parts[1], parts[2])

    async def auth_LOGIN(self, _: SMTP, args: list[str]) -> AuthResult:
        if len(args) == 1:
            login = await self.challenge_auth(self.AuthLoginUsernameChallenge)
            if not isinstance(login, bytes):
                return AuthResult(success=False, handled=True)
        else:
            try:
                login = base64.b64decode(args[1].encode(), validate=True)
            except ValueError:
                await self.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        password = await self.challenge_auth(self.AuthLoginPasswordChallenge)
        if not isinstance(password, bytes):
            return AuthResult(success=False, handled=True)
        return await self._check_login("LOGIN", login, password)

    async def _check_login(self, mechanism: str, login: bytes, password: bytes) -> AuthResult:
        assert self.session is not None
        ip = client_ip(self.session)
        auth = self.listener.auth
        user = await auth.authenticate(ip, login, password)
        name = login.decode("utf-8", "replace")[:256]
        if user is None:
            failures = auth.failed(ip)
            self.listener.metrics.rejected.labels(reason="auth_failed").inc()
            # Postfix: "SASL LOGIN authentication failed"; the name, never the password.
            log.warning(
                "auth_failed",
                client=ip,
                sasl_method=mechanism,
                sasl_username=name,
                failures=failures,
                next_delay=auth.throttle.delay(ip),
            )
            await self.push(AUTH_FAILED)
            return AuthResult(success=False, handled=True)
        log.info("authenticated", client=ip, sasl_method=mechanism, sasl_username=user.name)
        return AuthResult(success=True, auth_data=user, message=AUTH_OK)

    async def push(self, status: str | bytes) -> None:
        if self._ehlo_lines is not None:  # see smtp_EHLO
            assert isinstance(status, str)
            self._ehlo_lines.append(status)
            return
        # AUTH challenges ("334 <base64>") come as bytes and carry no status code.
        if isinstance(status, bytes):
            await super().push(status)
        else:
            await super().push(with_enhanced_status(status))

    async def smtp_EHLO(self, hostname: str) -> None:
        # aiosmtpd pushes the reply line by line: a write, a TCP segment and a drain for each
        # of its 7-9 lines (bench/commands.py: EHLO took 0.19 ms against Postfix's 0.085).
        # The lines are collected and written at once, as Postfix does.
        self._ehlo_lines = []
        try:
            await super().smtp_EHLO(hostname)
        finally:
            lines, self._ehlo_lines = self._ehlo_lines, None
            if lines:
                encoding = "utf-8" if self.enable_SMTPUTF8 else "ascii"
                self._writer.write("".join(f"{line}\r\n" for line in lines).encode(encoding))
                await self._writer.drain()

    async def check_helo_needed(self, helo: str = "HELO") -> bool:
        assert self.session is not None
        if not self.session.host_name:
            await self.push("503 5.5.1 Error: send HELO/EHLO first")
            return True
        return False

    # -- DATA ------------------------------------------------------------------------------

    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_helo_needed():
            return
        assert self.envelope is not None and self.session is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        self._idle.clear()
        try:
            reply = await self.listener.receive(
                self.session, self.envelope, self._read_data, tls=self.encrypted
            )
            await self.push(reply)
        finally:
            self._idle.set()
            self._set_post_data_state()  # type: ignore[no-untyped-call]
        if self.listener.closing and self.transport is not None:
            await self.push(SHUTTING_DOWN)
            self.transport.close()

    async def _read_data(self, cleanup: Cleanup) -> None:
        """Feed the DATA payload to ``cleanup`` in chunks as it arrives, up to
        ``<CR><LF>.<CR><LF>``: wire form (still dot-stuffed, ending in CRLF).  Only the last
        few bytes are held back, to find a terminator split between two reads."""
        reader = self._reader
        keep = len(TERMINATOR) - 1
        # The leading CRLF (not part of the message) lets one search also find a terminator
        # at the very start.
        pending = b"\r\n"
        skip = 2
        while True:
            chunk = await reader.read(READ_CHUNK)
            if not chunk:
                raise ConnectionResetError("connection closed during DATA")
            self._reset_timeout()
            pending += chunk
            idx = pending.find(TERMINATOR)
            if idx >= 0:
                break
            if len(pending) - keep > skip:
                await cleanup.feed(pending[skip:-keep])
                pending = pending[-keep:]
                skip = 0
        if idx + 2 > skip:
            await cleanup.feed(pending[skip : idx + 2])
        rest = pending[idx + len(TERMINATOR) :]
        if rest:
            # Pipelined commands after the terminator belong to the command reader
            # (StreamReader internals: guarded by tests/test_library_contracts.py).
            reader._buffer[0:0] = rest  # type: ignore[attr-defined]


class Listener:
    """Owns the listening sockets and the live sessions; turns a DATA payload into a queue entry."""

    def __init__(
        self,
        settings: Settings,
        spool: Spool,
        metrics: Metrics,
        submit: Callable[[Envelope, bytes | None], None],
        takes_fresh: Callable[[], bool] = lambda: False,
    ) -> None:
        self.settings = settings
        self.spool = spool
        self.metrics = metrics
        self.submit = submit
        # Whether the scheduler will start delivering a new message at once (then it is
        # accepted straight into active/).
        self.takes_fresh = takes_fresh
        self.policy = Policy.from_settings(settings)
        self.servers: list[asyncio.Server] = []
        self.sessions: set[RelaySMTP] = set()
        # Live sessions per client address (Postfix smtpd_client_connection_count_limit).
        self.per_client: dict[str, int] = {}
        self._client_of: dict[RelaySMTP, str] = {}
        self.closing = False
        self.ports: list[tuple[str, int]] = []
        self.handler = RelayHandler(self)
        self.template: RelaySMTP | None = None
        self.tls: ListenerTLS | None = ListenerTLS(settings) if tls_wanted(settings) else None
        self.auth = Authenticator(settings)
        # Clients already told that STARTTLS is off (one warning per address).
        self._tls_warned: set[str] = set()

    def factory(self) -> RelaySMTP:
        if self.template is None:
            self.template = self._build()
        return RelaySMTP(self)

    def implicit_tls_factory(self) -> RelaySMTP:
        if self.template is None:
            self.template = self._build()
        return RelaySMTP(self, implicit_tls=True)

    def starttls_context(self) -> ssl.SSLContext | None:
        """The context for a new plain connection's STARTTLS, or ``None`` when it is off."""
        if self.tls is None or self.settings.smtpd_tls == SmtpdTLSLevel.NONE:
            return None
        return self.tls.context()

    def tls_refused(self, ip: str) -> None:
        """A client asked for STARTTLS while it is off: tell the operator both ways out, once
        per client address."""
        if ip in self._tls_warned:
            return
        if len(self._tls_warned) >= 10_000:
            self._tls_warned.clear()
        self._tls_warned.add(ip)
        log.warning(
            "starttls_refused",
            client=ip,
            reply=TLS_NOT_AVAILABLE,
            reason="the client asked for STARTTLS but TLS is off on this listener",
            fix="either the client stops asking for TLS (e.g. OpenDLP SMTP_USE_TLS=false), "
            "or the relay turns it on: PYRELAY_SMTPD_TLS_LEVEL=may (self-signed certificate) "
            "or a certificate in PYRELAY_TLS_CERT_FILE/PYRELAY_TLS_KEY_FILE",
        )

    def _build(self) -> RelaySMTP:
        s = self.settings
        return RelaySMTP(
            self,
            data_size_limit=None,
            enable_SMTPUTF8=True,
            hostname=s.hostname,
            ident="ESMTP pyrelay",
            timeout=s.command_timeout,
            command_call_limit=s.max_commands,
            # RelaySMTP.smtp_AUTH enforces TLS itself (aiosmtpd's check misses tls:// listeners).
            auth_require_tls=False,
            loop=asyncio.get_running_loop(),
        )

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.tls is not None:
            await asyncio.to_thread(self.tls.load)
        self.auth.load()
        if self.auth.enabled and self.tls is None:
            log.warning(
                "smtpd_auth_unavailable",
                reason="SMTP AUTH users are configured but TLS is off, and AUTH is offered "
                "only over TLS",
                fix="set PYRELAY_SMTPD_TLS_LEVEL=may (or encrypt), or add a tls:// listener",
            )
        addresses = []
        for address in self.settings.listen:
            host, port = address.host, address.port
            ssl_context = self.tls.context() if address.tls and self.tls is not None else None
            server = await loop.create_server(
                self.implicit_tls_factory if address.tls else self.factory,
                host=host,
                port=port,
                ssl=ssl_context,
                reuse_address=True,
                # Several worker processes share each address; the kernel spreads connections.
                reuse_port=self.settings.workers > 1,
                backlog=1024,
            )
            self.servers.append(server)
            for sock in server.sockets:
                addr = sock.getsockname()
                self.ports.append((str(addr[0]), int(addr[1])))
                addresses.append(("tls://" if address.tls else "") + f"{addr[0]}:{addr[1]}")
        log.info("listening", addresses=" ".join(addresses))

    def session_opened(self, proto: RelaySMTP) -> str | None:
        """Register a new session; ``None``, or the ``421`` that refuses it."""
        if self.closing:
            # Accepted by the event loop just before stop() closed the listener (its
            # connection_made runs after): the same reply as the idle sessions get, not a
            # connection limit that was never reached.
            return SHUTTING_DOWN
        if len(self.sessions) >= self.settings.max_connections:
            self.metrics.rejected.labels(reason="too_many_connections").inc()
            log.warning(
                "connection_refused",
                reason="too many connections",
                limit=self.settings.max_connections,
            )
            return f"421 4.7.0 {proto.hostname} Error: too many connections from all clients"
        ip = client_ip(proto.session) if proto.session is not None else "unknown"
        count = self.per_client.get(ip, 0)
        limit = self.settings.max_connections_per_client
        if limit and count >= limit:
            self.metrics.rejected.labels(reason="too_many_connections_per_client").inc()
            log.warning(
                "connection_refused",
                client=ip,
                reason="too many connections from this client",
                limit=limit,
            )
            return f"421 4.7.0 {proto.hostname} Error: too many connections from {ip}"
        self.per_client[ip] = count + 1
        self._client_of[proto] = ip
        self.sessions.add(proto)
        return None

    def session_closed(self, proto: RelaySMTP) -> None:
        self.sessions.discard(proto)
        ip = self._client_of.pop(proto, None)
        if ip is not None:
            left = self.per_client.get(ip, 1) - 1
            if left > 0:
                self.per_client[ip] = left
            else:
                self.per_client.pop(ip, None)

    def rejected(
        self,
        session: SMTPSession,
        reason: str,
        reply: str,
        *,
        sender: str | None = None,
        recipient: str | None = None,
    ) -> None:
        self.metrics.rejected.labels(reason=reason).inc()
        fields: dict[str, str] = {"client": client_ip(session)}
        if sender is not None:
            fields["from"] = f"<{sender}>"
        if recipient is not None:
            fields["to"] = f"<{recipient}>"
        log.info("rejected", reply=reply, **fields)

    async def receive(
        self,
        session: SMTPSession,
        smtp_env: SMTPEnvelope,
        read: Callable[[Cleanup], Awaitable[None]],
        *,
        tls: bool = False,
    ) -> str:
        """Stream one DATA payload through cleanup into the spool; hand the entry to the
        scheduler; return the reply for the client (``250`` only once it is durable)."""
        ip = client_ip(session)
        user = session_user(session)
        who = Sender(
            ip,
            session.host_name or "unknown",
            bool(session.extended_smtp),
            tls=tls,
            user=user.name if user else "",
        )
        cleanup = Cleanup(
            self.settings,
            self.spool,
            who,
            smtp_env.mail_from or "<>",
            list(smtp_env.rcpt_tos),
            bool(smtp_env.smtp_utf8),
        )
        try:
            await read(cleanup)
            accepted = await cleanup.finish(claimed=self.takes_fresh())
        except SpoolError as exc:
            self.metrics.rejected.labels(reason="spool").inc()
            log.error(
                "queue_write_failed", client=ip, reply=exc.reply, reason=str(exc.__cause__ or exc)
            )
            return exc.reply
        except SMTPReply as exc:
            reason = "size" if exc.code == 552 else "hops"
            self.rejected(session, reason, exc.reply)
            return exc.reply
        except BaseException:
            if cleanup.published:
                # The client was gone (or the relay stopping) by the time its message was on
                # disk: accepted all the same and delivered, as Postfix does once cleanup has
                # committed; a client that did not hear the 250 may send it again.
                self._queued(cleanup, cleanup.accepted(), ip, user, "client gone before the reply")
            else:
                await cleanup.abort()
            raise
        env = self._queued(cleanup, accepted, ip, user)
        return f"250 2.0.0 Ok: queued as {env.queue_id}"

    def _queued(
        self, cleanup: Cleanup, accepted: Accepted, ip: str, user: User | None, note: str = ""
    ) -> Envelope:
        """Log a durable entry as ``queued`` and hand it to the scheduler."""
        if cleanup.normalizer.dirty:
            log.warning("bare_newline_normalized", queue_id=cleanup.queue_id, client=ip)
        env = accepted.envelope
        self.metrics.received.inc()
        extra: dict[str, str] = {"sasl_username": user.name} if user else {}
        if note:
            extra["note"] = note
        log.info(
            "queued",
            queue_id=env.queue_id,
            client=ip,
            **{"from": f"<{env.sender}>"},
            nrcpt=len(env.recipients),
            size=env.size,
            **extra,
        )
        self.submit(env, accepted.payload)
        return env

    async def stop(self, grace: float) -> None:
        """Stop listening; let sessions in DATA finish within ``grace``; close the rest."""
        self.closing = True
        # close() closes the listening sockets at once (uvloop and asyncio alike).  Linux then
        # resets the connections still in a socket's accept queue: with SO_REUSEPORT they are
        # not moved to another worker's socket (net.ipv4.tcp_migrate_req is off by default), so
        # none is left waiting for a greeting.  Those the loop had already accepted are told
        # SHUTTING_DOWN by session_opened.
        for server in self.servers:
            server.close()
        for proto in list(self.sessions):
            transport = writable(proto.transport)
            if proto._idle.is_set() and transport is not None:
                transport.write(SHUTTING_DOWN.encode() + b"\r\n")
                transport.close()
        busy = [
            asyncio.ensure_future(p._idle.wait()) for p in self.sessions if not p._idle.is_set()
        ]
        if busy:
            _, pending = await asyncio.wait(busy, timeout=grace)
            for fut in pending:
                fut.cancel()
        for proto in list(self.sessions):
            if proto.transport is not None:
                proto.transport.close()
        for server in self.servers:
            try:
                await asyncio.wait_for(server.wait_closed(), 1)
            except TimeoutError:
                pass
