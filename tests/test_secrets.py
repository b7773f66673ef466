"""Promise 5 of issue 5: the relay password never appears in a log line, an error text, the
spool, or CLI output, whether AUTH fails or succeeds (also not base64-encoded as sent in AUTH)."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import MESSAGE, PASSWORD, USER, LogCapture, MakeFault, relay_settings, wait_until
from pyrelay.config import load_settings
from pyrelay.errors import ConfigError

SECRET_FORMS = [
    PASSWORD,
    base64.b64encode(PASSWORD.encode()).decode(),  # AUTH LOGIN
    base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode(),  # AUTH PLAIN
]


def assert_no_secret(text: str | bytes, where: str) -> None:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    for form in SECRET_FORMS:
        assert form not in text, f"secret ({form!r}) leaked in {where}"


def scan_everything(logs: LogCapture, caplog: pytest.LogCaptureFixture, spool: Path) -> int:
    """Assert the secret is nowhere; return how many lines/records/files were scanned."""
    scanned = 0
    for line in logs.lines():
        assert_no_secret(line, "a log line")
        scanned += 1
    for record in caplog.records:
        assert_no_secret(record.getMessage(), f"a {record.name} log record")
        assert_no_secret(record.exc_text or "", f"a {record.name} traceback")
        scanned += 1
    for path in spool.rglob("*"):
        if path.is_file():
            assert_no_secret(path.read_bytes(), f"spool file {path.name}")
            scanned += 1
    return scanned


@pytest.mark.parametrize(
    "auth_reply",
    [
        "535 5.7.8 Authentication credentials invalid",
        "235 2.7.0 Authentication successful",
        "454 4.7.0 Temporary authentication failure",
        "534 5.7.9 Authentication mechanism is too weak",
    ],
)
async def test_password_absent_from_logs_errors_and_spool(
    make_relay: Any,
    logs: LogCapture,
    caplog: pytest.LogCaptureFixture,
    fault: MakeFault,
    tmp_path: Path,
    auth_reply: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    up = await fault(auth_reply=auth_reply)
    settings = {"upstream_command_timeout": "2s", "log_level": "debug"}
    async with make_relay(up, **settings) as relay:
        await relay.asend("a@example.org", ["r@dest.test"], MESSAGE)
        await wait_until(
            lambda: logs.has("event=deferred") or logs.has("event=sent"), what="an outcome"
        )
        # Also the scheduler's retry path and the spool's last_error.
        await asyncio.sleep(0.5)
        scanned = scan_everything(logs, caplog, tmp_path / "spool")
    scan_everything(logs, caplog, tmp_path / "spool")
    assert scanned > 5
    # The upstream really was given the password (over TLS), so absence above means something.
    assert up.auth_lines and all(tls for tls, _ in up.auth_lines)
    assert logs.has("event=starting", "relayhost_password=********")
    if auth_reply.startswith("235"):
        assert logs.has("event=sent")
    else:
        assert logs.has("event=deferred", "SASL authentication failed")


async def test_password_absent_when_upstream_drops_during_auth(
    make_relay: Any,
    logs: LogCapture,
    caplog: pytest.LogCaptureFixture,
    fault: MakeFault,
    tmp_path: Path,
) -> None:
    caplog.set_level(logging.DEBUG)
    up = await fault(drop_on={"AUTH"})
    async with make_relay(up, upstream_command_timeout="2s") as relay:
        await relay.asend("a@example.org", ["r@dest.test"], MESSAGE)
        await wait_until(lambda: logs.has("event=deferred"), what="deferral")
        scan_everything(logs, caplog, tmp_path / "spool")
    assert logs.has("event=deferred", "during SASL authentication")


def test_settings_dump_and_repr_mask_the_password(tmp_path: Path, ca_file: Path) -> None:
    settings = relay_settings(tmp_path, None, ca_file)
    dumped = settings.dump()
    assert dumped["RELAYHOST_PASSWORD"] == "********"
    assert_no_secret(repr(dumped), "Settings.dump()")
    assert_no_secret(repr(settings), "repr(Settings)")
    assert_no_secret(str(settings), "str(Settings)")
    assert_no_secret(repr(settings.replace()), "a copy of Settings")


@pytest.mark.parametrize(
    "env",
    [
        {"RELAYHOST_USERNAME": ""},  # password without user name
        {"PYRELAY_MIN_BACKOFF": "soon"},  # an unrelated invalid value
        {"RELAYHOST_TLS_LEVEL": "paranoid"},
        {"RELAYHOST_PASSWORD_FILE": "/etc/hostname"},  # both the secret and its file
    ],
    ids=["no-user", "bad-duration", "bad-tls-level", "both"],
)
def test_config_errors_never_echo_the_password(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    base = {
        "RELAYHOST": "[127.0.0.1]:2525",
        "RELAYHOST_USERNAME": USER,
        "RELAYHOST_PASSWORD": PASSWORD,
        "ALLOWED_SENDER_DOMAINS": "example.org",
        "PYRELAY_SPOOL_DIR": str(tmp_path),
    }
    for key in list(os.environ):
        if key.startswith(("RELAYHOST", "PYRELAY_", "POSTFIX_", "ALLOWED_", "MASQUERADE")):
            monkeypatch.delenv(key)
    for key, value in {**base, **env}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError) as info:
        load_settings(_env_file=None)
    assert_no_secret(str(info.value), "a configuration error")


# -- CLI --------------------------------------------------------------------------------------


async def _cli(env: dict[str, str], *args: str, timeout: float = 30) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pyrelay",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode("utf-8", "replace")


def _cli_env(tmp_path: Path, ca_file: Path, relayhost: str, **extra: str) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "RELAYHOST": relayhost,
        "RELAYHOST_USERNAME": USER,
        "RELAYHOST_PASSWORD": PASSWORD,
        "RELAYHOST_TLS_CA_FILE": str(ca_file),
        "ALLOWED_SENDER_DOMAINS": "example.org",
        "PYRELAY_SPOOL_DIR": str(tmp_path / "spool"),
        "PYRELAY_LISTEN": "127.0.0.1:0",
        "PYRELAY_HOSTNAME": "relay.test",
        **extra,
    }


async def test_cli_output_never_contains_the_password(
    fault: MakeFault, tmp_path: Path, ca_file: Path
) -> None:
    up = await fault(auth_reply="535 5.7.8 Authentication credentials invalid")
    env = _cli_env(tmp_path, ca_file, up.relayhost)
    runs: list[tuple[tuple[str, ...], int, str]] = []
    for args in [
        ("config",),
        ("config", "--json"),
        ("config", "RELAYHOST_PASSWORD"),
        ("check-upstream", "--timeout", "5"),
        ("check-upstream", "--timeout", "5", "--json"),
    ]:
        code, out = await _cli(env, *args)
        runs.append((args, code, out))
        assert_no_secret(out, f"`pyrelay {' '.join(args)}`")
    assert runs[0][1] == 0 and "RELAYHOST_PASSWORD = ********" in runs[0][2]
    assert runs[3][1] == 1 and "535" in runs[3][2]  # the AUTH failure is reported...
    assert up.auth_lines and all(tls for tls, _ in up.auth_lines)  # ...after a real attempt
    up.auth_reply = "235 2.7.0 Authentication successful"
    code, out = await _cli(env, "check-upstream", "--timeout", "5")
    assert code == 0, out
    assert_no_secret(out, "`pyrelay check-upstream` (success)")
    # A configuration error from the CLI.
    code, out = await _cli({**env, "RELAYHOST_USERNAME": ""}, "config")
    assert code == 2
    assert_no_secret(out, "`pyrelay config` with a configuration error")
