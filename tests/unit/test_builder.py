"""The graph builder (deployments/app.py): it owns the deployment defaults, callers override them."""

from __future__ import annotations

from typing import Any

import pytest
from ray.serve.deployment import Application, Deployment
from ray.serve.schema import DeploymentSchema

from deployments.app import CORES, DEFAULT_OPTIONS, KNOWN_OPTIONS, bind_graph, deployment_options
from deployments.classifier import ImageClassifier
from deployments.ingress import USAGE_DRAIN_TIMEOUT_S, Ingress
from deployments.rate_limiter import RateLimiter
from deployments.text_to_image import TextToImage
from lib.settings import AppSettings


def bound(app: Application) -> dict[str, Deployment]:
    """Every deployment of the graph by name (the ingress binds the three others)."""
    ingress = app._bound_deployment
    text_to_image, classifier = ingress.init_args
    limiter = ingress.init_kwargs["rate_limiter"]
    children = [text_to_image, classifier, limiter]
    return {d.name: d for d in [ingress, *(child._bound_deployment for child in children)]}


@pytest.fixture
def settings() -> AppSettings:
    return AppSettings.from_args({}, env={})


def test_every_deployment_gets_its_defaults(settings: AppSettings) -> None:
    deployments = bound(bind_graph(settings))
    assert set(deployments) == set(DEFAULT_OPTIONS)
    for name, deployment in deployments.items():
        defaults = DEFAULT_OPTIONS[name]
        assert deployment.ray_actor_options == defaults["ray_actor_options"]
        assert deployment.max_ongoing_requests == defaults["max_ongoing_requests"]
    assert deployments["Ingress"].ray_actor_options == {"num_cpus": 0.1}
    assert deployments["TextToImage"].ray_actor_options == {"num_cpus": 1}
    assert deployments["ImageClassifier"].ray_actor_options == {"num_cpus": 0.4}
    autoscaling = deployments["ImageClassifier"]._deployment_config.autoscaling_config
    assert autoscaling is not None
    assert (autoscaling.min_replicas, autoscaling.max_replicas) == (1, CORES)
    assert deployments["RateLimiter"].ray_actor_options == {"num_cpus": 0.1}
    ingress_config = deployments["Ingress"]._deployment_config
    assert ingress_config.graceful_shutdown_timeout_s == 30.0
    # The usage drain in Ingress.__del__ fits in the graceful stop, with room for the requests.
    assert ingress_config.graceful_shutdown_timeout_s > USAGE_DRAIN_TIMEOUT_S


def test_caller_options_override_the_defaults_option_by_option(settings: AppSettings) -> None:
    options: dict[str, dict[str, Any]] = {
        "TextToImage": {"num_replicas": 2, "max_ongoing_requests": 1},
        "Ingress": {"ray_actor_options": {"num_cpus": 0.25}},
    }
    deployments = bound(bind_graph(settings, options))
    text_to_image = deployments["TextToImage"]
    assert (text_to_image.num_replicas, text_to_image.max_ongoing_requests) == (2, 1)
    assert text_to_image.ray_actor_options == {"num_cpus": 1}  # not overridden: the default stays
    ingress = deployments["Ingress"]
    assert ingress.ray_actor_options == {"num_cpus": 0.25}
    assert ingress.max_ongoing_requests == DEFAULT_OPTIONS["Ingress"]["max_ongoing_requests"]


def test_overrides_never_change_the_defaults(settings: AppSettings) -> None:
    options = deployment_options("Ingress")
    options["ray_actor_options"]["num_cpus"] = 99
    bind_graph(settings, {"Ingress": {"ray_actor_options": {"num_cpus": 2}}})
    assert DEFAULT_OPTIONS["Ingress"]["ray_actor_options"] == {"num_cpus": 0.1}
    assert deployment_options("Ingress", {"max_ongoing_requests": 7})["max_ongoing_requests"] == 7


def test_deployment_classes_carry_no_defaults_of_their_own() -> None:
    """The decorators are bare: the builder is the one place for defaults (RateLimiter's single
    replica is what the deployment is, not a default)."""
    for deployment in (Ingress, TextToImage, ImageClassifier, RateLimiter):
        configured = deployment._deployment_config.user_configured_option_names
        expected = {"num_replicas"} if deployment is RateLimiter else set()
        assert configured == expected, deployment.name
    assert RateLimiter.num_replicas == 1


def test_known_options_are_serve_deployment_options() -> None:
    serve_options = set(DeploymentSchema.model_fields)
    for name, known in KNOWN_OPTIONS.items():
        assert known <= serve_options, name
        assert set(DEFAULT_OPTIONS[name]) <= known, name
    # More than one limiter would split the counters: no replica options for it.
    assert not KNOWN_OPTIONS["RateLimiter"] & {"num_replicas", "autoscaling_config"}


def test_a_fixed_replica_count_replaces_the_default_autoscaling(settings: AppSettings) -> None:
    fixed = bound(bind_graph(settings, {"ImageClassifier": {"num_replicas": 2}}))["ImageClassifier"]
    assert fixed.num_replicas == 2 and fixed._deployment_config.autoscaling_config is None
    assert "autoscaling_config" not in deployment_options("ImageClassifier", {"num_replicas": 2})
    scaled = deployment_options("ImageClassifier", {"autoscaling_config": {"max_replicas": 3}})
    assert scaled["autoscaling_config"] == {"max_replicas": 3}
