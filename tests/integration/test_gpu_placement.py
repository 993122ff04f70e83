"""Fractional GPUs without a GPU: ``configs/gpu.yaml`` on a Ray told this machine has one GPU.

Ray's GPUs are logical resources: ``ray.init(num_gpus=1)`` makes the scheduler place replicas by
their ``num_gpus`` exactly as on a GPU node, and sets ``CUDA_VISIBLE_DEVICES`` for them, while no
CUDA is behind it. So this module shows, on any machine, that

- two 0.5-GPU replicas (one TextToImage, one ImageClassifier) share the one GPU;
- the autoscaler stops at that bound: a load that wants more TextToImage replicas leaves the
  extra ones waiting for a GPU (not RUNNING) while the CPU would have room for them;
- each replica falls back to CPU and says so, in its ``/health`` entry and once in its log.

The options are those of ``configs/gpu.yaml`` (read from the file), passed through
``bind_graph``; ``GPU_YAML_ADJUSTMENTS`` lists the few changed and why.
"""

from __future__ import annotations

import copy
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from tests.serve_harness import (
    ServeInstance,
    background_load,
    deployment_status,
    own_ray,
    replica_states,
    serving_demo_models,
    wait_for,
)

ROOT = Path(__file__).resolve().parents[2]
GPU_YAML = ROOT / "configs" / "gpu.yaml"
LOGICAL_CPUS = 8  # enough that only the GPU bounds the replicas (gpu.yaml asks 1 CPU per model replica)
FALLBACK = "0.5 GPU assigned by Ray (GPU 0, CUDA_VISIBLE_DEVICES=0) but CUDA is not available"


def gpu_yaml() -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The app args and the per-deployment options of configs/gpu.yaml, as written."""
    (application,) = yaml.safe_load(GPU_YAML.read_text())["applications"]
    options = {
        entry["name"]: {k: v for k, v in entry.items() if k != "name"} for entry in application["deployments"]
    }
    return dict(application["args"]), options


def adjusted_options() -> dict[str, dict[str, Any]]:
    """gpu.yaml's options, changed only where this one-GPU, 2-core machine cannot hold them."""
    options = copy.deepcopy(gpu_yaml()[1])
    # gpu.yaml sizes a GPU node for two TextToImage replicas at 0.5 plus the classifier's 0.25
    # (1.25 GPUs). On one GPU that leaves a quarter that only a second classifier could use; at
    # 0.5 the classifier and one TextToImage replica fill the GPU exactly, so the two 0.5-GPU
    # replicas share it and any further replica of either deployment has no GPU left.
    options["ImageClassifier"]["ray_actor_options"]["num_gpus"] = 0.5
    # Two ingress replicas are two more processes starting on 2 cores; one carries this load and
    # nothing here is about the ingress.
    options["Ingress"]["autoscaling_config"]["min_replicas"] = 1
    return options


# Serve's controller reports replicas it cannot place ("taken more than Ns to be scheduled ...
# Resources required for each replica") after 30 s by default; 5 s keeps the module short.
SCHEDULING_REPORT_S = 5


@pytest.fixture(scope="module")
def one_gpu_ray() -> Iterator[None]:
    report_after = {
        "RAY_SERVE_SLOW_STARTUP_WARNING_S": str(SCHEDULING_REPORT_S),
        "RAY_SERVE_SLOW_STARTUP_WARNING_PERIOD_S": str(SCHEDULING_REPORT_S),
    }
    with own_ray(num_cpus=LOGICAL_CPUS, num_gpus=1, env=report_after):
        yield


@pytest.fixture(scope="module")
def api(
    one_gpu_ray: None, demo_models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServeInstance]:
    from deployments.app import KNOWN_OPTIONS

    options = adjusted_options()
    for name, deployment_options in options.items():
        assert set(deployment_options) <= KNOWN_OPTIONS[name], name
    args, _ = gpu_yaml()
    # gpu.yaml's args, with this machine's paths for its /models and the state (the helper's).
    with serving_demo_models(demo_models_dir, tmp_path_factory, args, options) as instance:
        yield instance


def test_the_yaml_is_what_the_test_deploys() -> None:
    """The adjustments are the only departures from configs/gpu.yaml; its fractions are still 0.5 / 0.25."""
    args, written = gpu_yaml()
    assert args["environment"] == "production"
    assert written["TextToImage"]["ray_actor_options"]["num_gpus"] == 0.5
    assert written["ImageClassifier"]["ray_actor_options"]["num_gpus"] == 0.25
    deployed = adjusted_options()
    assert deployed["TextToImage"] == written["TextToImage"]
    classifier_actor = written["ImageClassifier"]["ray_actor_options"]
    assert deployed["ImageClassifier"]["ray_actor_options"] == {**classifier_actor, "num_gpus": 0.5}
    assert deployed["Ingress"]["autoscaling_config"] == {
        **written["Ingress"]["autoscaling_config"], "min_replicas": 1
    }


def gpus_free() -> float:
    import ray

    return float(ray.available_resources().get("GPU", 0.0))


def test_two_half_gpu_replicas_share_the_one_gpu(api: ServeInstance) -> None:
    import ray

    assert ray.cluster_resources().get("GPU") == 1.0
    for deployment in ("TextToImage", "ImageClassifier"):
        assert replica_states(deployment) == {"RUNNING": 1}, deployment
    # Both replicas hold their half: nothing of the GPU is left.
    assert wait_for(gpus_free, lambda free: free == 0.0, timeout=30, what="the GPU fully held") == 0.0


def test_replicas_fall_back_to_cpu_and_health_says_so(api: ServeInstance) -> None:
    health = api.get("/health", headers=api.auth()).json()
    assert health["ready"] is True and health["device"] == "cpu", health
    entries = {entry["deployment"]: entry for entry in health["deployments"]}
    assert set(entries) == {"TextToImage", "ImageClassifier"}
    for entry in entries.values():
        assert entry["device"] == "cpu" and entry["dtype"] == "float32", entry
        # Same GPU id in both: the two replicas share GPU 0.
        assert entry["warning"].startswith(FALLBACK), entry
        assert entry["warning"].endswith("running on CPU (float32)"), entry


def test_each_replica_logs_the_fallback_once(api: ServeInstance) -> None:
    import ray

    # This Ray's own session (not /tmp/ray/session_latest, which another Ray on the machine may
    # have moved); Ray has no public call for it. Replicas that never started have no log.
    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path()) / "serve"
    for deployment in ("TextToImage", "ImageClassifier"):
        files = sorted(logs.glob(f"replica_sealserve_{deployment}_*.log"))
        assert files, f"no replica log of {deployment} in {logs}"
        counts = {f.name: f.read_text(errors="replace").count(FALLBACK) for f in files}
        assert sorted(counts.values()) == [1] * len(files), counts


def test_the_autoscaler_stops_at_the_gpu_bound(api: ServeInstance) -> None:
    import ray

    models = api.get("/v1/models", headers=api.auth()).json()["models"]
    sd_id = next(m["id"] for m in models if m["name"] == "tiny-sd")
    body = {"id": "gpu", "model_id": sd_id, "prompt": "a red square", "width": 256, "height": 256,
            "num_inference_steps": 2, "seed": 1}

    def infer() -> int:
        response = requests.post(api.base_url + "/v1/infer", json=body, headers=api.auth(), timeout=120)
        return response.status_code

    # gpu.yaml: target_ongoing_requests 2 per TextToImage replica, so 6 clients want 3 replicas.
    with background_load(infer, clients=6, max_requests=2_000) as load:
        status = wait_for(
            text_to_image_status,
            lambda s: scheduling_report(s[1]) is not None,
            timeout=120, what="Serve reporting TextToImage replicas it cannot place",
        )
        # Serve's own words: the replicas it added cannot be placed; each needs half a GPU, less
        # than that is free, and the CPU they need is there.
        assert status[0] == "UPSCALING", status
        report = scheduling_report(status[1])
        assert report is not None
        required, available = report
        assert required["GPU"] == 0.5, status
        assert available.get("GPU", 0.0) < 0.5, status
        assert available["CPU"] >= required["CPU"], status
        # Held at the bound: one running, the others not started, the GPU fully held while the
        # CPU would have room for another replica (gpu.yaml asks 1 CPU each).
        until = time.monotonic() + SCHEDULING_REPORT_S
        while True:
            states = replica_states("TextToImage")
            assert states.get("RUNNING") == 1 and states.get("STARTING", 0) >= 1, states
            assert replica_states("ImageClassifier") == {"RUNNING": 1}
            assert gpus_free() == 0.0
            assert ray.available_resources().get("CPU", 0.0) >= 1.0
            if time.monotonic() > until:
                break
            time.sleep(1)
    statuses = load.snapshot()
    assert set(statuses) == {200}, statuses  # the one replica served all of it


def scheduling_report(message: str) -> tuple[dict[str, float], dict[str, float]] | None:
    """(resources each waiting replica requires, resources available) from Serve's report."""
    found = re.search(
        r"to be scheduled\..*Resources required for each replica: (\{.*?\}), "
        r"total resources available: (\{.*?\})",
        message,
        re.DOTALL,
    )
    return (json.loads(found[1]), json.loads(found[2])) if found else None


def text_to_image_status() -> tuple[str, str]:
    return deployment_status("TextToImage")
