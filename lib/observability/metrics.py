"""sealserve's metrics: their definitions, and the calls that record them.

Every metric is a :class:`MetricSpec` in :data:`METRICS`. The code that counts something calls
one of the functions below (one line at the place it happens); they hand the value to the
installed :class:`Backend`. No backend is installed by default, so ``lib/`` stays testable
without Ray: ``deployments/observability.py`` installs the one that forwards to
``ray.util.metrics`` in every Ray process of the application, and tests install
:class:`MemoryBackend`.

Names: Ray's metrics agent exports a metric named ``x`` as ``ray_x``
(:attr:`MetricSpec.exported`); counters are named with their ``_total`` already.

Labels are bounded: routes are route templates, statuses are HTTP codes, models are catalog ids,
reasons and results are fixed words, and key ids (never key material) only where
:func:`configure` leaves ``per_key`` on (``METRICS_PER_KEY=0`` turns it off for fleets with many
keys; the label is then ``-``).
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, ParamSpec, Protocol, TypeVar

Kind = Literal["counter", "gauge", "histogram"]
P = ParamSpec("P")
R = TypeVar("R")

EXPORT_PREFIX = "ray_"
LATENCY_GENERATION_S = (0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
LATENCY_CLASSIFICATION_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
MODEL_READY_S = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
NO_KEY_LABEL = "-"


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: Kind
    description: str
    tags: tuple[str, ...] = ()
    boundaries: tuple[float, ...] = ()

    @property
    def exported(self) -> str:
        """The name Prometheus sees (Ray's agent prefixes ``ray_``)."""
        return EXPORT_PREFIX + self.name


def _spec(
    name: str, kind: Kind, description: str, *tags: str, boundaries: tuple[float, ...] = ()
) -> MetricSpec:
    return MetricSpec(name, kind, description, tags, boundaries)


# The HTTP side (ingress replicas).
REQUESTS = _spec(
    "sealserve_requests_total", "counter", "HTTP requests answered, by route template and status.",
    "route", "status",
)
AUTH_FAILURES = _spec("sealserve_auth_failures_total", "counter", "Refused credentials, by reason.", "reason")
RATE_LIMITED = _spec("sealserve_rate_limited_total", "counter", "Requests answered 429 for the rate limit.")
OVER_BUDGET = _spec("sealserve_over_budget_total", "counter", "Requests refused for an exhausted budget.")
REQUEST_COST = _spec(
    "sealserve_request_cost_image_steps_total", "counter",
    "Image-steps charged to served requests (the cost of docs/accounts.md), by key id.",
    "key_id",
)
# The model deployments.
GENERATION_SECONDS = _spec(
    "sealserve_generation_seconds", "histogram", "Time of one generate call in a TextToImage replica.",
    "model", boundaries=LATENCY_GENERATION_S,
)
CLASSIFICATION_SECONDS = _spec(
    "sealserve_classification_seconds", "histogram",
    "Time of one classify call (one batch) in an ImageClassifier replica.",
    "model", boundaries=LATENCY_CLASSIFICATION_S,
)
GENERATIONS_RUNNING = _spec(
    "sealserve_generations_running", "gauge", "Generate calls in progress in a replica.", "model"
)
BATCH_SIZE = _spec(
    "sealserve_batch_size", "histogram", "Images per classify call of an ImageClassifier replica.",
    "model", boundaries=BATCH_SIZES,
)
MODEL_READY_SECONDS = _spec(
    "sealserve_model_ready_seconds", "histogram",
    "From a replica asking for a model to the model loaded in it (any fetch included).",
    "deployment", boundaries=MODEL_READY_S,
)
# The node's loader and its sealed-model cache.
LOADER_CACHE_HITS = _spec("sealserve_loader_cache_hits_total", "counter", "Sealed models found in the cache.")
LOADER_CACHE_MISSES = _spec(
    "sealserve_loader_cache_misses_total", "counter", "Sealed models fetched or waited for."
)
LOADER_FETCHES = _spec("sealserve_loader_fetches_total", "counter", "Sealed fetches by result.", "result")
LOADER_FETCHED_BYTES = _spec(
    "sealserve_loader_fetched_bytes_total", "counter", "Sealed bytes downloaded by fetches that succeeded."
)
LOADER_DECRYPTED_BYTES = _spec(
    "sealserve_loader_decrypted_bytes_total", "counter", "Plaintext bytes decrypted and verified."
)
LOADER_KEY_RELEASES = _spec("sealserve_loader_key_releases_total", "counter", "Keys released to this node.")
LOADER_CACHE_BYTES = _spec("sealserve_loader_cache_bytes", "gauge", "Plaintext bytes held in the node cache.")
LOADER_EVICTIONS = _spec(
    "sealserve_loader_evictions_total", "counter", "Models removed from the node cache."
)
# Usage records (ingress replicas).
USAGE_QUEUED = _spec("sealserve_usage_records_queued_total", "counter", "Usage records queued for writing.")
USAGE_WRITTEN = _spec("sealserve_usage_records_written_total", "counter", "Usage records written.")
USAGE_RETRIED = _spec(
    "sealserve_usage_records_retried_total", "counter", "Usage records kept to retry after a failed batch."
)
USAGE_DROPPED = _spec(
    "sealserve_usage_records_dropped_total", "counter", "Usage records lost (queue full, closed, refused)."
)
_USAGE = {
    "queued": USAGE_QUEUED, "written": USAGE_WRITTEN, "retried": USAGE_RETRIED, "dropped": USAGE_DROPPED
}

METRICS: tuple[MetricSpec, ...] = tuple(v for v in list(globals().values()) if isinstance(v, MetricSpec))


class Backend(Protocol):
    def emit(self, spec: MetricSpec, value: float, tags: Mapping[str, str]) -> None:
        """Counter: add ``value`` (> 0); gauge: set it; histogram: observe it."""


class MemoryBackend:
    """Keeps what was emitted, for tests: counters summed, gauges last, histograms as lists."""

    def __init__(self) -> None:
        self.values: dict[tuple[str, tuple[tuple[str, str], ...]], Any] = {}
        self._lock = threading.Lock()

    def emit(self, spec: MetricSpec, value: float, tags: Mapping[str, str]) -> None:
        key = (spec.name, tuple(sorted(tags.items())))
        with self._lock:
            if spec.kind == "counter":
                self.values[key] = self.values.get(key, 0) + value
            elif spec.kind == "gauge":
                self.values[key] = value
            else:
                self.values.setdefault(key, []).append(value)

    def get(self, spec: MetricSpec, **tags: str) -> Any:
        return self.values.get((spec.name, tuple(sorted(tags.items()))))


_backend: Backend | None = None
_per_key = True
_running: dict[str, int] = {}
_running_lock = threading.Lock()


def install(backend: Backend | None, *, per_key: bool = True) -> None:
    """Send every metric of this process to ``backend`` (None: nowhere)."""
    global _backend, _per_key
    _backend, _per_key = backend, per_key


def emit(spec: MetricSpec, value: float = 1.0, **tags: str) -> None:
    """Record one value; never raises (a metric must not fail a request)."""
    backend = _backend
    if backend is None or (spec.kind == "counter" and value <= 0):
        return
    with contextlib.suppress(Exception):  # losing a sample is better than failing the caller
        backend.emit(spec, float(value), tags)


# -- the one-line calls --------------------------------------------------------------------------


def request(route: str, status: int) -> None:
    emit(REQUESTS, route=route, status=str(status))


def auth_failure(reason: str) -> None:
    emit(AUTH_FAILURES, reason=reason)


def rate_limited() -> None:
    emit(RATE_LIMITED)


def over_budget() -> None:
    emit(OVER_BUDGET)


def request_cost(key_id: str, image_steps: float) -> None:
    emit(REQUEST_COST, image_steps, key_id=key_id if _per_key else NO_KEY_LABEL)


def batch_size(model: str, size: int) -> None:
    emit(BATCH_SIZE, size, model=model)


def cache_hit() -> None:
    emit(LOADER_CACHE_HITS)


def cache_miss() -> None:
    emit(LOADER_CACHE_MISSES)


def fetched(downloaded_bytes: int, decrypted_bytes: int, evicted: int, cache_bytes: int) -> None:
    """A sealed fetch succeeded and its plaintext joined the node cache."""
    emit(LOADER_FETCHES, result="ok")
    emit(LOADER_FETCHED_BYTES, downloaded_bytes)
    emit(LOADER_DECRYPTED_BYTES, decrypted_bytes)
    emit(LOADER_EVICTIONS, evicted)
    emit(LOADER_CACHE_BYTES, cache_bytes)


def fetch_failed() -> None:
    emit(LOADER_FETCHES, result="error")


def key_released() -> None:
    emit(LOADER_KEY_RELEASES)


def cache_bytes(total: int) -> None:
    emit(LOADER_CACHE_BYTES, total)


def usage(event: Literal["queued", "written", "retried", "dropped"], records: int = 1) -> None:
    emit(_USAGE[event], records)


# -- decorators for the model deployments' methods ------------------------------------------------


def _model_of(arg: Any) -> str:
    """The model a request (or list of requests) names."""
    first = arg[0] if isinstance(arg, list) and arg else arg
    return str(getattr(first, "model_id", None) or "default")


def _running_generations(model: str, change: int) -> None:
    with _running_lock:
        _running[model] = _running.get(model, 0) + change
        value = _running[model]
    emit(GENERATIONS_RUNNING, value, model=model)


def track_generation(method: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """``TextToImage.generate(self, request)``: running generations and their time, by model."""

    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        model = _model_of(args[1] if len(args) > 1 else kwargs.get("request"))
        _running_generations(model, +1)
        started = time.perf_counter()
        try:
            return await method(*args, **kwargs)
        finally:
            emit(GENERATION_SECONDS, time.perf_counter() - started, model=model)
            _running_generations(model, -1)

    return wrapper


def track_classification(method: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """``ImageClassifier.classify_many(self, requests)`` (or ``classify``): time and batch size."""

    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        arg = args[1] if len(args) > 1 else next(iter(kwargs.values()), None)
        model = _model_of(arg)
        started = time.perf_counter()
        try:
            return await method(*args, **kwargs)
        finally:
            emit(CLASSIFICATION_SECONDS, time.perf_counter() - started, model=model)
            emit(BATCH_SIZE, len(arg) if isinstance(arg, list) else 1, model=model)

    return wrapper


def track_model_ready(deployment: str) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Awaitable[R]]]:
    """A replica's ``get_model(self, model_id)``: the time until the model is loaded in it."""

    def decorate(method: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        @functools.wraps(method)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            started = time.perf_counter()
            result = await method(*args, **kwargs)
            emit(MODEL_READY_SECONDS, time.perf_counter() - started, deployment=deployment)
            return result

        return wrapper

    return decorate
