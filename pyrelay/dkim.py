"""DKIM signing (RFC 6376, RFC 8463) of messages on their way into the queue.

A message is signed once, in cleanup, so that every attempt sends the same signature.  The body
is never held in memory: ``BodyHash`` canonicalises it (relaxed, and simple for checking an
existing signature) chunk by chunk as it streams into the spool, and ``Signer.sign`` builds the
``DKIM-Signature`` fields from the rewritten header block (kept in memory anyway, at most
``header_size_limit``) and that body hash.  The signature is computed with ``cryptography``
(OpenSSL), off the event loop; tests/test_dkim.py verifies it with dkimpy and with OpenDKIM.

Keys live in ``PYRELAY_DKIM_KEY_DIR`` (default ``<spool>/dkim``), boky/postfix's layout:
``<domain>.private`` (RSA, PEM), and optionally ``<domain>.ed25519.private`` (Ed25519, PEM) for
a second signature with the selector ``<selector>-ed25519``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from pyrelay.domains import DomainError, to_ascii

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa


class _Crypto:
    """``cryptography`` is imported on first use: a relay with no DKIM key never loads it
    (idle memory and start-up time of every worker process)."""

    def __getattr__(self, name: str) -> Any:
        from cryptography import exceptions
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

        loaded = {
            "InvalidSignature": exceptions.InvalidSignature,
            "hashes": hashes,
            "serialization": serialization,
            "ed25519": ed25519,
            "padding": padding,
            "rsa": rsa,
        }
        self.__dict__.update(loaded)
        return loaded[name]


_c = _Crypto()

# RFC 6376 5.4.1 recommended fields; From is signed one time more than present (oversigned) so
# that no From can be added without breaking the signature.
SIGNED_FIELDS = frozenset(
    {
        "from",
        "to",
        "cc",
        "subject",
        "date",
        "message-id",
        "reply-to",
        "mime-version",
        "content-type",
        "content-transfer-encoding",
    }
)
DEFAULT_SELECTOR = "mail"
ED25519_SUFFIX = "-ed25519"
RSA_BITS = 2048
# Room kept in the queue file's envelope for the signature fields (see pyrelay.queuefile).
PREPEND_RESERVE = 4096

_WSP_EOL = re.compile(rb"[ \t]+\r\n")
_WSP = re.compile(rb"[ \t]+")
# Only what changes: a run of two or more, or a tab (a single space stays as it is).
_WSP_RUN = re.compile(rb"[ \t]{2,}|\t")
_FIELD = re.compile(rb"([!-9;-~]+)[ \t]*:")
_SELECTOR = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,62})\Z")
_CRLF = b"\r\n"


class DKIMError(Exception):
    """A key that cannot be used, a selector setting that cannot be parsed."""


# -- selectors --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Selectors:
    """``DKIM_SELECTOR``: ``mail``, or ``default,example.org=sel1,example.com=sel2``."""

    default: str = DEFAULT_SELECTOR
    per_domain: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, text: str) -> Selectors:
        default = DEFAULT_SELECTOR
        per: dict[str, str] = {}
        for item in (p.strip() for p in text.replace(" ", ",").split(",")):
            if not item:
                continue
            domain, eq, sel = item.partition("=")
            if not eq:
                sel, domain = domain, ""
            sel = sel.strip()
            if not _SELECTOR.match(sel):
                raise DKIMError(f"invalid selector {sel!r}")
            if domain:
                try:
                    per[to_ascii(domain.strip())] = sel
                except DomainError as exc:
                    raise DKIMError(f"invalid domain {domain!r}: {exc}") from None
            else:
                default = sel
        return cls(default, tuple(sorted(per.items())))

    def for_domain(self, domain: str) -> str:
        return dict(self.per_domain).get(domain, self.default)


# -- body hash --------------------------------------------------------------------------------


class BodyHash:
    """SHA-256 of a body in relaxed (and simple) canonical form, fed the *wire form* (CRLF,
    dot-stuffed) in chunks of any size.  Memory: one partial line, cut at ``_PARTIAL``."""

    _PARTIAL = 16 * 1024

    def __init__(self) -> None:
        self._relaxed = hashlib.sha256()
        self._simple = hashlib.sha256()
        self._carry = b""
        self._mid = False  # the carry does not start a line (its dot was already handled)
        self._ws = False  # a run of WSP withheld at the end of the relaxed output
        self._r_crlf = 0  # CRLFs withheld at the end of the relaxed output
        self._s_crlf = 0
        self._r_any = False
        self._s_any = False

    def update(self, data: bytes) -> None:
        if not data:
            return
        buf = self._carry + data if self._carry else bytes(data)
        end = buf.rfind(_CRLF)
        if end < 0:
            if len(buf) > self._PARTIAL:
                # A very long line: process all of it but a possible CR of a split CRLF.
                self._process(buf[:-1], complete=False)
                self._carry = buf[-1:]
            else:
                self._carry = buf
            return
        self._carry = buf[end + 2 :]
        self._process(buf[: end + 2], complete=True)

    def _process(self, block: bytes, *, complete: bool) -> None:
        if not self._mid and block.startswith(b"."):
            block = block[1:]
        block = block.replace(b"\n.", b"\n")
        self._mid = not complete
        self._simple_out(block)
        if self._ws:
            block = b" " + block
            self._ws = False
        # The regular expressions cost more than the searches that usually make them moot.
        tab = b"\t" in block
        if tab or b" \r" in block:
            block = _WSP_EOL.sub(_CRLF, block)
        if tab or b"  " in block:
            block = _WSP_RUN.sub(b" ", block)
        if not complete and block.endswith(b" "):
            block = block[:-1]
            self._ws = True
        self._relaxed_out(block)

    def _simple_out(self, block: bytes) -> None:
        stripped = block.rstrip(_CRLF)
        if not stripped:
            self._s_crlf += len(block) // 2
            return
        if self._s_crlf:
            self._simple.update(_CRLF * self._s_crlf)
        self._simple.update(stripped)
        self._s_crlf = (len(block) - len(stripped)) // 2
        self._s_any = True

    def _relaxed_out(self, block: bytes) -> None:
        stripped = block.rstrip(_CRLF)
        if not stripped:
            self._r_crlf += len(block) // 2
            return
        if self._r_crlf:
            self._relaxed.update(_CRLF * self._r_crlf)
        self._relaxed.update(stripped)
        self._r_crlf = (len(block) - len(stripped)) // 2
        self._r_any = True

    def _finish(self) -> None:
        if self._carry:
            carry, self._carry = self._carry, b""
            self._process(carry, complete=False)
        if self._ws:
            # An unterminated last line keeps its trailing space (only WSP before a CRLF is
            # removed), as dkimpy and OpenDKIM canonicalise it.
            self._relaxed_out(b" ")
            self._ws = False

    def digests(self) -> tuple[bytes, bytes]:
        """``(relaxed, simple)`` body hashes, base64 (call once the whole body was fed)."""
        self._finish()
        relaxed = self._relaxed.copy()
        if self._r_any:
            relaxed.update(_CRLF)
        simple = self._simple.copy()
        simple.update(_CRLF)  # RFC 6376 3.4.3: an empty body is one CRLF
        return base64.b64encode(relaxed.digest()), base64.b64encode(simple.digest())


# -- header handling --------------------------------------------------------------------------


def parse_headers(block: bytes) -> list[tuple[bytes, bytes]]:
    """``(name, value)`` pairs of a header block in wire form (``value`` keeps its folding and
    its final CRLF); stops at the blank line or at the first line that is no header field."""
    if block.startswith(b"."):
        block = block[1:]
    block = block.replace(b"\r\n.", b"\r\n")
    fields: list[tuple[bytes, bytes]] = []
    pos = 0
    n = len(block)
    while pos < n:
        nl = block.find(_CRLF, pos)
        line_end = n if nl < 0 else nl + 2
        if line_end - pos == 2:
            break
        if block[pos] in b" \t":
            if not fields:
                break
            name, value = fields[-1]
            fields[-1] = (name, value + block[pos:line_end])
        else:
            m = _FIELD.match(block, pos, line_end)
            if m is None:
                break
            fields.append((m.group(1), block[m.end() : line_end]))
        pos = line_end
    return fields


def _relaxed_header(name: bytes, value: bytes) -> bytes:
    value = _WSP.sub(b" ", value.replace(_CRLF, b"").replace(b"\n", b"")).strip(b" ")
    return name.lower().strip() + b":" + value


def _simple_header(name: bytes, value: bytes) -> bytes:
    return name + b":" + value.removesuffix(_CRLF)


def _select(headers: Sequence[tuple[bytes, bytes]], names: Iterable[bytes]) -> list[int]:
    """RFC 6376 5.4.2: for each name in ``h=``, the last instance not yet used."""
    used: dict[bytes, int] = {}
    out = []
    for name in names:
        i = used.get(name, len(headers))
        while i > 0:
            i -= 1
            if headers[i][0].lower() == name:
                out.append(i)
                break
        used[name] = i
    return out


def _header_hash_input(
    headers: Sequence[tuple[bytes, bytes]],
    names: Sequence[bytes],
    sig_value_without_b: bytes,
    *,
    relaxed: bool,
) -> bytes:
    canon = _relaxed_header if relaxed else _simple_header
    parts = [canon(*headers[i]) + _CRLF for i in _select(headers, names)]
    parts.append(canon(b"DKIM-Signature", sig_value_without_b))
    return b"".join(parts)


_B_TAG = re.compile(rb"(^|;)([ \t\r\n]*b[ \t\r\n]*=)[^;]*")


def _strip_b(value: bytes) -> bytes:
    """The signature field's value with the data of its ``b=`` tag removed (RFC 6376 3.7)."""
    return _B_TAG.sub(rb"\1\2", value, count=1)


def _tags(value: bytes) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    for part in value.split(b";"):
        key, eq, val = part.partition(b"=")
        if eq:
            out[key.strip()] = re.sub(rb"[ \t\r\n]+", b"", val)
    return out


def from_domain(headers: Sequence[tuple[bytes, bytes]]) -> str | None:
    """The domain of the (single) From: address, UTS-46 ASCII form; None if there is none."""
    values = [v for n, v in headers if n.lower() == b"from"]
    if len(values) != 1:
        return None  # RFC 5322 wants exactly one; a message with two is not signed
    text = values[0].decode("utf-8", "replace")
    text = re.sub(r"\([^()]*\)", " ", text)  # comments (not nested)
    angle = re.findall(r"<([^<>]*)>", text)
    addr = angle[-1] if angle else text.strip().split(",")[0]
    local, at, domain = addr.strip().rpartition("@")
    if not at or not local:
        return None
    try:
        return to_ascii(domain.strip().rstrip(">").strip())
    except DomainError:
        return None


# -- keys ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DomainKey:
    domain: str
    selector: str
    key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    path: Path

    @property
    def algorithm(self) -> bytes:
        return (
            b"ed25519-sha256"
            if isinstance(self.key, _c.ed25519.Ed25519PrivateKey)
            else (b"rsa-sha256")
        )

    @property
    def public_b64(self) -> str:
        pub = self.key.public_key()
        if isinstance(pub, _c.ed25519.Ed25519PublicKey):
            raw = pub.public_bytes(_c.serialization.Encoding.Raw, _c.serialization.PublicFormat.Raw)
        else:
            raw = pub.public_bytes(
                _c.serialization.Encoding.DER, _c.serialization.PublicFormat.SubjectPublicKeyInfo
            )
        return base64.b64encode(raw).decode("ascii")

    @property
    def record_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"

    @property
    def record(self) -> str:
        kind = "ed25519" if isinstance(self.key, _c.ed25519.Ed25519PrivateKey) else "rsa"
        return f"v=DKIM1; k={kind}; p={self.public_b64}"

    def zone_line(self) -> str:
        """``<selector>._domainkey.<domain>. IN TXT "…" "…"`` (strings of at most 255)."""
        text = self.record
        parts = [text[i : i + 255] for i in range(0, len(text), 255)]
        return f"{self.record_name}. IN TXT " + " ".join(f'"{p}"' for p in parts)

    def sign_digest(self, data: bytes) -> bytes:
        key = self.key
        if isinstance(key, _c.ed25519.Ed25519PrivateKey):
            return cast("ed25519.Ed25519PrivateKey", key).sign(hashlib.sha256(data).digest())
        rsa_key = cast("rsa.RSAPrivateKey", key)
        return rsa_key.sign(data, _c.padding.PKCS1v15(), _c.hashes.SHA256())

    def verify(self, data: bytes, signature: bytes) -> bool:
        pub = self.key.public_key()
        try:
            if isinstance(pub, _c.ed25519.Ed25519PublicKey):
                cast("ed25519.Ed25519PublicKey", pub).verify(
                    signature, hashlib.sha256(data).digest()
                )
            else:
                cast("rsa.RSAPublicKey", pub).verify(
                    signature, data, _c.padding.PKCS1v15(), _c.hashes.SHA256()
                )
        except _c.InvalidSignature:
            return False
        return True


def load_key(path: Path, domain: str, selector: str) -> DomainKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DKIMError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        key = _c.serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise DKIMError(f"{path}: not an unencrypted PEM private key ({exc})") from None
    if isinstance(key, _c.rsa.RSAPrivateKey):
        if key.key_size < 1024:
            raise DKIMError(f"{path}: RSA key of {key.key_size} bits (at least 1024)")
    elif not isinstance(key, _c.ed25519.Ed25519PrivateKey):
        raise DKIMError(f"{path}: only RSA and Ed25519 keys are supported")
    return DomainKey(domain, selector, key, path)


def key_dir(spool_dir: Path, configured: Path | None) -> Path:
    return configured if configured is not None else spool_dir / "dkim"


def _domain_of_file(name: str) -> tuple[str, bool] | None:
    if name.endswith(".ed25519.private"):
        stem, ed = name[: -len(".ed25519.private")], True
    elif name.endswith(".private"):
        stem, ed = name[: -len(".private")], False
    else:
        return None
    try:
        return to_ascii(stem), ed
    except DomainError:
        return None


def generate_keys(directory: Path, domains: Iterable[str]) -> list[DomainKey]:
    """``DKIM_AUTOGENERATE``: a 2048-bit RSA key for every domain without one (written once,
    mode 0600, never replaced).  Returns the keys made now (selectors are filled in later)."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    made = []
    for domain in domains:
        path = directory / f"{domain}.private"
        if path.exists():
            continue
        key = _c.rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
        pem = key.private_bytes(
            _c.serialization.Encoding.PEM,
            _c.serialization.PrivateFormat.TraditionalOpenSSL,  # opendkim-genkey's format
            _c.serialization.NoEncryption(),
        )
        tmp = directory / f".{domain}.private.{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, pem)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # never replaces a key another process made meanwhile
        except FileExistsError:
            continue
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        made.append(DomainKey(domain, "", key, path))
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return made


# -- signing ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Keys:
    """The keys of one domain (an RSA key and/or an Ed25519 key)."""

    keys: tuple[DomainKey, ...]


@dataclass(slots=True)
class Signer:
    """Every domain's keys, loaded once per process."""

    directory: Path
    selectors: Selectors
    domains: dict[str, Keys] = field(default_factory=dict)
    clock: Callable[[], float] = time.time

    @classmethod
    def load(cls, directory: Path, selectors: Selectors) -> Signer:
        signer = cls(directory, selectors)
        try:
            names = sorted(os.listdir(directory))
        except FileNotFoundError:
            return signer
        except OSError as exc:
            raise DKIMError(f"cannot read {directory}: {exc.strerror or exc}") from None
        found: dict[str, list[DomainKey]] = {}
        for name in names:
            parsed = _domain_of_file(name)
            if parsed is None:
                continue
            domain, ed = parsed
            sel = selectors.for_domain(domain) + (ED25519_SUFFIX if ed else "")
            key = load_key(directory / name, domain, sel)
            found.setdefault(domain, []).append(key)
        for domain, keys in found.items():
            keys.sort(key=lambda k: k.algorithm != b"rsa-sha256")  # RSA first
            signer.domains[domain] = Keys(tuple(keys))
        return signer

    def all_keys(self) -> list[DomainKey]:
        return [k for d in sorted(self.domains) for k in self.domains[d].keys]

    def keys_for(self, domain: str | None) -> Keys | None:
        return self.domains.get(domain) if domain else None

    def sign(self, header_block: bytes, body: BodyHash) -> bytes:
        """The ``DKIM-Signature`` field(s) for a message (wire form, CRLF-terminated), or
        ``b""`` when its From domain has no key or it already carries a valid signature of that
        domain.  CPU-bound: run it in a thread."""
        headers = parse_headers(header_block)
        domain = from_domain(headers)
        keys = self.keys_for(domain)
        if keys is None or domain is None:
            return b""
        relaxed_bh, simple_bh = body.digests()
        if self._already_signed(headers, keys, relaxed_bh, simple_bh):
            return b""
        names = [
            n.lower()
            for n, _ in headers
            if n.lower().decode("ascii") in SIGNED_FIELDS or n.lower().startswith(b"list-")
        ]
        names.append(b"from")
        out = []
        now = int(self.clock())
        for key in keys.keys:
            out.append(self._signature(headers, names, key, now, relaxed_bh))
        return b"".join(out)

    def _signature(
        self,
        headers: Sequence[tuple[bytes, bytes]],
        names: Sequence[bytes],
        key: DomainKey,
        now: int,
        bh: bytes,
    ) -> bytes:
        value = (
            b" v=1; a="
            + key.algorithm
            + b"; c=relaxed/relaxed; d="
            + key.domain.encode()
            + b"; s="
            + key.selector.encode()
            + b";\r\n\tt="
            + str(now).encode()
            + b"; h="
            + _fold_names(names)
            + b";\r\n\tbh="
            + bh
            + b";\r\n\tb="
        )
        data = _header_hash_input(headers, names, value, relaxed=True)
        sig = base64.b64encode(key.sign_digest(data))
        folded = b"\r\n\t".join(sig[i : i + 72] for i in range(0, len(sig), 72))
        return b"DKIM-Signature:" + value + folded + _CRLF

    def _already_signed(
        self,
        headers: Sequence[tuple[bytes, bytes]],
        keys: Keys,
        relaxed_bh: bytes,
        simple_bh: bytes,
    ) -> bool:
        """A signature of this domain, with one of our selectors, that verifies (checked with
        our own public keys: no DNS lookup)."""
        mine = {(k.domain, k.selector): k for k in keys.keys}
        for name, value in headers:
            if name.lower() != b"dkim-signature":
                continue
            tags = _tags(value)
            try:
                d = to_ascii(tags.get(b"d", b"").decode("ascii"))
                s = tags.get(b"s", b"").decode("ascii")
            except (UnicodeDecodeError, DomainError):
                continue
            key = mine.get((d, s))
            if key is None or tags.get(b"a") != key.algorithm or b"l" in tags:
                continue
            canon = tags.get(b"c", b"simple/simple").split(b"/")
            head_relaxed = canon[0] == b"relaxed"
            body_relaxed = len(canon) > 1 and canon[1] == b"relaxed"
            if tags.get(b"bh") != (relaxed_bh if body_relaxed else simple_bh):
                continue
            names = [n.strip().lower() for n in tags.get(b"h", b"").split(b":")]
            if b"from" not in names:
                continue
            data = _header_hash_input(headers, names, _strip_b(value), relaxed=head_relaxed)
            try:
                sig = base64.b64decode(tags.get(b"b", b""), validate=True)
            except ValueError:
                continue
            if key.verify(data, sig):
                return True
        return False


def _fold_names(names: Sequence[bytes]) -> bytes:
    lines: list[bytes] = []
    line = b""
    for name in names:
        if line and len(line) + len(name) > 64:
            lines.append(line)
            line = b""
        line += (b":" if line or lines else b"") + name
    lines.append(line)
    return b"\r\n\t".join(lines)


_SIGNERS: dict[tuple[Path, str], Signer] = {}


def signer_for(directory: Path, selectors: str) -> Signer:
    """The process's ``Signer`` for this key directory and ``DKIM_SELECTOR`` (the keys are
    read at its first use: start-up, see ``prepare``)."""
    signer = _SIGNERS.get((directory, selectors))
    if signer is None:
        signer = Signer.load(directory, Selectors.parse(selectors))
        _SIGNERS[(directory, selectors)] = signer
    return signer


def forget_signers() -> None:
    """Reload keys at the next use (start-up after autogeneration; tests)."""
    _SIGNERS.clear()


def parse_record(txt: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in txt.split(";"):
        key, eq, val = part.partition("=")
        if eq:
            out[key.strip()] = "".join(val.split())
    return out


# -- DNS -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RecordCheck:
    key: DomainKey
    status: str  # ok, missing, different key, error
    detail: str = ""


async def lookup_txt(name: str, timeout: float) -> list[str] | None:
    """The TXT strings at ``name`` (each record's strings joined); None if there is none."""
    import dns.asyncresolver
    import dns.exception
    import dns.resolver

    try:
        answer = await dns.asyncresolver.resolve(name + ".", "TXT", lifetime=timeout)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return None
    except dns.exception.DNSException as exc:
        raise DKIMError(str(exc) or type(exc).__name__) from None
    out = []
    for rdata in answer:
        strings = getattr(rdata, "strings", ())
        out.append(b"".join(strings).decode("ascii", "replace"))
    return out


async def check_record(key: DomainKey, timeout: float = 5.0) -> RecordCheck:
    """Whether DNS publishes this key: ``ok``, ``missing``, ``different key`` or ``error``."""
    try:
        records = await lookup_txt(key.record_name, timeout)
    except DKIMError as exc:
        return RecordCheck(key, "error", f"DNS lookup of {key.record_name} failed: {exc}")
    dkim_records = [r for r in records or () if "p=" in r]
    if not dkim_records:
        return RecordCheck(key, "missing", f"no DKIM record at {key.record_name}")
    for record in dkim_records:
        if parse_record(record).get("p") == key.public_b64:
            return RecordCheck(key, "ok", record)
    return RecordCheck(key, "different key", dkim_records[0])
