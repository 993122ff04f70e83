"""``build_app``: the entry point named by serve_config.yaml (``deployments.app:build_app``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ray.serve import Application

from deployments.classifier import ImageClassifier
from deployments.ingress import Ingress
from deployments.rate_limiter import RateLimiter
from deployments.text_to_image import TextToImage
from lib.preflight import preflight
from lib.settings import AppSettings

DeploymentOptions = Mapping[str, Mapping[str, Any]]


def build_app(args: dict[str, Any]) -> Application:
    """Validate the app args (and that the secrets are usable), then bind the graph."""
    settings = AppSettings.from_args(args)
    preflight(settings)  # at deploy time, not in every replica, on a bad secret or credential
    return bind_graph(settings)


def bind_graph(settings: AppSettings, options: DeploymentOptions | None = None) -> Application:
    """The graph for validated settings; ``options`` maps a deployment name to Serve options.

    Serve configs override deployment options through their ``deployments:`` list; ``options``
    does the same for Python callers (tests, notebooks) that call ``serve.run`` directly.
    """
    options = options or {}

    def configured(deployment: Any) -> Any:
        return deployment.options(**options.get(deployment.name, {}))

    return configured(Ingress).bind(
        configured(TextToImage).bind(settings),
        configured(ImageClassifier).bind(settings),
        settings=settings,
        # One limiter for the whole application, so a key's limit holds across ingress replicas.
        rate_limiter=configured(RateLimiter).bind(),
    )
