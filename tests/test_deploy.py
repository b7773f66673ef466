"""Issue 14: the Kubernetes manifests (``deploy/kubernetes``), the alerts (``deploy/prometheus``)
and the dashboard (``deploy/grafana``), checked offline: kustomize builds, Kubernetes schemas,
checkov, promtool, and every metric they use exists in a running relay's ``/metrics``.

``kubectl``, ``promtool`` and ``checkov`` come from the machine (``.ci/run`` provides them;
``PROMTOOL`` and ``CHECKOV`` may name the binaries); locally a test skips, saying which is
missing."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from procs import REPO, RelayProc, free_port, relay_env

DEPLOY = REPO / "deploy"
BUILDS = ("base", "overlays/sendgrid", "overlays/ses")
K8S_VERSION = "1.32.0"


def tool(name: str) -> str:
    path = os.environ.get(name.upper()) or shutil.which(name)
    if not path:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is required in CI (.ci/run installs it)")
        pytest.skip(f"{name} not installed (.ci/run provides it; or set {name.upper()})")
    return path


def build(which: str) -> list[dict[str, Any]]:
    kubectl = tool("kubectl")
    out = subprocess.run(
        [kubectl, "kustomize", str(DEPLOY / "kubernetes" / which)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def by_kind(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, (kind, name)
    return found[0]


@pytest.mark.parametrize("which", BUILDS)
def test_kustomize_output_validates_against_kubernetes_schemas(which: str) -> None:
    import kubernetes_validate

    docs = build(which)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == [
        "NetworkPolicy",
        "PodDisruptionBudget",
        "Service",
        "Service",
        "StatefulSet",
    ]
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def _container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    sts = by_kind(docs, "StatefulSet")
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    return dict(container)


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e for e in container.get("env", [])}


def test_statefulset_drains_on_stop_and_is_locked_down() -> None:
    docs = build("base")
    sts = by_kind(docs, "StatefulSet")
    pod = sts["spec"]["template"]["spec"]
    c = _container(docs)
    env = {k: v.get("value") for k, v in _env(c).items()}
    # A PVC per pod for the spool.
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert {"name": claim["metadata"]["name"], "mountPath": "/var/spool/pyrelay"} in c[
        "volumeMounts"
    ]
    # preStop drains, with hand-off to the Service; the grace period covers the drain.
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[:2] == ["pyrelay", "drain"]
    timeout = float(command[command.index("--timeout") + 1])
    grace = float(env["PYRELAY_DRAIN_GRACE"].rstrip("s"))
    assert pod["terminationGracePeriodSeconds"] > timeout + grace + 30
    service = by_kind(docs, "Service", "pyrelay")
    assert env["PYRELAY_HANDOFF_TO"] == f"{service['metadata']['name']}:25"
    # Probes on the HTTP endpoints.
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert env["PYRELAY_HTTP_LISTEN"].endswith(":9025")
    # Unprivileged listen ports, mapped to 25/587 by the Service.
    listen_ports = {int(a.rsplit(":", 1)[1]) for a in env["PYRELAY_LISTEN"].split()}
    assert min(listen_ports) >= 1024
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert {ports["smtp"], ports["submission"]} == listen_ports
    assert {p["port"] for p in service["spec"]["ports"]} == {25, 587}
    # securityContext.
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    # Resources from the measured figures: under the compose file's 128 MB.
    assert c["resources"]["limits"]["memory"] == "128Mi"
    assert c["resources"]["requests"]["memory"]
    # SMTP ingress only from the app's pods and the relay's own.
    policy = by_kind(docs, "NetworkPolicy")
    smtp_rule = next(
        r for r in policy["spec"]["ingress"] if {"port": 2525, "protocol": "TCP"} in r["ports"]
    )
    selectors = [peer["podSelector"]["matchLabels"] for peer in smtp_rule["from"]]
    assert selectors == [{"pyrelay-client": "true"}, {"app.kubernetes.io/name": "pyrelay"}]
    assert policy["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "pyrelay"}
    assert by_kind(docs, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1


def test_ses_credentials_come_from_a_mounted_secret() -> None:
    docs = build("overlays/ses")
    c = _container(docs)
    env = _env(c)
    assert "RELAYHOST_PASSWORD" not in env and "RELAYHOST_USERNAME" not in env
    assert all("valueFrom" not in e for e in env.values())  # no secretKeyRef as env
    path = env["RELAYHOST_PASSWORD_FILE"]["value"]
    mount = next(m for m in c["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
    pod = by_kind(docs, "StatefulSet")["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["secretName"] == "pyrelay-ses"
    assert "smtp.sendgrid.net" in _env(_container(build("overlays/sendgrid")))["RELAYHOST"]["value"]


def test_checkov_passes_with_only_explained_skips(tmp_path: Path) -> None:
    checkov = tool("checkov")
    files = []
    for which in BUILDS:
        path = tmp_path / (which.replace("/", "-") + ".yaml")
        path.write_text(yaml.safe_dump_all(build(which)))
        files += ["-f", str(path)]
    done = subprocess.run(
        [checkov, *files, "--framework", "kubernetes", "--compact", "--quiet", "--skip-download"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE"},
    )
    assert done.returncode == 0, done.stdout[-3000:]
    assert "Failed checks: 0" in done.stdout
    # Every skip carries a reason.
    sts = (DEPLOY / "kubernetes" / "base" / "statefulset.yaml").read_text()
    for skip in re.findall(r"checkov\.io/skip\d+: (.*)", sts):
        check, _, reason = skip.partition("=")
        assert check.startswith("CKV") and len(reason) > 20, skip


def test_promtool_checks_and_unit_tests_the_alerts() -> None:
    promtool = tool("promtool")
    rules = DEPLOY / "prometheus"
    done = subprocess.run(
        [promtool, "check", "rules", "alerts.yaml"], cwd=rules, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    done = subprocess.run(
        [promtool, "test", "rules", "alerts.test.yaml"], cwd=rules, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    alerts = {
        r["alert"]
        for g in yaml.safe_load((rules / "alerts.yaml").read_text())["groups"]
        for r in g["rules"]
    }
    tests = yaml.safe_load((rules / "alerts.test.yaml").read_text())["tests"]
    tested = {a["alertname"] for t in tests for a in t["alert_rule_test"] if a["exp_alerts"]}
    assert alerts == tested  # a firing case for every alert
    assert len(alerts) == 5


def _queries() -> list[str]:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yaml").read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    dashboard = json.loads((DEPLOY / "grafana" / "pyrelay.json").read_text())
    exprs += [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    return exprs


def test_every_metric_used_exists_in_metrics_from_start(tmp_path: Path) -> None:
    http = free_port()
    env = relay_env(
        relay_port=free_port(),
        sink_port=free_port(),
        spool=tmp_path / "spool",
        PYRELAY_HTTP_LISTEN=f"127.0.0.1:{http}",
    )
    relay = RelayProc(env).start()
    try:
        relay.wait_started()
        with urllib.request.urlopen(f"http://127.0.0.1:{http}/metrics", timeout=5) as r:
            text = r.read().decode()
    finally:
        relay.terminate()
        relay.wait(10)
    samples = set()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            samples.add(line.rsplit(" ", 1)[0])
    names = {s.split("{", 1)[0] for s in samples}
    used = 0
    for expr in _queries():
        for name, labels in re.findall(r"\b(pyrelay_[a-z_]+)(\{[^}]*\})?", expr):
            used += 1
            assert name in names, f"{name} (in {expr!r}) is not in /metrics"
            for label in re.findall(r'(\w+="[^"]*")', labels or ""):
                assert any(s.startswith(name + "{") and label in s for s in samples), (
                    f"{name}{{{label}}} is not in /metrics from start-up"
                )
    assert used >= 15
    # `up` is the only non-pyrelay series, and it is Prometheus's own.
    others = {
        n
        for e in _queries()
        for n in re.findall(r"\b([a-z_]+)\{", e)
        if not n.startswith("pyrelay_")
    }
    assert others <= {"up"}
