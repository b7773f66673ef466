"""cleanup(8): one message on its way from DATA into the queue.

The listener feeds the DATA stream in chunks as it arrives; this stage normalises line endings
(``WireNormalizer``), collects the header block up to Postfix's ``header_size_limit``, rewrites
it (``Received:``, masquerading, ``Message-ID:``/``Date:``), and streams the body straight into
the spool.  Memory per message is bounded by the header limit and the spool's spill size, never
by the message size.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from pyrelay import dkim
from pyrelay.config import Settings
from pyrelay.errors import SMTPReply
from pyrelay.logging import get_logger
from pyrelay.queuefile import Envelope
from pyrelay.rewrite import Rewritten, build_received, masquerade_address, rewrite_message
from pyrelay.spool import EntryWriter, Spool
from pyrelay.wire import WireNormalizer

# Postfix cleanup limits (same names and defaults).
HEADER_SIZE_LIMIT = 102400
HOPCOUNT_LIMIT = 50
# A header block larger than this is rewritten in a thread, so that the event loop keeps
# serving other sessions (the rewrite of a 100 KB address field takes tens of milliseconds).
_INLINE_REWRITE = 16 * 1024
_BLANK = b"\r\n\r\n"

log = get_logger("pyrelay.cleanup")

# Reply arguments, not exception instances: a module-level exception that is raised keeps the
# traceback of its last raise, and with it the frames of the session that raised it (its
# buffers, its transport) for as long as the process lives.
TOO_BIG = (552, "5.3.4", "Message size exceeds fixed limit")
TOO_MANY_HOPS = (554, "5.4.6", "Too many hops")


@dataclass(frozen=True, slots=True)
class Sender:
    """Who handed us the message (for ``Received:`` and the log)."""

    client_ip: str
    helo: str
    extended: bool
    tls: bool = False
    user: str = ""  # the SMTP AUTH name, if the client logged in

    @property
    def protocol_suffix(self) -> str:
        """Postfix's ``with ESMTPS``/``ESMTPA``/``ESMTPSA``: S for TLS, A for AUTH."""
        return ("S" if self.tls else "") + ("A" if self.user else "")


@dataclass(frozen=True, slots=True)
class Accepted:
    envelope: Envelope
    payload: bytes | None  # the wire form when small enough to keep for the first attempt


class Cleanup:
    """Build one queue entry from a DATA stream.  ``feed`` the payload (wire form, terminator
    excluded), then ``finish`` (returns ``Accepted`` or raises ``SMTPReply``) or ``abort``."""

    def __init__(
        self,
        settings: Settings,
        spool: Spool,
        who: Sender,
        mail_from: str,
        recipients: list[str],
        smtputf8_requested: bool,
    ) -> None:
        self.settings = settings
        sender = "" if mail_from == "<>" else mail_from
        masq = settings.masquerade_domains
        if masq and sender:
            sender = masquerade_address(sender, masq)
        self.masquerade = masq
        queue_id = spool.new_id()
        self.now = datetime.now(UTC)
        self.envelope = Envelope(
            queue_id=queue_id,
            sender=sender,
            recipients=recipients,
            arrival=time.time(),
            client=who.client_ip,
        )
        # An address that is not ASCII needs SMTPUTF8 upstream whatever the client said.
        self.utf8_envelope = not all(a.isascii() for a in (sender, *recipients))
        self.received = build_received(
            helo=who.helo or "unknown",
            client_ip=who.client_ip,
            hostname=settings.hostname,
            queue_id=queue_id,
            recipient=recipients[0] if len(recipients) == 1 else None,
            protocol=(
                ("UTF8SMTP" if smtputf8_requested or self.utf8_envelope else "ESMTP")
                if who.extended
                else "SMTP"
            )
            + who.protocol_suffix,
            now=self.now,
        )
        self.writer: EntryWriter = spool.writer(self.envelope)
        self.normalizer = WireNormalizer()
        self.limit = settings.message_size_limit
        self.received_bytes = 0
        self.too_big = False
        self.eightbit = False
        self.utf8_headers = False
        self.hops = 0
        self._header = bytearray()
        self._collecting = True
        self._discarding = False  # past header_size_limit: drop header bytes up to the body
        self._window = b""
        # DKIM: the keys (if any domain has one), the rewritten header block of a message whose
        # From domain has a key, and the body hash, computed as the body streams through.
        signer = dkim.signer_for(
            dkim.key_dir(settings.spool_dir, settings.dkim_key_dir), settings.dkim_selector
        )
        self.signer: dkim.Signer | None = signer if signer.domains else None
        self._signed_head: bytes | None = None
        self._prepend = b""  # DKIM-Signature fields, once signed
        self._body_hash: dkim.BodyHash | None = None

    @property
    def queue_id(self) -> str:
        return self.envelope.queue_id

    async def feed(self, chunk: bytes) -> None:
        self.received_bytes += len(chunk)
        if self.too_big:
            return
        if self.limit and self.received_bytes > self.limit:
            # Keep reading to the end of DATA (RFC 5321 4.2.5), but keep nothing.
            self.too_big = True
            await self.writer.abort()
            self._header.clear()
            return
        await self._normalised(self.normalizer.feed(chunk))

    async def _normalised(self, data: bytes) -> None:
        if not data:
            return
        if self._discarding:
            data = self._skip_to_body(data)
            if not data:
                return
        if self._collecting:
            self._header += data
            head = self._header
            if head.startswith(b"\r\n") or head.find(_BLANK) >= 0:
                await self._headers_done(bytes(head))
            elif len(head) > HEADER_SIZE_LIMIT:
                await self._headers_too_long(bytes(head))
            return
        await self._body(data)

    async def _body(self, data: bytes) -> None:
        if not self.eightbit and not data.isascii():
            self.eightbit = True
        if self._body_hash is not None:
            self._body_hash.update(data)
        await self.writer.write(data)

    async def _headers_done(self, head: bytes) -> None:
        self._collecting = False
        self._header = bytearray()
        rewritten = await self._rewrite(head)
        await self._emit(rewritten, head)

    async def _emit(self, rewritten: Rewritten, source: bytes) -> None:
        self.hops = rewritten.hops
        if not rewritten.headers.isascii():
            self.utf8_headers = self.eightbit = True
        if self.signer is not None:
            self._dkim_start(rewritten.headers)
        await self.writer.write(rewritten.headers)
        rest = source[rewritten.body_start :]
        if rest:
            await self._body(rest)

    def _dkim_start(self, headers: bytes) -> None:
        """Hash the body if the From domain (after masquerading) has a key."""
        assert self.signer is not None
        domain = dkim.from_domain(dkim.parse_headers(headers))
        if self.signer.keys_for(domain) is None:
            return
        self._signed_head = headers
        self._body_hash = dkim.BodyHash()
        self.writer.reserve(dkim.PREPEND_RESERVE)

    async def _dkim_sign(self) -> bytes:
        """The signature fields, computed in a thread (RSA costs about a millisecond)."""
        signer, head, body = self.signer, self._signed_head, self._body_hash
        if signer is None or head is None or body is None:
            return b""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(None, signer.sign, head, body)
        except Exception as exc:
            # Never lose a message over its signature: relay it unsigned, and say so.
            log.error("dkim_sign_failed", queue_id=self.queue_id, reason=repr(exc))
            return b""

    async def _headers_too_long(self, head: bytes) -> None:
        """Postfix ``header_size_limit``: the header block is kept up to the limit and the
        excess is discarded, up to the blank line that starts the body."""
        cut = head[:HEADER_SIZE_LIMIT]
        probe = await self._rewrite(cut)
        if probe.body_start < len(cut):
            # A line that is no header ended the block within the limit: nothing to discard.
            await self._headers_done(head)
            return
        self._collecting = False
        self._header = bytearray()
        kept = cut if cut.endswith(b"\r\n") else cut + b"\r\n"
        await self._emit(await self._rewrite(kept + b"\r\n"), b"")
        self._discarding = True
        self._window = b""
        rest = self._skip_to_body(head[HEADER_SIZE_LIMIT:])
        if rest:
            await self._body(rest)

    def _skip_to_body(self, data: bytes) -> bytes:
        window = self._window + data
        at = window.find(_BLANK)
        if at < 0:
            self._window = window[-3:]
            return b""
        self._discarding = False
        self._window = b""
        return window[at + len(_BLANK) :]

    async def _rewrite(self, head: bytes) -> Rewritten:
        def work() -> Rewritten:
            return rewrite_message(
                head,
                masquerade_domains=self.masquerade,
                received=self.received,
                hostname=self.settings.hostname,
                queue_id=self.queue_id,
                now=self.now,
            )

        if len(head) <= _INLINE_REWRITE:
            return work()
        return await asyncio.get_running_loop().run_in_executor(None, work)

    async def finish(self, *, claimed: bool = False) -> Accepted:
        """Make the entry durable (in ``active/`` when ``claimed``: see ``EntryWriter.commit``);
        raise ``SMTPReply`` with the reply for the client."""
        if self.too_big:
            raise SMTPReply(*TOO_BIG)
        await self._normalised(self.normalizer.end())
        if self._collecting:
            # The message ended inside its header block (no body).
            await self._headers_done(bytes(self._header))
        if self.hops > HOPCOUNT_LIMIT:
            await self.writer.abort()
            raise SMTPReply(*TOO_MANY_HOPS)
        # Postfix downgrades an all-ASCII message sent with SMTPUTF8 (RFC 6531 3.4).
        smtputf8 = self.utf8_envelope or self.utf8_headers
        prepend = await self._dkim_sign()
        if prepend and not self.writer.set_prepend(prepend):
            log.warning("dkim_signature_too_large", queue_id=self.queue_id, size=len(prepend))
            prepend = b""
        self._prepend = prepend
        await self.writer.commit(smtputf8=smtputf8, eightbit=self.eightbit, claimed=claimed)
        return self.accepted()

    def accepted(self) -> Accepted:
        """The entry ``finish`` made durable (also when its caller was cancelled meanwhile:
        ``published``)."""
        payload = self.writer.payload
        if self._prepend and payload is not None:
            payload = self._prepend + payload
        return Accepted(self.envelope, payload)

    @property
    def published(self) -> bool:
        return self.writer.published

    async def abort(self) -> None:
        await self.writer.abort()
