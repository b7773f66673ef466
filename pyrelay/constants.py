"""Names the command line and the relay share: exit codes and the pid file.

A leaf module (standard library only), so that ``pyrelay queue ...`` and ``pyrelay health`` can
use them without importing the relay itself.
"""

from __future__ import annotations

from pathlib import Path

# DESIGN.md section 7.
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

# Written by the running relay into its spool; ``pyrelay queue flush`` signals that pid.
PID_FILE = "pyrelay.pid"


def pid_file(spool_dir: Path) -> Path:
    """Where the relay using ``spool_dir`` writes its pid."""
    return spool_dir / PID_FILE
