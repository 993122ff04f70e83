"""Installs sealserve's metrics and logging rules in a Ray process of the application.

``install(settings)`` is called once at the start of every replica and of the node's loader:

* metrics: :class:`RayBackend` forwards :mod:`lib.observability.metrics` to ``ray.util.metrics``,
  which each node's metrics agent exports in Prometheus format next to Serve's own metrics (on
  the port ``ray start --metrics-export-port`` / ``sealserve serve``'s ``METRICS_PORT`` names);
* logs: the project's loggers (``lib.*``, ``deployments.*``) write through Serve's logger, so
  their lines carry the request id and follow the application's ``logging_config`` (text or
  JSON); a client error raised out of a replica method is logged in one line, not with the
  traceback Serve would print (:class:`lib.observability.logs.ClientErrorFilter`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

import ray
from ray.util import metrics as ray_metrics

from lib.observability import metrics
from lib.observability.logs import ClientErrorFilter, ForwardTo
from lib.observability.metrics import MetricSpec
from lib.settings import AppSettings

SERVE_LOGGER = "ray.serve"
PROJECT_LOGGERS = ("lib", "deployments")


# Ray's agent forgets a gauge series not set again within two export intervals (its TTL), so a
# value that simply stays (the node cache's size) is set again this often.
GAUGE_REFRESH_S = 5.0


class RayBackend:
    """One ``ray.util.metrics`` object per metric, made on first use in this process; gauges are
    set again every ``GAUGE_REFRESH_S`` by a daemon thread, started with the first gauge."""

    def __init__(self, refresh_s: float = GAUGE_REFRESH_S) -> None:
        self._made: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._gauges: dict[tuple[str, tuple[tuple[str, str], ...]], tuple[MetricSpec, float]] = {}
        self._refresh_s = refresh_s
        self._refresher: threading.Thread | None = None

    def _refresh_forever(self) -> None:
        while True:
            time.sleep(self._refresh_s)
            with self._lock:
                current = list(self._gauges.items())
            for (_name, tags), (spec, value) in current:
                with contextlib.suppress(Exception):
                    self._metric(spec).set(value, tags=dict(tags))

    def _metric(self, spec: MetricSpec) -> Any:
        found = self._made.get(spec.name)
        if found is None:
            with self._lock:
                found = self._made.get(spec.name)
                if found is None:
                    found = self._made[spec.name] = _make(spec)
        return found

    def emit(self, spec: MetricSpec, value: float, tags: Mapping[str, str]) -> None:
        metric = self._metric(spec)
        if spec.kind == "counter":
            metric.inc(value, tags=dict(tags))
        elif spec.kind == "gauge":
            metric.set(value, tags=dict(tags))
            with self._lock:
                self._gauges[(spec.name, tuple(sorted(tags.items())))] = (spec, value)
                if self._refresher is None:
                    self._refresher = threading.Thread(
                        target=self._refresh_forever, name="gauges", daemon=True
                    )
                    self._refresher.start()
        else:
            metric.observe(value, tags=dict(tags))


def _make(spec: MetricSpec) -> Any:
    if spec.kind == "counter":
        return ray_metrics.Counter(spec.name, description=spec.description, tag_keys=spec.tags)
    if spec.kind == "gauge":
        return ray_metrics.Gauge(spec.name, description=spec.description, tag_keys=spec.tags)
    return ray_metrics.Histogram(
        spec.name, description=spec.description, boundaries=list(spec.boundaries), tag_keys=spec.tags
    )


_installed = False


def install(settings: AppSettings) -> None:
    """Metrics to Ray, the project's log lines through Serve's logger; once per process.

    Only in a Ray actor (a replica, the loader): a driver or a test that builds a replica class
    in-process keeps its own logging and records no metrics.
    """
    global _installed
    if not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
        return
    metrics.install(RayBackend(), per_key=getattr(settings, "metrics_per_key", True))
    if _installed:
        return
    _installed = True
    serve_logger = logging.getLogger(SERVE_LOGGER)
    serve_logger.addFilter(ClientErrorFilter())
    for name in PROJECT_LOGGERS:
        project = logging.getLogger(name)
        project.addHandler(ForwardTo(serve_logger))
        project.setLevel(logging.INFO)
        project.propagate = False
