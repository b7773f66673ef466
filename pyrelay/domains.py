"""Domain names in one form for the whole relay: UTS-46 non-transitional processing (IDNA 2008,
the ``idna`` package), shared by config (``ALLOWED_SENDER_DOMAINS``, ``MASQUERADED_DOMAINS``),
policy (address domains) and rewrite (masquerading).

* ``to_ascii`` gives the comparison key: lowercase A-labels, no root dot.  A U-label and its
  A-label give the same key (``faß.de`` and ``xn--fa-hia.de``); ``faß.de`` is not ``fass.de``
  (Python's ``idna`` codec, IDNA 2003, maps ß to ss).
* ``is_canonical`` says whether a domain as written is already in the form UTS-46 maps it to,
  apart from ASCII letter case.  The listener refuses addresses that are not, so that what the
  policy approved is exactly what goes upstream: ``exa\\u00admple.org`` (soft hyphen) or
  full-width ``ｅｘａｍｐｌｅ.org`` would otherwise be checked as ``example.org`` but relayed as
  written.

ASCII labels follow host-name syntax (letters, digits, ``-``; ``_`` too, which Postfix and
real-world mail domains allow); ``xn--`` labels must be valid A-labels.
"""

from __future__ import annotations

import re
from functools import lru_cache

import idna

__all__ = ["DomainError", "is_canonical", "to_ascii", "try_ascii"]

_ASCII_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
_ASCII_LOWER = {c: c + 32 for c in range(ord("A"), ord("Z") + 1)}


class DomainError(ValueError):
    """Not a usable domain name."""


def _remap(domain: str) -> str:
    """UTS-46 mapping (non-transitional): case folding, NFC, width folding, ignored code points
    such as the soft hyphen dropped, and the ideographic full stops turned into dots."""
    if domain.isascii():
        return domain.lower()
    try:
        return str(idna.uts46_remap(domain, std3_rules=False, transitional=False))
    except (idna.IDNAError, UnicodeError, ValueError) as exc:
        raise DomainError(f"invalid internationalised domain {domain!r}: {exc}") from None


def _label_to_ascii(label: str, domain: str) -> str:
    if label.isascii():
        if not _ASCII_LABEL.fullmatch(label):
            raise DomainError(
                f"invalid domain {domain!r}: bad label {label!r} (labels are 1-63 letters, "
                "digits, '-' or '_', not starting or ending with '-')"
            )
        if label.startswith("xn--"):
            try:
                ulabel = idna.ulabel(label)
                if idna.alabel(ulabel).decode("ascii") != label:
                    raise idna.IDNAError("not the canonical A-label")
            except (idna.IDNAError, UnicodeError, ValueError) as exc:
                raise DomainError(f"invalid A-label {label!r} in {domain!r}: {exc}") from None
        return label
    try:
        return str(idna.encode(label, uts46=True, transitional=False).decode("ascii"))
    except (idna.IDNAError, UnicodeError, ValueError) as exc:
        raise DomainError(f"invalid internationalised domain {domain!r}: {exc}") from None


@lru_cache(maxsize=4096)
def to_ascii(domain: str) -> str:
    """The domain's comparison and transport key: lowercase A-labels without the root dot.

    Raises ``DomainError`` for anything that is not a valid domain name.
    """
    text = domain[:-1] if domain.endswith(".") else domain
    if not text:
        raise DomainError("empty domain")
    labels = _remap(text).split(".")
    result = ".".join(_label_to_ascii(label, domain) for label in labels)
    if len(result) > 253:
        raise DomainError(f"invalid domain {domain!r}: longer than 253 octets")
    return result


def try_ascii(domain: str) -> str | None:
    """``to_ascii`` or ``None``."""
    try:
        return to_ascii(domain)
    except DomainError:
        return None


@lru_cache(maxsize=4096)
def is_canonical(domain: str) -> bool:
    """True if UTS-46 mapping leaves ``domain`` as it is, apart from ASCII letter case (and a
    root dot): then the domain as written names exactly what ``to_ascii`` compared.

    ``BÜCHER.example`` is not canonical (``Ü`` maps to ``ü``), nor is anything with a soft
    hyphen, full-width letters, an ideographic full stop or a non-NFC sequence.
    """
    text = domain[:-1] if domain.endswith(".") else domain
    if text.isascii():
        return True
    try:
        return _remap(text) == text.translate(_ASCII_LOWER)
    except DomainError:
        return False
