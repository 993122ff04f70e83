"""Every shipped Serve config is valid for Ray Serve and for our app args."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from lib.settings import AppSettings

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = [ROOT / "serve_config.yaml", *sorted((ROOT / "configs").glob("*.yaml"))]
DEPLOYMENTS = {"Ingress", "TextToImage", "ImageClassifier", "RateLimiter"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_is_a_valid_serve_config_with_valid_app_args(path: Path) -> None:
    config: dict[str, Any] = yaml.safe_load(path.read_text())
    schema = ServeDeploySchema.model_validate(config)
    [app] = [a for a in schema.applications if a.import_path == "deployments.app:build_app"]
    AppSettings.from_args(app.args, env={})  # unknown or out-of-range args fail here
    assert {d.name for d in app.deployments} <= DEPLOYMENTS


def test_gpu_config_gives_model_deployments_fractional_gpus_and_autoscaling() -> None:
    config = yaml.safe_load((ROOT / "configs" / "gpu.yaml").read_text())
    deployments = {d["name"]: d for d in config["applications"][0]["deployments"]}
    for name in ("TextToImage", "ImageClassifier"):
        gpus = deployments[name]["ray_actor_options"]["num_gpus"]
        assert 0 < gpus < 1
        autoscaling = deployments[name]["autoscaling_config"]
        assert {"min_replicas", "max_replicas", "target_ongoing_requests"} <= set(autoscaling)
