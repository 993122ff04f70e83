"""lib/observability: the metric definitions, each one-line call site, and the logging rules.

Metrics go to a :class:`MemoryBackend` here; tests/integration/test_observability.py checks the
same calls through Ray's metrics agent. The log tests use Ray Serve's own formatters (TEXT and
JSON) with :class:`ClientErrorFilter`, as a replica has them.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import Depends, FastAPI, Request
from fastapi.testclient import TestClient

from lib.accounts.auth import Authenticator, Principal
from lib.accounts.gate import Admission
from lib.accounts.rate_limit import RateDecision, RateLimitSpec
from lib.accounts.records import UsageRecord
from lib.accounts.usage import UsageRecorder
from lib.errors import AuthenticationError, BadRequestError, InvalidImageError, RateLimitedError
from lib.http.context import RequestContextMiddleware
from lib.http.errors import install_error_handlers
from lib.http.gate import GateMiddleware, attach_admission
from lib.observability import metrics as m
from lib.observability.logs import ClientErrorFilter, ForwardTo
from lib.retry import RetryPolicy

SECRET = "ss_live_secret_key_material_0123456789abcdef"


@pytest.fixture
def backend() -> Iterator[m.MemoryBackend]:
    memory = m.MemoryBackend()
    m.install(memory)
    yield memory
    m.install(None)


def test_every_metric_is_named_once_with_the_projects_prefix_and_sane_shape() -> None:
    names = [s.name for s in m.METRICS]
    assert len(names) == len(set(names)) == 22
    for spec in m.METRICS:
        assert spec.name.startswith("sealserve_")
        assert spec.exported == "ray_" + spec.name
        assert spec.name.endswith("_total") == (spec.kind == "counter"), spec.name
        if spec.kind == "histogram":
            assert list(spec.boundaries) == sorted(set(spec.boundaries)) and spec.boundaries
        assert "key" not in spec.tags  # key ids only, never key material


def test_nothing_is_recorded_without_a_backend_and_a_failing_backend_never_raises() -> None:
    m.install(None)
    m.request("GET /health", 200)  # no backend: a no-op

    class Broken:
        def emit(self, *_args: Any) -> None:
            raise RuntimeError("exporter down")

    m.install(Broken())
    try:
        m.request("GET /health", 200)
    finally:
        m.install(None)


def test_counters_ignore_non_positive_values(backend: m.MemoryBackend) -> None:
    m.usage("written", 0)
    assert backend.values == {}


def test_request_cost_is_by_key_id_or_one_label_when_switched_off(backend: m.MemoryBackend) -> None:
    m.request_cost("key-1", 8)
    m.request_cost("key-1", 2)
    assert backend.get(m.REQUEST_COST, key_id="key-1") == 10
    m.install(backend, per_key=False)
    m.request_cost("key-2", 3)
    assert backend.get(m.REQUEST_COST, key_id=m.NO_KEY_LABEL) == 3
    assert backend.get(m.REQUEST_COST, key_id="key-2") is None


class _Tokens:
    def verify(self, token: str) -> Any:
        raise AuthenticationError("bad signature")


@pytest.mark.parametrize(
    ("authorization", "reason"),
    [(None, "missing"), ("Basic abc", "missing"), (f"Bearer {SECRET}", "unknown_key"),
     ("Bearer a.b.c", "invalid_token")],
)
def test_auth_failures_are_counted_by_reason(
    backend: m.MemoryBackend, authorization: str | None, reason: str
) -> None:
    authenticator = Authenticator(tokens=_Tokens(), lookup_key=lambda _key: None)
    with pytest.raises(AuthenticationError):
        authenticator.authenticate(authorization)
    assert backend.values == {(m.AUTH_FAILURES.name, (("reason", reason),)): 1}


def test_a_refused_rate_limit_is_counted(backend: m.MemoryBackend) -> None:
    admission = Admission(Principal("k", frozenset({"infer"}), "api_key", RateLimitSpec(1, 60)),
                          RateDecision(False, 1, 0, 60.0, 30.0))
    with pytest.raises(RateLimitedError):
        admission.require("infer")
    assert backend.get(m.RATE_LIMITED) == 1


NO_WAIT = RetryPolicy(attempts=2, base_delay=0.0, max_delay=0.0)


def _record() -> UsageRecord:
    from datetime import datetime, timezone

    return UsageRecord(key_id="k", endpoint="GET /x", status_code=200, latency_ms=1.0,
                       timestamp=datetime(2026, 1, 1, tzinfo=timezone.utc))


def test_usage_records_queued_written_retried_and_dropped(backend: m.MemoryBackend) -> None:
    failures = [2]  # the first batch fails both attempts, then goes back to the queue

    def sink(batch: list[UsageRecord]) -> None:
        if failures[0] > 0:
            failures[0] -= 1
            raise ConnectionError("database down")

    recorder = UsageRecorder(sink, max_batch=3, max_queue=3, flush_interval_s=0.01, retry_policy=NO_WAIT)
    for _ in range(3):
        assert recorder.record(_record())
    assert recorder.flush(timeout_s=30)
    assert recorder.close() == 0
    assert not recorder.record(_record())  # closed: dropped
    assert backend.get(m.USAGE_QUEUED) == 3
    assert backend.get(m.USAGE_RETRIED) == 3
    assert backend.get(m.USAGE_WRITTEN) == 3
    assert backend.get(m.USAGE_DROPPED) == 1


def _gate_app() -> FastAPI:
    api = FastAPI()
    api.add_middleware(RequestContextMiddleware, max_body_bytes=1000)
    api.add_middleware(GateMiddleware, record=lambda _r: None)
    install_error_handlers(api, logging.getLogger("test.observability"))

    async def admitted(request: Request) -> Admission:
        admission = Admission(Principal("key-7", frozenset({"classify"}), "api_key"), None)
        attach_admission(request.scope, admission)
        return admission

    @api.get("/v1/things/{thing}")
    async def thing(thing: str, admission: Admission = Depends(admitted)) -> dict[str, str]:
        if thing == "bad":
            raise InvalidImageError(f"image is not valid base64 (sent with {SECRET})")
        return {"thing": thing}

    return api


def test_requests_are_counted_by_route_template_and_status(backend: m.MemoryBackend) -> None:
    with TestClient(_gate_app()) as client:
        assert client.get("/v1/things/a").status_code == 200
        assert client.get("/v1/things/b").status_code == 200
        assert client.get("/v1/things/bad").status_code == 400
        assert client.get("/nowhere").status_code == 404
    assert backend.get(m.REQUESTS, route="GET /v1/things/{thing}", status="200") == 2
    assert backend.get(m.REQUESTS, route="GET /v1/things/{thing}", status="400") == 1
    assert backend.get(m.REQUESTS, route="GET unmatched", status="404") == 1


def test_a_client_error_is_logged_in_one_line_with_request_and_key_id_and_no_message(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="test.observability"), TestClient(_gate_app()) as client:
        response = client.get("/v1/things/bad", headers={"X-Request-ID": "req-42"})
    assert response.status_code == 400
    lines = [r for r in caplog.records if r.name == "test.observability"]
    assert [r.getMessage() for r in lines] == ["answered 400 invalid_image (request req-42, key key-7)"]
    assert lines[0].exc_info is None and SECRET not in caplog.text


class _Request:
    def __init__(self, model_id: str) -> None:
        self.model_id = model_id


def test_generation_is_timed_and_counted_running_while_it_runs(backend: m.MemoryBackend) -> None:
    seen: list[Any] = []

    class Replica:
        @m.track_generation
        async def generate(self, request: _Request) -> str:
            seen.append(backend.get(m.GENERATIONS_RUNNING, model="sd"))
            return "images"

    assert asyncio.run(Replica().generate(_Request("sd"))) == "images"
    assert seen == [1]
    assert backend.get(m.GENERATIONS_RUNNING, model="sd") == 0
    assert len(backend.get(m.GENERATION_SECONDS, model="sd")) == 1


def test_classification_records_time_and_batch_size_and_model_ready(backend: m.MemoryBackend) -> None:
    class Replica:
        @m.track_classification
        async def classify_many(self, requests: list[_Request]) -> int:
            return len(requests)

        @m.track_model_ready("ImageClassifier")
        async def get_model(self, model_id: str) -> str:
            return model_id

    replica = Replica()
    assert asyncio.run(replica.classify_many([_Request("c"), _Request("c"), _Request("c")])) == 3
    assert asyncio.run(replica.get_model("c")) == "c"
    assert backend.get(m.BATCH_SIZE, model="c") == [3]
    assert len(backend.get(m.CLASSIFICATION_SECONDS, model="c")) == 1
    assert len(backend.get(m.MODEL_READY_SECONDS, deployment="ImageClassifier")) == 1


# -- logs, through Ray Serve's own formatters ------------------------------------------------------


@pytest.fixture
def serve_logger(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[logging.Logger]:
    """Serve's logger configured as in a replica (encoding from the test's parameter), restored after."""
    from ray.serve._private.logging_utils import configure_component_logger
    from ray.serve.schema import LoggingConfig

    logger = logging.getLogger("ray.serve")
    saved = (list(logger.handlers), list(logger.filters), logger.propagate, logger.level)
    configure_component_logger(
        component_name="replica", component_id="sealserve_ImageClassifier_1",
        logging_config=LoggingConfig(encoding=request.param, logs_dir=str(tmp_path)),
        max_bytes=10_000_000, backup_count=1,
    )
    logger.addFilter(ClientErrorFilter())
    yield logger
    logger.handlers[:] = saved[0]
    logger.filters[:] = saved[1]
    logger.propagate, logger.level = saved[2], saved[3]


def _in_request(request_id: str) -> Any:
    from ray.serve.context import _RequestContext, _serve_request_context

    return _serve_request_context.set(_RequestContext(route="/v1/classify", request_id=request_id,
                                                      app_name="sealserve"))


def _log_lines(tmp_path: Path) -> list[str]:
    for handler in logging.getLogger("ray.serve").handlers:
        handler.flush()
    return [line for p in tmp_path.glob("*.log") for line in p.read_text().splitlines() if line.strip()]


def _raise(exc: Exception) -> None:
    try:
        raise exc
    except Exception:
        logging.getLogger("ray.serve").exception("Request failed.")


@pytest.mark.parametrize("serve_logger", ["TEXT", "JSON"], indirect=True)
def test_serve_logs_a_client_error_in_one_line_and_a_server_error_with_its_traceback(
    serve_logger: logging.Logger, tmp_path: Path
) -> None:
    from ray.serve.context import _serve_request_context

    token = _in_request("req-client")
    _raise(BadRequestError("image is not valid base64"))
    _serve_request_context.reset(token)
    client_lines = _log_lines(tmp_path)
    assert len(client_lines) == 1
    assert "req-client" in client_lines[0] and "Traceback" not in client_lines[0]
    assert "client error 400 bad_request: image is not valid base64" in client_lines[0]

    token = _in_request("req-server")
    _raise(RuntimeError("boom"))
    _serve_request_context.reset(token)
    server_text = "\n".join(_log_lines(tmp_path)[1:])
    assert "req-server" in server_text and "Traceback" in server_text and "RuntimeError: boom" in server_text
    for line in _log_lines(tmp_path) if _is_json(tmp_path) else []:
        record = json.loads(line)  # one JSON object per line, traceback included
        assert record["request_id"] in ("req-client", "req-server")


def _is_json(tmp_path: Path) -> bool:
    return _log_lines(tmp_path)[0].startswith("{")


@pytest.mark.parametrize("serve_logger", ["JSON"], indirect=True)
def test_project_loggers_forwarded_to_serve_carry_the_request_id(
    serve_logger: logging.Logger, tmp_path: Path
) -> None:
    from ray.serve.context import _serve_request_context

    project = logging.getLogger("lib.test_forwarding")
    handler = ForwardTo(serve_logger)
    project.addHandler(handler)
    project.propagate = False
    try:
        token = _in_request("req-forwarded")
        project.warning("usage sink still failing (%s)", "ConnectionError")
        _serve_request_context.reset(token)
    finally:
        project.removeHandler(handler)
        project.propagate = True
    [line] = _log_lines(tmp_path)
    record = json.loads(line)
    assert record["request_id"] == "req-forwarded"
    assert record["message"] == "usage sink still failing (ConnectionError)"


def test_a_model_replica_crash_reaches_the_ingress_as_one_500_not_a_second_traceback() -> None:
    from deployments.model_clients import as_answer
    from lib.errors import SealserveError

    own = InvalidImageError("image is not valid base64")
    assert as_answer(own) is own
    crash = as_answer(RuntimeError("CUDA error: out of memory"))
    assert isinstance(crash, SealserveError) and crash.status_code == 500
    assert crash.message == "the model deployment failed (RuntimeError)"  # no internals in it
