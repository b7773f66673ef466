"""One exception hierarchy; errors that reach an SMTP client carry their reply."""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DeliveryError",
    "RelayError",
    "SMTPReply",
    "SpoolError",
    "SpoolFullError",
    "SpoolWriteError",
]


class RelayError(Exception):
    """Base class for pyrelay errors."""


class ConfigError(RelayError):
    """Invalid configuration; the message is one line naming the variable."""


class SMTPReply(RelayError):
    """An error that maps to exactly one SMTP reply line."""

    def __init__(self, code: int, status: str, text: str, /) -> None:
        self.code = code
        self.status = status
        self.text = text
        super().__init__(self.reply)

    @property
    def reply(self) -> str:
        return f"{self.code} {self.status} {self.text}"


class SpoolError(SMTPReply):
    """The queue file could not be written; the client must retry later."""

    def __init__(self, text: str = "Error: queue file write error", /) -> None:
        super().__init__(451, "4.3.0", text)


class SpoolWriteError(SpoolError):
    """Any write failure other than a full disk."""


class SpoolFullError(SpoolError):
    """No space left (ENOSPC / EDQUOT)."""

    def __init__(self) -> None:
        SMTPReply.__init__(self, 452, "4.3.1", "Insufficient system storage")


class DeliveryError(RelayError):
    """An upstream step failed for every pending recipient of a message: the message is
    deferred (a 5xx for one recipient is a per-recipient result, never this)."""

    def __init__(self, status: str, text: str, /, *, kind: str = "other") -> None:
        self.status = status
        self.text = text
        self.kind = kind
        super().__init__(text)
