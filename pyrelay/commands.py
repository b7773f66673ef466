"""Operator commands (``pyrelay config``, ``health``, ``queue`` …)."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    """Add the operator subcommands to the ``pyrelay`` parser."""
    _ = argparse
