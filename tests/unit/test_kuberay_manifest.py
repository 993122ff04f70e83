"""deploy/kuberay/rayservice.yaml: a RayService whose serveConfigV2 Ray Serve accepts, shaped as
configs/gpu.yaml, with secrets only from a Kubernetes Secret, the sealed-model cache in memory and
a PodMonitor for the metrics port.

The field names checked are those of KubeRay's ray.io/v1 API (ray-project/kuberay,
ray-operator/apis/ray/v1/rayservice_types.go and raycluster_types.go): a misspelt field would be
dropped by the API server without an error, so the test refuses any field not in those lists.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from lib.settings import AppSettings

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "deploy" / "kuberay" / "rayservice.yaml"
SECRET_NAME = "sealserve-secrets"
SECRET_ENV = {"SECRET_KEY", "API_KEYS", "DATABASE_URL", "RESOURCE_API_EMAIL", "RESOURCE_API_PASSWORD"}
RAYSERVICE_SPEC_FIELDS = {
    "rayClusterDeletionDelaySeconds", "serviceUnhealthySecondThreshold",
    "deploymentUnhealthySecondThreshold", "serveService", "upgradeStrategy", "managedBy",
    "serveConfigV2", "rayClusterConfig", "excludeHeadPodFromServeSvc", "suspend",
}
RAYCLUSTER_SPEC_FIELDS = {
    "upgradeStrategy", "authOptions", "suspend", "managedBy", "autoscalerOptions",
    "headServiceAnnotations", "enableInTreeAutoscaling", "gcsFaultToleranceOptions",
    "historyServerOptions", "networkPolicy", "tlsOptions", "headGroupSpec", "rayVersion",
    "workerGroupSpecs",
}
HEAD_GROUP_FIELDS = {"template", "headService", "enableIngress", "ingressOptions", "resources", "labels",
                     "rayStartParams", "serviceType"}
AUTOSCALER_FIELDS = {"resources", "image", "imagePullPolicy", "securityContext", "idleTimeoutSeconds",
                     "upscalingMode", "version", "env", "envFrom"}
WORKER_GROUP_FIELDS = {"suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds",
                       "priority", "resources", "labels", "rayStartParams", "template", "scaleStrategy",
                       "numOfHosts"}


@pytest.fixture(scope="module")
def documents() -> dict[str, dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    return {d["kind"]: d for d in docs}


@pytest.fixture(scope="module")
def service(documents: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return documents["RayService"]


@pytest.fixture(scope="module")
def serve_config(service: dict[str, Any]) -> dict[str, Any]:
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert isinstance(config, dict)
    return config


def _pods(service: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = service["spec"]["rayClusterConfig"]
    return [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]


def test_the_manifest_holds_a_rayservice_and_a_podmonitor_and_no_secret_object(
    documents: dict[str, dict[str, Any]],
) -> None:
    assert set(documents) == {"RayService", "PodMonitor"}
    assert documents["RayService"]["apiVersion"] == "ray.io/v1"
    assert documents["PodMonitor"]["apiVersion"] == "monitoring.coreos.com/v1"


def test_every_field_is_one_kuberay_knows(service: dict[str, Any]) -> None:
    spec = service["spec"]
    assert set(spec) <= RAYSERVICE_SPEC_FIELDS
    cluster = spec["rayClusterConfig"]
    assert set(cluster) <= RAYCLUSTER_SPEC_FIELDS
    assert set(cluster.get("autoscalerOptions", {})) <= AUTOSCALER_FIELDS
    assert set(cluster["headGroupSpec"]) <= HEAD_GROUP_FIELDS
    for group in cluster["workerGroupSpecs"]:
        assert set(group) <= WORKER_GROUP_FIELDS
        assert {"groupName", "minReplicas", "maxReplicas"} <= set(group)
    for group in _pods(service):
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())  # a map of strings


def test_serve_config_v2_is_valid_for_ray_serve_and_for_the_app(serve_config: dict[str, Any]) -> None:
    schema = ServeDeploySchema.model_validate(serve_config)
    [app] = schema.applications
    assert app.import_path == "deployments.app:build_app"
    settings = AppSettings.from_args(app.args, env={})
    assert settings.environment == "production"
    assert settings.sealed is not None


def test_serve_config_v2_is_the_gpu_config(serve_config: dict[str, Any]) -> None:
    gpu = yaml.safe_load((ROOT / "configs" / "gpu.yaml").read_text())
    [app], [gpu_app] = serve_config["applications"], gpu["applications"]
    assert app["deployments"] == gpu_app["deployments"]  # fractional GPUs and autoscaling, as shipped
    assert serve_config["http_options"] == gpu["http_options"]
    assert {k: v for k, v in app["args"].items() if k != "sealed"} == gpu_app["args"]


def test_head_runs_no_replicas_and_gpu_workers_ask_for_whole_gpus(
    service: dict[str, Any], serve_config: dict[str, Any]
) -> None:
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    [gpu_group] = cluster["workerGroupSpecs"]
    [container] = gpu_group["template"]["spec"]["containers"]
    gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
    assert gpus >= 1
    assert int(container["resources"]["requests"]["nvidia.com/gpu"]) == gpus
    deployments = serve_config["applications"][0]["deployments"]
    shares = [d["ray_actor_options"]["num_gpus"] for d in deployments if "num_gpus" in d["ray_actor_options"]]
    assert shares and all(0 < s < 1 for s in shares)
    assert sum(shares) <= gpus  # one replica of each model deployment fits one worker


def test_secrets_come_from_the_kubernetes_secret_only(service: dict[str, Any]) -> None:
    for group in _pods(service):
        for container in group["template"]["spec"]["containers"]:
            assert {"secretRef": {"name": SECRET_NAME}} in container["envFrom"]
            inline = {e["name"] for e in container.get("env", [])}
            assert not inline & SECRET_ENV
    text = MANIFEST.read_text()
    assert "password:" not in text.lower() and "postgresql://" not in text and "postgresql+" not in text
    assert "SECRET_KEY" not in yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"]


def test_the_model_cache_is_a_memory_backed_empty_dir_where_the_app_puts_it(
    service: dict[str, Any], serve_config: dict[str, Any]
) -> None:
    cache_dir = serve_config["applications"][0]["args"]["sealed"]["cache_dir"]
    [gpu_group] = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    pod = gpu_group["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    [container] = pod["containers"]
    [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == cache_dir]
    assert volumes[mount["name"]]["emptyDir"]["medium"] == "Memory"


def test_the_podmonitor_scrapes_the_metrics_port_of_every_pod(
    documents: dict[str, dict[str, Any]], service: dict[str, Any]
) -> None:
    monitor = documents["PodMonitor"]["spec"]
    selector = monitor["selector"]["matchLabels"]
    [endpoint] = monitor["podMetricsEndpoints"]
    for group in _pods(service):
        labels = group["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items()
        port = int(group["rayStartParams"]["metrics-export-port"])
        [container] = group["template"]["spec"]["containers"]
        named = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert named[endpoint["port"]] == port
