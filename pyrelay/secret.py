"""A secret string that does not show itself: ``repr``, ``str`` and log lines see ``**********``.

Settings keep passwords, tokens and the listener's user list in it, so that a dump, a traceback
or a stray log line of a settings object never carries the value; code that needs the value asks
for it by name (``get_secret_value()``)."""

from __future__ import annotations

MASK = "**********"


class SecretStr:
    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get_secret_value(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __str__(self) -> str:
        return MASK if self._value else ""

    def __repr__(self) -> str:
        return f"SecretStr('{self}')"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SecretStr) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)
