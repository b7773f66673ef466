"""Issue 9 configuration findings: ``.env`` only from ``PYRELAY_ENV_FILE``, an empty variable
means unset, and the new variables (null sender, bounce sender, per-client limit)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pyrelay.config import ENV_NAMES, load_settings
from pyrelay.errors import ConfigError


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """Only the required variables, and a working directory with a hostile ``.env``."""
    for name in list(os.environ):
        if name.upper().startswith(
            ("RELAYHOST", "ALLOW", "MASQUERADE", "MYNETWORKS", "MESSAGE_SIZE", "PYRELAY_")
        ) or name.upper().startswith("POSTFIX_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("RELAYHOST", "smtp.example.com")
    monkeypatch.setenv("ALLOWED_SENDER_DOMAINS", "example.org")
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / ".env").write_text("RELAYHOST_TLS_LEVEL=none\nALLOW_EMPTY_SENDER_DOMAINS=true\n")
    monkeypatch.chdir(spool)
    return monkeypatch


def test_dotenv_in_working_directory_is_ignored(env: pytest.MonkeyPatch) -> None:
    s = load_settings()
    assert s.tls_level == "secure" and not s.allow_empty_sender_domains


def test_dotenv_only_from_pyrelay_env_file(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "relay.env"
    path.write_text("PYRELAY_CONCURRENCY=7\nMASQUERADE_DOMAINS=example.org\n")
    env.setenv("PYRELAY_ENV_FILE", str(path))
    s = load_settings()
    assert s.concurrency == 7 and s.masquerade_domains == ("example.org",)
    assert s.tls_level == "secure"  # still not the working directory's .env
    assert s.dump()["PYRELAY_ENV_FILE"] == str(path)


def test_missing_pyrelay_env_file_is_an_error(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env.setenv("PYRELAY_ENV_FILE", str(tmp_path / "nope.env"))
    with pytest.raises(ConfigError, match=r"^PYRELAY_ENV_FILE: no such file .*nope\.env$"):
        load_settings()


EMPTY_MEANS_UNSET = [
    "RELAYHOST_TLS_CA_FILE",  # stopped start-up with "no such file ."
    "RELAYHOST_TLS_LEVEL",
    "RELAYHOST_USERNAME_FILE",
    "PYRELAY_MIN_BACKOFF",
    "PYRELAY_METRICS_LISTEN",
    "PYRELAY_HOSTNAME",
    "PYRELAY_ENV_FILE",
    "PYRELAY_BOUNCE_FROM",
    "MESSAGE_SIZE_LIMIT",
]


def test_empty_variable_means_unset(env: pytest.MonkeyPatch) -> None:
    default = load_settings()
    for name in EMPTY_MEANS_UNSET:
        env.setenv(name, "")
    s = load_settings()
    for name in EMPTY_MEANS_UNSET:
        field = next(f for f, names in ENV_NAMES.items() if name in names)
        assert getattr(s, field) == getattr(default, field), name


def test_empty_variable_in_env_file_means_unset(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "relay.env"
    path.write_text("RELAYHOST_TLS_CA_FILE=\nPYRELAY_CONCURRENCY=\nPYRELAY_MAX_RECIPIENTS=7\n")
    env.setenv("PYRELAY_ENV_FILE", str(path))
    s = load_settings()
    assert s.tls_ca_file is None and s.concurrency == 20 and s.max_recipients == 7


def test_new_variables(env: pytest.MonkeyPatch) -> None:
    env.setenv("PYRELAY_HOSTNAME", "relay.example.org")
    s = load_settings()
    assert s.allow_null_sender is False
    assert s.bounce_from == "MAILER-DAEMON@relay.example.org"
    assert (s.max_connections_per_client, s.junk_command_limit) == (50, 100)
    env.setenv("PYRELAY_ALLOW_NULL_SENDER", "true")
    env.setenv("PYRELAY_BOUNCE_FROM", "bounces@example.org")
    env.setenv("PYRELAY_MAX_CONNECTIONS_PER_CLIENT", "0")
    env.setenv("POSTFIX_smtpd_junk_command_limit", "20")
    s = load_settings()
    assert s.allow_null_sender is True and s.bounce_from == "bounces@example.org"
    assert (s.max_connections_per_client, s.junk_command_limit) == (0, 20)


@pytest.mark.parametrize("value", ["no-at-sign", "a b@example.org", "x@bad..domain", "<x@y.org>"])
def test_invalid_bounce_from(env: pytest.MonkeyPatch, value: str) -> None:
    env.setenv("PYRELAY_BOUNCE_FROM", value)
    with pytest.raises(ConfigError, match="^PYRELAY_BOUNCE_FROM: "):
        load_settings()


CONFIGURED = [
    ("fa\u00df.de", "xn--fa-hia.de"),  # not fass.de (IDNA 2003)
    ("xn--fa-hia.de", "xn--fa-hia.de"),  # the operator's own A-label
    ("B\u00fccher.Example", "xn--bcher-kva.example"),
    ("\uff45\uff58\uff41\uff4d\uff50\uff4c\uff45.org", "example.org"),
]


def test_configured_domains_are_uts46(env: pytest.MonkeyPatch) -> None:
    for configured, key in CONFIGURED:
        env.setenv("ALLOWED_SENDER_DOMAINS", configured)
        env.setenv("MASQUERADED_DOMAINS", f"!sub.{configured} {configured}")
        s = load_settings()
        assert s.allowed_sender_domains == (key,), configured
        assert s.masquerade_domains == (f"!sub.{key}", key), configured


def test_invalid_configured_domains(env: pytest.MonkeyPatch) -> None:
    # An invalid A-label, a joiner outside its context, an empty label.
    for configured in ["xn--zz.example", "exam\u200dple.org", "a..b"]:
        env.setenv("ALLOWED_SENDER_DOMAINS", configured)
        with pytest.raises(ConfigError, match="^ALLOWED_SENDER_DOMAINS: "):
            load_settings()
