"""The listener's certificate (Postfix ``smtpd_tls_cert_file``/``smtpd_tls_key_file``).

Loads the configured PEM files, or a self-signed certificate for ``PYRELAY_HOSTNAME`` that is
generated once and kept in the spool volume (so restarts present the same one), and re-reads
the files when they change (cert-manager and certbot renew them in place) without a restart.

Connections started after a renewal get the new certificate: STARTTLS sessions take the current
context when they are created, and implicit-TLS listeners (``tls://``) swap it in during the
handshake (the SNI callback runs for every ClientHello, with or without a server name).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import ssl
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pyrelay.config import Settings, SmtpdTLSLevel
from pyrelay.errors import ConfigError
from pyrelay.logging import get_logger

log = get_logger("pyrelay.tls")

# Mozilla's "intermediate" profile: TLS 1.2+, forward secrecy, AEAD ciphers only.  TLS 1.3
# suites are OpenSSL's defaults (all AEAD).
CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20"
# Where the generated certificate lives, under PYRELAY_SPOOL_DIR.
SELF_SIGNED = Path("tls") / "selfsigned.pem"
SELF_SIGNED_DAYS = 3650
# How often the certificate files are stat()ed for a change, at most (seconds).
RELOAD_CHECK_INTERVAL = 1.0
# `pyrelay health` warns this long before the certificate expires.
EXPIRY_WARNING = datetime.timedelta(days=14)


@dataclass(frozen=True, slots=True)
class CertInfo:
    """What operators need to know about the certificate in use."""

    subject: str
    sha256: str
    not_after: datetime.datetime
    path: Path

    def expires_in(self, now: datetime.datetime | None = None) -> datetime.timedelta:
        return self.not_after - (now or datetime.datetime.now(datetime.UTC))

    def describe(self) -> str:
        return (
            f"subject {self.subject}, sha256 {self.sha256}, "
            f"expires {self.not_after:%Y-%m-%d %H:%M:%S} UTC"
        )


def self_signed_path(settings: Settings) -> Path:
    return settings.spool_dir / SELF_SIGNED


def tls_wanted(settings: Settings) -> bool:
    """True if any listener speaks TLS (STARTTLS offered, or a ``tls://`` listener)."""
    return settings.smtpd_tls != SmtpdTLSLevel.NONE or any(a.tls for a in settings.listen)


def certificate_files(settings: Settings) -> tuple[Path, Path | None, bool]:
    """``(cert file, key file or None, self-signed?)`` the listener uses."""
    if settings.tls_cert_file is not None:
        return settings.tls_cert_file, settings.tls_key_file, False
    return self_signed_path(settings), None, True


def read_cert_info(path: Path) -> CertInfo:
    """Subject, SHA-256 fingerprint and expiry of the first certificate in a PEM file."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    cert = x509.load_pem_x509_certificate(path.read_bytes())
    digest = cert.fingerprint(hashes.SHA256()).hex().upper()
    return CertInfo(
        subject=cert.subject.rfc4514_string(),
        sha256=":".join(digest[i : i + 2] for i in range(0, len(digest), 2)),
        not_after=cert.not_valid_after_utc,
        path=path,
    )


def certificate_info(settings: Settings) -> tuple[CertInfo | None, str]:
    """The listener certificate's details for ``pyrelay config``/``health``, or why not."""
    path, _, self_signed = certificate_files(settings)
    if self_signed and not path.exists():
        return None, f"self-signed, generated at first start in {path}"
    try:
        return read_cert_info(path), ""
    except (OSError, ValueError) as exc:
        return None, f"cannot read {path}: {_reason(exc)}"


def generate_self_signed(path: Path, hostname: str) -> bool:
    """Create ``path`` (private key + certificate for ``hostname``) unless it exists.  Safe
    when several worker processes race: the file appears whole or not at all, and the first
    one wins.  True if this call created it."""
    if path.exists():
        return False
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    # RSA rather than ECDSA: old client TLS stacks (PHPMailer on old PHP) know it.
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=SELF_SIGNED_DAYS))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ) + cert.public_bytes(serialization.Encoding.PEM)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".selfsigned.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # fails if another process got there first
        except FileExistsError:
            return False
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    return True


def _server_context(cert: Path, key: Path | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.verify_mode = ssl.CERT_NONE  # clients do not present certificates to a relay
    ctx.load_cert_chain(str(cert), str(key) if key is not None else None)
    return ctx


def _signature(*paths: Path | None) -> tuple[tuple[int, int, int], ...]:
    out = []
    for path in paths:
        if path is None:
            continue
        st = os.stat(path)
        out.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


class ListenerTLS:
    """The listener's TLS contexts; ``load`` once at start, then ``context()`` per connection."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.cert, self.key, self.self_signed = certificate_files(settings)
        self._current: ssl.SSLContext | None = None
        self._signature: tuple[tuple[int, int, int], ...] = ()
        self._checked = 0.0
        self._failed_signature: tuple[tuple[int, int, int], ...] = ()
        self.info: CertInfo | None = None

    def load(self) -> None:
        """Generate the self-signed certificate if needed, then load; ``ConfigError`` names
        the variable when the files cannot be used."""
        if self.self_signed:
            try:
                if generate_self_signed(self.cert, self.settings.hostname):
                    log.info("tls_certificate_generated", path=str(self.cert))
            except OSError as exc:
                raise ConfigError(
                    f"PYRELAY_TLS_CERT_FILE: not set, and cannot write a self-signed "
                    f"certificate to {self.cert}: {exc.strerror or exc}"
                ) from None
        try:
            self._load()
        except (OSError, ssl.SSLError, ValueError) as exc:
            name = "PYRELAY_TLS_CERT_FILE"
            if self.key is not None and "key" in str(exc).lower():
                name = "PYRELAY_TLS_KEY_FILE"
            raise ConfigError(f"{name}: cannot load {self.cert}: {_reason(exc)}") from None
        assert self.info is not None
        log.info(
            "tls_certificate",
            path=str(self.cert),
            self_signed=self.self_signed,
            subject=self.info.subject,
            sha256=self.info.sha256,
            not_after=f"{self.info.not_after:%Y-%m-%dT%H:%M:%SZ}",
        )

    def _load(self) -> None:
        signature = _signature(self.cert, self.key)
        ctx = _server_context(self.cert, self.key)
        ctx.sni_callback = self._select
        self.info = read_cert_info(self.cert)
        self._current = ctx
        self._signature = signature
        self._checked = time.monotonic()

    def context(self) -> ssl.SSLContext:
        """The current context, re-read first if the files changed (checked at most every
        ``RELOAD_CHECK_INTERVAL``).  A renewal caught half-written (a key that does not match
        the certificate yet) keeps the old context and is tried again at the next check."""
        assert self._current is not None, "load() first"
        now = time.monotonic()
        if now - self._checked >= RELOAD_CHECK_INTERVAL:
            self._checked = now
            self._maybe_reload()
        return self._current

    def _maybe_reload(self) -> None:
        try:
            signature = _signature(self.cert, self.key)
        except OSError as exc:
            self._warn_once((), f"cannot stat: {exc.strerror or exc}")
            return
        if signature == self._signature or signature == self._failed_signature:
            return
        try:
            self._load()
        except (OSError, ssl.SSLError, ValueError) as exc:
            self._warn_once(signature, _reason(exc))
            return
        assert self.info is not None
        log.info(
            "tls_certificate_reloaded",
            path=str(self.cert),
            subject=self.info.subject,
            sha256=self.info.sha256,
            not_after=f"{self.info.not_after:%Y-%m-%dT%H:%M:%SZ}",
        )

    def _warn_once(self, signature: tuple[tuple[int, int, int], ...], reason: str) -> None:
        if signature and signature == self._failed_signature:
            return
        self._failed_signature = signature
        log.warning(
            "tls_certificate_reload_failed",
            path=str(self.cert),
            reason=reason,
            note="still using the previous certificate",
        )

    def _select(self, sslobj: ssl.SSLObject, server_name: str | None, ctx: ssl.SSLContext) -> None:
        # Implicit-TLS listeners were created with the context current at start; hand each
        # handshake the newest one instead.
        current = self.context()
        if ctx is not current:
            sslobj.context = current


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
