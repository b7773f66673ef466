"""Settings from the environment: the variable names and value syntaxes of boky/postfix and Postfix
(DESIGN.md section 2), and one clear line naming the variable for every invalid value."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import pytest

from pyrelay.config import (
    MASK,
    HostPort,
    ListenAddress,
    LogFormat,
    Settings,
    TLSLevel,
    load_settings,
)
from pyrelay.errors import ConfigError

MINIMAL = {"RELAYHOST": "smtp.example.com", "ALLOWED_SENDER_DOMAINS": "example.org"}


@pytest.fixture
def setenv(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """A clean environment holding only the required variables; tests add their own."""
    for name in list(os.environ):
        if name.upper().startswith(
            (
                "RELAYHOST",
                "ALLOW",
                "MASQUERADE",
                "MYNETWORKS",
                "MESSAGE_SIZE",
                "PYRELAY_",
                "POSTFIX_",
            )
        ):
            monkeypatch.delenv(name)
    for name, value in MINIMAL.items():
        monkeypatch.setenv(name, value)
    return monkeypatch


def load() -> Settings:
    return load_settings(_env_file=None)


def config_error(setenv: pytest.MonkeyPatch, **env: str) -> str:
    for name, value in env.items():
        setenv.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        load()
    message = str(info.value)
    assert "\n" not in message
    return message


def test_defaults(setenv: pytest.MonkeyPatch) -> None:
    s = load()
    assert s.relayhost == HostPort("smtp.example.com", 25)
    assert s.tls_level is TLSLevel.SECURE
    assert s.listen == (ListenAddress("0.0.0.0", 25), ListenAddress("0.0.0.0", 587))
    assert s.message_size_limit == 10_240_000
    assert (s.min_backoff, s.max_backoff, s.queue_lifetime) == (300, 4000, 5 * 86400)
    assert ipaddress.ip_network("172.16.0.0/12") in s.mynetworks
    assert s.metrics_listen is None
    assert not s.has_credentials
    assert s.log_format is LogFormat.CONSOLE


@pytest.mark.parametrize(
    ("value", "expected", "implicit_tls"),
    [
        ("smtp.sendgrid.net", ("smtp.sendgrid.net", 25), False),
        ("smtp.sendgrid.net:587", ("smtp.sendgrid.net", 587), False),
        ("[smtp.sendgrid.net]", ("smtp.sendgrid.net", 25), False),
        (
            "[email-smtp.eu-west-1.amazonaws.com]:587",
            ("email-smtp.eu-west-1.amazonaws.com", 587),
            False,
        ),
        ("[smtp.mailgun.org]:465", ("smtp.mailgun.org", 465), True),
        ("192.0.2.7:2525", ("192.0.2.7", 2525), False),
        ("[2001:db8::1]:587", ("2001:db8::1", 587), False),
        ("[::1]", ("::1", 25), False),
        ("  [relay.internal]:25  ", ("relay.internal", 25), False),
    ],
)
def test_relayhost_forms(
    setenv: pytest.MonkeyPatch, value: str, expected: tuple[str, int], implicit_tls: bool
) -> None:
    setenv.setenv("RELAYHOST", value)
    s = load()
    assert s.relayhost == HostPort(*expected)
    assert s.implicit_tls is implicit_tls


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("bad:port:x", "write IPv6 addresses as [addr]:port"),
        ("2001:db8::1", "write IPv6 addresses as [addr]:port"),
        ("smtp.example.com:99999", "port must be 1-65535"),
        ("smtp.example.com:0", "port must be 1-65535"),
        ("smtp.example.com:smtp", "port must be 1-65535"),
        ("[smtp.example.com", "missing ']'"),
        ("[::zz]:25", "bad IPv6 address"),
        ("bad_host!:25", "bad host name"),
        ("", "required but not set"),  # an empty variable means unset
    ],
)
def test_invalid_relayhost_names_the_variable(
    setenv: pytest.MonkeyPatch, value: str, reason: str
) -> None:
    message = config_error(setenv, RELAYHOST=value)
    assert message.startswith("RELAYHOST: ")
    assert reason in message


def test_missing_required_variables(setenv: pytest.MonkeyPatch) -> None:
    setenv.delenv("RELAYHOST")
    with pytest.raises(ConfigError, match=r"^RELAYHOST: required but not set$"):
        load()
    setenv.setenv("RELAYHOST", "smtp.example.com")
    setenv.delenv("ALLOWED_SENDER_DOMAINS")
    with pytest.raises(ConfigError, match=r"^ALLOWED_SENDER_DOMAINS: required"):
        load()
    setenv.setenv("ALLOW_EMPTY_SENDER_DOMAINS", "true")
    assert load().allowed_sender_domains == ()


def test_lists_accept_commas_and_whitespace_and_normalise_domains(
    setenv: pytest.MonkeyPatch,
) -> None:
    setenv.setenv("ALLOWED_SENDER_DOMAINS", " Example.ORG, foo.test\tbar.test,,\nbücher.example. ")
    assert load().allowed_sender_domains == (
        "example.org",
        "foo.test",
        "bar.test",
        "xn--bcher-kva.example",
    )
    assert config_error(setenv, ALLOWED_SENDER_DOMAINS="ok.test bad..domain").startswith(
        "ALLOWED_SENDER_DOMAINS: invalid domain"
    )


@pytest.mark.parametrize("name", ["MASQUERADED_DOMAINS", "MASQUERADE_DOMAINS"])
def test_masquerade_domains_and_its_alias(setenv: pytest.MonkeyPatch, name: str) -> None:
    setenv.setenv(name, "Example.org, !mail.Example.org .corp.test")
    s = load()
    assert s.masquerade_domains == ("example.org", "!mail.example.org", "corp.test")
    assert s.dump()["MASQUERADED_DOMAINS"] == "example.org !mail.example.org corp.test"


def test_masquerade_domains_idna_and_invalid(setenv: pytest.MonkeyPatch) -> None:
    setenv.setenv("MASQUERADED_DOMAINS", "Bücher.example,!münchen.de foo.net.")
    assert load().masquerade_domains == ("xn--bcher-kva.example", "!xn--mnchen-3ya.de", "foo.net")
    for bad in ("exa$mple.com", "a..b", "-bad.com", "!"):
        assert config_error(setenv, MASQUERADED_DOMAINS=f"ok.test {bad}").startswith(
            "MASQUERADED_DOMAINS: "
        ), bad


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("300", 300), ("300s", 300), ("5m", 300), ("2h", 7200), ("5d", 432000), ("1w", 604800)]
    + [("500ms", 0.5), ("1.5m", 90), ("10S", 10), (" 7 m ", 420)],
)
def test_durations(setenv: pytest.MonkeyPatch, value: str, seconds: float) -> None:
    setenv.setenv("PYRELAY_QUEUE_LIFETIME", value)
    assert load().queue_lifetime == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["abc", "5 minutes", "-5s", "5y"])  # "" means unset
def test_invalid_duration_names_the_variable(setenv: pytest.MonkeyPatch, value: str) -> None:
    message = config_error(setenv, PYRELAY_MIN_BACKOFF=value)
    assert message.startswith("PYRELAY_MIN_BACKOFF: ")


def test_min_backoff_must_not_exceed_max(setenv: pytest.MonkeyPatch) -> None:
    message = config_error(setenv, PYRELAY_MIN_BACKOFF="1h", PYRELAY_MAX_BACKOFF="5m")
    assert message == "PYRELAY_MIN_BACKOFF: must not exceed PYRELAY_MAX_BACKOFF"


@pytest.mark.parametrize(
    ("name", "value", "level"),
    [
        ("RELAYHOST_TLS_LEVEL", "may", TLSLevel.MAY),
        ("RELAYHOST_TLS_LEVEL", " Encrypt ", TLSLevel.ENCRYPT),
        ("RELAYHOST_TLS_LEVEL", "VERIFY", TLSLevel.VERIFY),
        ("RELAYHOST_TLS_LEVEL", "none", TLSLevel.NONE),
        ("POSTFIX_smtp_tls_security_level", "may", TLSLevel.MAY),  # boky's pass-through name
    ],
)
def test_tls_level_and_its_postfix_alias(
    setenv: pytest.MonkeyPatch, name: str, value: str, level: TLSLevel
) -> None:
    setenv.setenv(name, value)
    s = load()
    assert s.tls_level is level
    assert s.dump()["RELAYHOST_TLS_LEVEL"] == level.value


def test_tls_level_properties() -> None:
    assert [lvl.requires_tls for lvl in TLSLevel] == [False, False, True, True, True]
    assert [lvl.verifies for lvl in TLSLevel] == [False, False, False, True, True]


def test_invalid_tls_level(setenv: pytest.MonkeyPatch) -> None:
    assert config_error(setenv, RELAYHOST_TLS_LEVEL="dane").startswith("RELAYHOST_TLS_LEVEL: ")


@pytest.mark.parametrize("name", ["MYNETWORKS", "POSTFIX_mynetworks"])
def test_mynetworks(setenv: pytest.MonkeyPatch, name: str) -> None:
    # Postfix writes IPv6 networks in brackets; a host address with host bits set is accepted.
    setenv.setenv(name, "10.1.2.3/8, [fd00::]/8 192.168.1.5")
    assert load().mynetworks == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("fd00::/8"),
        ipaddress.ip_network("192.168.1.5/32"),
    )
    message = config_error(setenv, **{name: "10.0.0.0/8 not-a-network"})
    # The error names the variable that was set (an alias included), not the canonical name.
    assert message.startswith(f"{name}: invalid network 'not-a-network'")


@pytest.mark.parametrize(
    ("value", "expected"),
    [("1", True), ("true", True), ("YES", True), ("on", True), ("y", True)]
    + [("0", False), ("false", False), ("No", False), ("off", False), ("", False)],
)
def test_booleans(setenv: pytest.MonkeyPatch, value: str, expected: bool) -> None:
    setenv.setenv("ALLOW_EMPTY_SENDER_DOMAINS", value)
    assert load().allow_empty_sender_domains is expected


def test_invalid_boolean(setenv: pytest.MonkeyPatch) -> None:
    message = config_error(setenv, ALLOW_EMPTY_SENDER_DOMAINS="maybe")
    assert message.startswith("ALLOW_EMPTY_SENDER_DOMAINS: expected a boolean")


def test_listen_addresses(setenv: pytest.MonkeyPatch) -> None:
    setenv.setenv("PYRELAY_LISTEN", "0.0.0.0:25, [::]:587 127.0.0.1")
    assert load().listen == (
        ListenAddress("0.0.0.0", 25),
        ListenAddress("::", 587),
        ListenAddress("127.0.0.1", 25),
    )
    assert str(HostPort("::", 587)) == "[::]:587"
    assert config_error(setenv, PYRELAY_LISTEN=" ").startswith("PYRELAY_LISTEN: ")


@pytest.mark.parametrize(
    ("value", "expected"),
    [("off", None), ("", None), ("127.0.0.1:9100", HostPort("127.0.0.1", 9100))]
    + [("0.0.0.0", HostPort("0.0.0.0", 9025))],
)
def test_metrics_listen(setenv: pytest.MonkeyPatch, value: str, expected: HostPort | None) -> None:
    setenv.setenv("PYRELAY_METRICS_LISTEN", value)
    assert load().metrics_listen == expected


@pytest.mark.parametrize("name", ["MESSAGE_SIZE_LIMIT", "POSTFIX_message_size_limit"])
def test_message_size_limit(setenv: pytest.MonkeyPatch, name: str) -> None:
    setenv.setenv(name, "0")  # Postfix: unlimited
    assert load().message_size_limit == 0
    assert config_error(setenv, **{name: "-1"}).startswith(f"{name}: must be at least 0")


def test_credentials_must_come_in_pairs(setenv: pytest.MonkeyPatch) -> None:
    message = config_error(setenv, RELAYHOST_USERNAME="apikey")
    assert message == "RELAYHOST_PASSWORD: required when the other credential is set"


def test_password_file_is_read_masked_and_exclusive(
    setenv: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    secret = tmp_path / "password"
    secret.write_text("SG.file-secret\n")  # the newline an editor or `echo` adds is not part of it
    setenv.setenv("RELAYHOST_USERNAME", "apikey")
    setenv.setenv("RELAYHOST_PASSWORD_FILE", str(secret))
    s = load()
    assert s.relayhost_password.get_secret_value() == "SG.file-secret"
    assert s.has_credentials
    dumped = s.dump()
    assert dumped["RELAYHOST_PASSWORD"] == MASK
    assert "SG.file-secret" not in repr(dumped) + repr(s) + str(s)

    message = config_error(setenv, RELAYHOST_PASSWORD="inline")
    assert message == (
        "RELAYHOST_PASSWORD_FILE: set RELAYHOST_PASSWORD or RELAYHOST_PASSWORD_FILE, not both"
    )


def test_username_file_and_unreadable_password_file(
    setenv: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "user").write_text("apikey")
    setenv.setenv("RELAYHOST_USERNAME_FILE", str(tmp_path / "user"))
    setenv.setenv("RELAYHOST_PASSWORD", "pw")
    assert load().relayhost_username.get_secret_value() == "apikey"

    setenv.delenv("RELAYHOST_PASSWORD")
    message = config_error(setenv, RELAYHOST_PASSWORD_FILE=str(tmp_path / "missing"))
    assert "RELAYHOST_PASSWORD_FILE: cannot read" in message
    assert "No such file or directory" in message


def test_empty_password_is_not_masked_as_if_set(setenv: pytest.MonkeyPatch) -> None:
    assert load().dump()["RELAYHOST_PASSWORD"] == ""


def test_ca_file_must_exist(setenv: pytest.MonkeyPatch, tmp_path: Path) -> None:
    message = config_error(setenv, RELAYHOST_TLS_CA_FILE=str(tmp_path / "nope.pem"))
    assert message.startswith("RELAYHOST_TLS_CA_FILE: no such file")


def test_dotenv_file(setenv: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("PYRELAY_CONCURRENCY=7\nMASQUERADE_DOMAINS=example.org\n")
    s = load_settings(_env_file=env_file)
    assert s.concurrency == 7
    assert s.masquerade_domains == ("example.org",)
    setenv.setenv("PYRELAY_CONCURRENCY", "3")  # the environment wins over the file
    assert load_settings(_env_file=env_file).concurrency == 3


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("PYRELAY_CONCURRENCY", "0"),
        ("PYRELAY_CONCURRENCY", "many"),
        ("PYRELAY_LOG_LEVEL", "verbose"),
        ("PYRELAY_LOG_FORMAT", "xml"),
        ("PYRELAY_HOSTNAME", "not a hostname"),
        ("PYRELAY_HTTP_LISTEN", "127.0.0.1:http"),
    ],
)
def test_other_invalid_values_name_the_variable(
    setenv: pytest.MonkeyPatch, name: str, value: str
) -> None:
    assert config_error(setenv, **{name: value}).startswith(f"{name}: ")


def test_dump_covers_every_setting_keyed_by_variable_name(setenv: pytest.MonkeyPatch) -> None:
    setenv.setenv("PYRELAY_HOSTNAME", "relay.example.org")
    dumped = load().dump()
    assert dumped["RELAYHOST"] == "smtp.example.com:25"
    assert dumped["PYRELAY_HOSTNAME"] == "relay.example.org"
    assert dumped["ALLOW_EMPTY_SENDER_DOMAINS"] == "no"
    assert dumped["PYRELAY_MAX_BACKOFF"] == "4000s"
    # The secret a _FILE variable loads is shown (masked) under the secret's own name.
    assert "RELAYHOST_PASSWORD_FILE" not in dumped and "RELAYHOST_USERNAME_FILE" not in dumped
    assert all(name.isupper() for name in dumped)


def test_env_file_syntax(setenv: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env_file = tmp_path / "relay.env"
    env_file.write_text(
        "# a comment\n"
        "\n"
        "export PYRELAY_CONCURRENCY=7\n"
        "PYRELAY_HOSTNAME = relay.example.org   # trailing comment\n"
        "RELAYHOST_PASSWORD='p#ss word'\n"
        'RELAYHOST_USERNAME="api\\"key"\n'
        "pyrelay_max_recipients=9\n"  # names are case-insensitive, as in the environment
    )
    s = load_settings(_env_file=env_file)
    assert (s.concurrency, s.hostname, s.max_recipients) == (7, "relay.example.org", 9)
    assert s.relayhost_password.get_secret_value() == "p#ss word"
    assert s.relayhost_username.get_secret_value() == 'api"key'


@pytest.mark.parametrize("line", ["PYRELAY_CONCURRENCY", "A='unclosed", 'B="x" junk', "=1"])
def test_env_file_line_that_is_not_an_assignment(
    setenv: pytest.MonkeyPatch, tmp_path: Path, line: str
) -> None:
    env_file = tmp_path / "relay.env"
    env_file.write_text(f"PYRELAY_CONCURRENCY=3\n{line}\n")
    with pytest.raises(ConfigError) as info:
        load_settings(_env_file=env_file)
    assert str(info.value) == f"PYRELAY_ENV_FILE: {env_file} line 2: expected NAME=value"


def test_overrides_environment_and_defaults(setenv: pytest.MonkeyPatch) -> None:
    setenv.setenv("PYRELAY_CONCURRENCY", "3")
    setenv.setenv("MASQUERADE_DOMAINS", "b.example")
    setenv.setenv("MASQUERADED_DOMAINS", "a.example")  # the first name listed wins
    s = load_settings(_env_file=None, concurrency=5)
    assert s.concurrency == 5 and s.masquerade_domains == ("a.example",)
    # Only what is passed counts with an empty environment (pyrelay demo).
    bare = load_settings(
        _env_file=None, _environ={}, relayhost="smtp.x", allowed_sender_domains="x.org"
    )
    assert bare.masquerade_domains == () and bare.concurrency == 20
    assert s.replace(concurrency=9).concurrency == 9 and s.concurrency == 5


@pytest.mark.parametrize(
    ("name", "value", "reason"),
    [
        ("PYRELAY_WORKERS", "17", "must be at most 16, got 17"),
        ("PYRELAY_WORKERS", "two", "invalid number 'two'"),
        ("PYRELAY_MAX_COMMANDS", "5", "must be at least 10, got 5"),
        ("RELAYHOST_TLS_LEVEL", "paranoid", "use one of none, may, encrypt, verify, secure"),
    ],
)
def test_number_and_choice_errors(
    setenv: pytest.MonkeyPatch, name: str, value: str, reason: str
) -> None:
    message = config_error(setenv, **{name: value})
    assert message.startswith(f"{name}: ") and reason in message, message
