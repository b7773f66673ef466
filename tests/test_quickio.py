"""quickio: the event loop's short file system calls that keep the GIL behave like ``os``'s."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pyrelay import quickio


def test_the_c_library_is_bound_on_linux() -> None:
    # Without it every call silently falls back to os (correct, but the GIL hand-overs return).
    assert quickio._C is not None


def test_create_write_close_unlink_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "entry"
    path.write_bytes(b"an older, longer content that must be truncated")
    fd = quickio.open_new(str(path))
    quickio.write_all(fd, b"new\x00content\r\n")
    assert os.get_inheritable(fd) is False  # O_CLOEXEC, as os.open would make it
    quickio.close(fd)
    assert path.read_bytes() == b"new\x00content\r\n"
    fresh = tmp_path / "fresh"
    quickio.close(quickio.open_new(str(fresh)))
    assert fresh.stat().st_mode & 0o777 == 0o600
    quickio.unlink(str(path))
    assert not path.exists()


def test_errors_are_the_same_os_error_subclasses(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError) as unlinked:
        quickio.unlink(missing)
    assert unlinked.value.filename == missing
    with pytest.raises(FileNotFoundError):
        quickio.open_new(str(tmp_path / "no-such-dir" / "entry"))
    with pytest.raises(IsADirectoryError):
        quickio.open_new(str(tmp_path))
    fd = os.open(tmp_path / "x", os.O_WRONLY | os.O_CREAT)
    os.close(fd)
    with pytest.raises(OSError) as closed:
        quickio.close(fd)
    assert closed.value.errno == 9  # EBADF
    with pytest.raises(OSError) as written:
        quickio.write_all(fd, b"x")
    assert written.value.errno == 9


def test_a_large_write_is_complete(tmp_path: Path) -> None:
    # Only for files: a call that keeps the GIL must not wait for another thread (a pipe's
    # reader could not run), which is why the spool's loop-side files are regular files.
    data = bytes(range(256)) * 4096  # 1 MiB
    fd = quickio.open_new(str(tmp_path / "big"))
    quickio.write_all(fd, data)
    quickio.close(fd)
    assert (tmp_path / "big").read_bytes() == data
