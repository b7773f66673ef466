"""The container's own commands, run directly (no Docker engine on these machines).

The Dockerfile's ENTRYPOINT with its final-stage ENV must start a working relay; its HEALTHCHECK
command, and the `nc -z` check OpenDLP's compose file already uses, must pass against it; and
`docker stop` (SIGTERM) must end it cleanly.  Ports and spool are swapped for test ones; the
image's non-root user is checked statically in test_packaging.py (the interpreter here lives
under /root, which another uid cannot read).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import smtplib
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import MESSAGE, PASSWORD, USER, Upstream, free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"


def _final_stage() -> list[str]:
    lines = DOCKERFILE.read_text().replace("\\\n", " ").splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("FROM ")]
    return [
        line.strip() for line in lines[starts[-1] :] if line.strip() and not line.startswith("#")
    ]


def _instruction(name: str) -> list[str]:
    return [line[len(name) + 1 :].strip() for line in _final_stage() if line.startswith(name + " ")]


def _image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for text in _instruction("ENV"):
        for key, value in re.findall(r'(\w+)=("[^"]*"|\S+)', text):
            env[key] = value.strip('"')
    return env


def _json_command(text: str) -> list[str]:
    command = text.split("CMD", 1)[1].strip() if "CMD" in text else text
    parsed: list[str] = json.loads(command)
    return parsed


async def _run(cmd: list[str], env: dict[str, str]) -> int:
    proc = await asyncio.create_subprocess_exec(
        *cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    return await proc.wait()


async def test_entrypoint_starts_a_working_relay_that_passes_both_healthchecks(
    upstream: Upstream, ca_file: Path, tmp_path: Path
) -> None:
    entrypoint = _json_command(_instruction("ENTRYPOINT")[0])
    healthcheck = _json_command(_instruction("HEALTHCHECK")[0])
    assert entrypoint == ["pyrelay"] and healthcheck == ["pyrelay", "health"]
    image_env = _image_env()
    assert image_env["PYRELAY_SPOOL_DIR"] == "/var/spool/pyrelay"

    port = free_port()
    spool = tmp_path / "spool"
    env = {k: v for k, v in image_env.items() if k != "PATH"}
    env.update(
        PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
        HOME=str(tmp_path),
        PYRELAY_SPOOL_DIR=str(spool),
        PYRELAY_LISTEN=f"127.0.0.1:{port}",
        RELAYHOST=upstream.relayhost,
        RELAYHOST_USERNAME=USER,
        RELAYHOST_PASSWORD=PASSWORD,
        RELAYHOST_TLS_CA_FILE=str(ca_file),
        ALLOWED_SENDER_DOMAINS="example.org",
        MASQUERADED_DOMAINS="example.org",
    )
    exe = shutil.which(entrypoint[0], path=env["PATH"])
    assert exe, "the console script named by ENTRYPOINT is installed"
    relay = await asyncio.create_subprocess_exec(
        exe, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        health = [
            shutil.which(healthcheck[0], path=env["PATH"]) or healthcheck[0],
            *healthcheck[1:],
        ]
        for _ in range(100):
            if await _run(health, env) == 0:
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("the HEALTHCHECK command never passed")
        nc = shutil.which("nc")
        if nc:  # OpenDLP's existing healthcheck: ["CMD", "nc", "-z", "localhost", "25"]
            assert await _run([nc, "-z", "127.0.0.1", str(port)], env) == 0

        def send() -> None:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
                smtp.sendmail("noreply@app.example.org", ["alice@dest.test"], MESSAGE)

        await asyncio.to_thread(send)
        await wait_until(lambda: len(upstream.state.messages) == 1, what="delivery")
        assert upstream.state.messages[0].mail_from == "noreply@example.org"
    finally:
        relay.send_signal(signal.SIGTERM)  # what `docker stop` sends (STOPSIGNAL SIGTERM)
        code = await asyncio.wait_for(relay.wait(), 15)
        assert relay.stderr is not None
        log = (await relay.stderr.read()).decode()
    assert code == 0, log
    assert "event=stopped" in log
    assert PASSWORD not in log
