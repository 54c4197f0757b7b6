"""The Prometheus scrape configs of deploy/: valid for Prometheus (`promtool check config`, from
Debian's `prometheus` package, where installed), and pointed at the ports the systemd units and
the Kubernetes pods actually serve /metrics on. The dashboard's side is
tests/unit/test_dashboard.py."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.unit.test_deploy_k8s import OVERLAYS, _docs

ROOT = Path(__file__).resolve().parents[2]
SYSTEMD_CONFIG = ROOT / "deploy/systemd/prometheus.yml"
K8S_CONFIG = ROOT / "deploy/k8s/base/prometheus/prometheus.yml"


# Not K8S_CONFIG: Debian builds Prometheus without Kubernetes discovery, so its promtool
# refuses kubernetes_sd_configs; test_k8s_config_finds_every_service_on_its_metrics_port runs
# that config's relabelling instead.
@pytest.mark.parametrize("config", [SYSTEMD_CONFIG], ids=["systemd"])
def test_promtool_accepts_the_config(config: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    result = subprocess.run([promtool, "check", "config", "--syntax-only", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def _env(path: Path) -> dict[str, str]:
    lines = [line for line in path.read_text().splitlines() if line and line[0] != "#"]
    return dict(line.split("=", 1) for line in lines)


def test_systemd_jobs_scrape_the_ports_the_units_serve() -> None:
    jobs = {job["job_name"]: [t for c in job["static_configs"] for t in c["targets"]]
            for job in yaml.safe_load(SYSTEMD_CONFIG.read_text())["scrape_configs"]}
    env = _env(ROOT / "deploy/systemd/fleet.env.example")
    assert jobs["fleet-controller"] == [f"127.0.0.1:{env['FLEET_CONTROLLER_PORT']}"]
    assert jobs["fleet-gateway"] == [f"127.0.0.1:{env['FLEET_GATEWAY_PORT']}"]
    unit = (ROOT / "deploy/systemd/fleet-worker@.service").read_text()
    worker_port = re.search(r"FLEET_WORKER_PORT=(\d+)%i", unit)
    engine_port = re.search(r"FLEET_WORKER_ENGINE_PORT=(\d+)%i", unit)
    assert worker_port and engine_port
    # The example fleet: one worker instance per worker-N.env.example.
    instances = sorted(p.name.split("-")[1].split(".")[0]
                       for p in (ROOT / "deploy/systemd").glob("worker-*.env.example"))
    assert jobs["fleet-worker"] == [f"127.0.0.1:{worker_port[1]}{n}" for n in instances]
    assert jobs["vllm"] == [f"127.0.0.1:{engine_port[1]}{n}" for n in instances]


def _relabel(rules: list[dict[str, Any]], labels: dict[str, str]) -> dict[str, str] | None:
    """Prometheus's keep and replace relabelling (anchored regexes), enough for our config."""
    for rule in rules:
        value = ";".join(labels.get(s, "") for s in rule["source_labels"])
        match = re.fullmatch(rule.get("regex", "(.*)"), value)
        action = rule.get("action", "replace")
        if action == "keep":
            if not match:
                return None
        elif action == "replace":
            if match:
                labels[rule["target_label"]] = match.expand(
                    rule.get("replacement", "$1").replace("$1", r"\1"))
        else:
            raise AssertionError(f"relabel action {action} is not simulated here")
    return labels


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_config_finds_every_service_on_its_metrics_port(overlay: str) -> None:
    (config_map,) = [d for d in _docs(overlay, "ConfigMap")
                     if d["metadata"]["name"] == "fleet-prometheus"]
    config = yaml.safe_load(config_map["data"]["prometheus.yml"])
    assert config_map["data"]["prometheus.yml"] == K8S_CONFIG.read_text()
    (job,) = config["scrape_configs"]
    assert job["kubernetes_sd_configs"][0]["namespaces"]["names"] == [
        config_map["metadata"]["namespace"]]
    found: dict[str, set[str]] = {}
    for workload in [*_docs(overlay, "Deployment"), *_docs(overlay, "StatefulSet")]:
        template = workload["spec"]["template"]
        pod_labels = template["metadata"]["labels"]
        for container in template["spec"]["containers"]:
            for port in container.get("ports", []):
                labels = {"__meta_kubernetes_pod_name": workload["metadata"]["name"] + "-0",
                          "__meta_kubernetes_pod_container_port_name": port["name"]}
                labels.update({"__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", k):
                               v for k, v in pod_labels.items()})
                if (kept := _relabel(job["relabel_configs"], labels)) is not None:
                    found.setdefault(kept["job"], set()).add(
                        f"{workload['metadata']['name']}:{port['containerPort']}")
    statefulsets = [d["metadata"]["name"] for d in _docs(overlay, "StatefulSet")]
    assert found == {
        "fleet-controller": {"fleet-controller:21001"},
        "fleet-gateway": {"fleet-gateway:8000"},
        "fleet-worker": {f"{name}:21002" for name in statefulsets},
        "vllm": {f"{name}:8100" for name in statefulsets},
    }  # and not the web UI, which has no /metrics
