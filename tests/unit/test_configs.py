"""Every shipped Serve config is valid for Ray Serve and for our app args, and overrides only
deployments and options that the builder (deployments/app.py) knows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from deployments.app import DEFAULT_OPTIONS, KNOWN_OPTIONS
from lib.settings import AppSettings

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = [ROOT / "serve_config.yaml", *sorted((ROOT / "configs").glob("*.yaml"))]
DEPLOYMENTS = {"Ingress", "TextToImage", "ImageClassifier", "RateLimiter"}
BUILD_APP = "deployments.app:build_app"


def deployment_entries(path: Path) -> list[dict[str, Any]]:
    """The ``deployments:`` entries of the config's sealserve application(s)."""
    config: dict[str, Any] = yaml.safe_load(path.read_text())
    apps = [a for a in config["applications"] if a["import_path"] == BUILD_APP]
    assert apps, f"{path.name} deploys no sealserve application"
    return [dict(entry) for app in apps for entry in app.get("deployments") or []]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_is_a_valid_serve_config_with_valid_app_args(path: Path) -> None:
    config: dict[str, Any] = yaml.safe_load(path.read_text())
    schema = ServeDeploySchema.model_validate(config)
    [app] = [a for a in schema.applications if a.import_path == BUILD_APP]
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


def test_the_builder_knows_exactly_the_deployments_of_the_graph() -> None:
    assert set(KNOWN_OPTIONS) == set(DEFAULT_OPTIONS) == DEPLOYMENTS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_names_only_deployments_and_options_the_builder_knows(path: Path) -> None:
    for entry in deployment_entries(path):
        name = entry.pop("name")
        assert name in KNOWN_OPTIONS, f"{path.name}: unknown deployment {name!r}"
        unknown = set(entry) - KNOWN_OPTIONS[name]
        assert not unknown, f"{path.name}: {name} options the builder does not know: {sorted(unknown)}"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_lists_only_overrides(path: Path) -> None:
    """An entry that repeats the builder's default is noise that drifts when the default moves."""
    for entry in deployment_entries(path):
        name = entry.pop("name")
        assert entry, f"{path.name}: {name} is listed without an option"
        defaults: dict[str, Any] = dict(DEFAULT_OPTIONS.get(name, {}))
        repeated = [option for option, value in entry.items() if defaults.get(option, ...) == value]
        assert not repeated, f"{path.name}: {name} repeats the defaults of {sorted(repeated)}"
        assert entry.get("num_replicas") != 1, f"{path.name}: {name} repeats Serve's default num_replicas"
