"""``build_app``: the entry point named by serve_config.yaml (``deployments.app:build_app``).

This module owns every deployment's default Serve options (:data:`DEFAULT_OPTIONS`); the
deployment classes are bare ``@serve.deployment``. ``bind_graph`` applies the defaults, then the
caller's options; a Serve config's ``deployments:`` list overrides both, option by option (an
option given there replaces the default whole: a ``ray_actor_options`` there is the complete
dict). The shipped configs list only what they change (tests/unit/test_configs.py checks that
they name only deployments and options this module knows).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from typing import Any, TypedDict

from ray.serve import Application
from ray.serve.deployment import Deployment

from deployments.classifier import ImageClassifier
from deployments.ingress import Ingress
from deployments.rate_limiter import RateLimiter
from deployments.text_to_image import TextToImage
from lib.preflight import preflight
from lib.settings import AppSettings

DeploymentOptions = Mapping[str, Mapping[str, Any]]


class ServeOptions(TypedDict, total=False):
    """The Serve deployment options this application sets by default."""

    ray_actor_options: dict[str, Any]
    max_ongoing_requests: int
    max_queued_requests: int
    graceful_shutdown_timeout_s: float
    autoscaling_config: dict[str, Any]


# Replicas that can do CPU work at once on this machine (the one that builds the application; a
# cluster sets its own replica counts in its config, as configs/gpu.yaml does).
CORES = max(1, os.cpu_count() or 1)

DEFAULT_OPTIONS: Mapping[str, ServeOptions] = {
    "Ingress": {
        # Reasoned: a replica awaits I/O (auth, the limiter, model handles) and parses JSON; a
        # tenth of a core lets it share a small node with the model replicas.
        "ray_actor_options": {"num_cpus": 0.1},
        # Reasoned: each request mostly waits on a model handle, so one event loop keeps many
        # in flight; 200 bounds the queue of one replica before Serve spreads or refuses load.
        "max_ongoing_requests": 200,
        # Reasoned: __del__ drains queued usage for up to USAGE_DRAIN_TIMEOUT_S (20 s,
        # deployments/ingress.py); the other 10 s cover the drain of in-flight requests before it.
        "graceful_shutdown_timeout_s": 30.0,
    },
    "TextToImage": {
        # Reasoned: a denoising step on CPU keeps a core busy for the whole generation.
        "ray_actor_options": {"num_cpus": 1},
        # Reasoned: one generation per pipeline at a time and at most 2 pipelines per replica
        # (deployments/text_to_image.py); 4 lets a few wait here instead of at the proxy.
        "max_ongoing_requests": 4,
    },
    "ImageClassifier": {
        # Reasoned: batched forward passes of a small classifier; 0.4 of a core lets two replicas
        # sit beside one TextToImage replica (1) and the ingress and limiter (0.1 each) on the
        # 2-core machine the embedded defaults are measured on.
        "ray_actor_options": {"num_cpus": 0.4},
        # Measured (bench/request_path.py, 32 clients): the ingress sends batches, at most
        # CLASSIFY_IN_FLIGHT (2) per ingress replica; handle callers' single classify calls are
        # batched here by 8. 16 made Serve's router back off under single calls (105 -> 26 req/s
        # when it was the cap with 32 clients); 32 leaves room for both.
        "max_ongoing_requests": 32,
        # Reasoned: a bounded queue per caller; past it callers get 503 instead of growing memory.
        "max_queued_requests": 256,
        # One replica when idle, one per core under load (a forward pass holds a core); the
        # bench plots the replicas over time. Ongoing requests are batches, so 1 is "busy".
        "autoscaling_config": {
            "min_replicas": 1,
            "max_replicas": CORES,
            "target_ongoing_requests": 1,
            "upscale_delay_s": 3.0,
            "downscale_delay_s": 20.0,
        },
    },
    "RateLimiter": {
        # Reasoned: a hit is a dictionary update on one event loop.
        "ray_actor_options": {"num_cpus": 0.1},
        # Reasoned: every admitted request of every ingress replica makes one ~1 ms hit; a low
        # cap would turn a burst into back-pressure 503s for all callers.
        "max_ongoing_requests": 2000,
    },
}

# The options a config (or a Python caller) may set per deployment. The RateLimiter has no
# replica options: it must run as exactly one replica (its decorator says so).
_REPLICA_COUNT_OPTIONS = frozenset({"num_replicas", "autoscaling_config"})
_REPLICA_OPTIONS = _REPLICA_COUNT_OPTIONS | {"max_replicas_per_node"}
_COMMON_OPTIONS = frozenset(
    {
        "ray_actor_options",
        "max_ongoing_requests",
        "max_queued_requests",
        "graceful_shutdown_timeout_s",
        "health_check_period_s",
        "health_check_timeout_s",
    }
)
KNOWN_OPTIONS: Mapping[str, frozenset[str]] = {
    "Ingress": _COMMON_OPTIONS | _REPLICA_OPTIONS,
    "TextToImage": _COMMON_OPTIONS | _REPLICA_OPTIONS,
    "ImageClassifier": _COMMON_OPTIONS | _REPLICA_OPTIONS,
    "RateLimiter": _COMMON_OPTIONS,
}


def build_app(args: dict[str, Any]) -> Application:
    """Validate the app args (and that the secrets are usable), then bind the graph."""
    settings = AppSettings.from_args(args)
    preflight(settings)  # at deploy time, not in every replica, on a bad secret or credential
    return bind_graph(settings)


def deployment_options(name: str, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The Serve options of deployment ``name``: its defaults, then ``overrides`` (each replaces
    a default whole). ``num_replicas`` and ``autoscaling_config`` replace each other: a config
    that fixes the replica count turns the default autoscaling off, and the reverse."""
    defaults = copy.deepcopy(dict(DEFAULT_OPTIONS[name]))
    overrides = dict(overrides or {})
    if _REPLICA_COUNT_OPTIONS & overrides.keys():
        for option in _REPLICA_COUNT_OPTIONS:
            defaults.pop(option, None)
    return {**defaults, **overrides}


def bind_graph(settings: AppSettings, options: DeploymentOptions | None = None) -> Application:
    """The graph for validated settings; ``options`` maps a deployment name to Serve options.

    Serve configs override deployment options through their ``deployments:`` list; ``options``
    does the same for Python callers (tests, notebooks) that call ``serve.run`` directly.
    """
    options = options or {}

    def configured(deployment: Any) -> Deployment:
        # Any: mypy sees a decorated class as the class; at run time it is a Deployment.
        assert isinstance(deployment, Deployment)
        return deployment.options(**deployment_options(deployment.name, options.get(deployment.name)))

    return configured(Ingress).bind(
        configured(TextToImage).bind(settings),
        configured(ImageClassifier).bind(settings),
        settings=settings,
        # One limiter for the whole application, so a key's limit holds across ingress replicas.
        rate_limiter=configured(RateLimiter).bind(),
    )
