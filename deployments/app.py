"""``build_app``: the entry point named by serve_config.yaml (``deployments.app:build_app``)."""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from deployments.classifier import ImageClassifier
from deployments.ingress import Ingress
from deployments.text_to_image import TextToImage
from lib.sealed_catalog import reader_credentials
from lib.settings import AppSettings, Secrets


def build_app(args: dict[str, Any]) -> Application:
    """Validate the app args (and that the secrets are usable), then bind the graph."""
    settings = AppSettings.from_args(args)
    # Fail at deploy time, not in every replica, on a bad secret or missing credentials.
    Secrets.from_env(settings)
    if settings.sealed is not None:
        reader_credentials(settings.sealed)
    # serve.deployment turns the classes into Deployments; their stubs do not say so.
    return Ingress.bind(  # type: ignore[attr-defined]
        TextToImage.bind(settings),  # type: ignore[attr-defined]
        ImageClassifier.bind(settings),  # type: ignore[attr-defined]
        settings=settings,
    )
