"""What a platform team sees, end to end: ``sealserve serve`` as ``make serve`` runs it, scraped.

One ``sealserve serve`` process (its own local Ray, ``METRICS_PORT`` and ``LOG_FORMAT=json``),
the text-to-image model sealed (resource API + S3), the classifier local. The test sends known
traffic through real HTTP, scrapes the printed metrics URL until Ray's agent has exported the
values, and checks each metric against the traffic; then it reads the JSON log files: a client's
bad image is one line with its request id and no traceback, and no secret is anywhere.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from bench.processes import interrupt, write_serve_config
from lib.accounts.auth import bootstrap_subject
from lib.accounts.compute import CLASSIFY_COST, generation_cost
from lib.models.imaging import encode_png
from lib.observability import metrics as m
from lib.sealed.publish import PublishResult
from tests.sealed_world import SealedWorld, sealed_world
from tests.serve_harness import (
    READER_PASSWORD,
    TEST_API_KEY,
    TEST_SECRET_KEY,
    free_port,
    worker_environment,
)

ROOT = Path(__file__).resolve().parents[2]
SEALSERVE = str(Path(sys.executable).parent / "sealserve")  # the command `make serve` runs
START_TIMEOUT_S = 420
SCRAPE_TIMEOUT_S = 90
# Longer than Ray's gauge TTL (two export intervals of ~5-10 s).
GAUGE_OUTLIVES_S = 30
SEALED_MODEL = "tiny-sd"
LOCAL_MODEL = "tiny-classifier"


@dataclass
class Service:
    url: str
    metrics_url: str
    output: Path
    logs_dir: Path
    published: PublishResult
    process: subprocess.Popen[bytes]

    def post(self, path: str, body: dict[str, Any], key: str | None = TEST_API_KEY) -> requests.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return requests.post(f"{self.url}{path}", json=body, headers=headers, timeout=120)


@pytest.fixture(scope="module")
def world(demo_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SealedWorld]:
    with sealed_world(tmp_path_factory.mktemp("sealed"), {SEALED_MODEL: demo_models_dir / SEALED_MODEL}) as w:
        yield w


@pytest.fixture(scope="module")
def service(
    world: SealedWorld, demo_models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    work = tmp_path_factory.mktemp("ops")
    models = work / "models"
    models.mkdir()
    # A copy: the catalog does not follow links out of MODEL_DIRS.
    shutil.copytree(demo_models_dir / LOCAL_MODEL, models / LOCAL_MODEL)
    state = work / "state"
    config_path = write_serve_config(work / "serve_config.yaml", {
        "environment": "production",
        "model_dirs": [str(models)],
        "state_dir": str(state),
        "default_inference_steps": 2,
        "sealed": world.sealed_args([SEALED_MODEL]),
    })
    port, metrics_port = free_port(), free_port()
    env = {
        **os.environ,
        **worker_environment(),
        "PYTHONPATH": str(ROOT),
        "METRICS_PORT": str(metrics_port),
        "LOG_FORMAT": "json",
    }
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_SERVE_LOG_TO_STDERR", None)  # the command's own choice for JSON logs
    output = work / "serve.out"
    with output.open("wb") as out:
        process = subprocess.Popen(
            [SEALSERVE, "serve", "--config", str(config_path), "--port", str(port)],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_for(lambda: "sealserve is ready" in output.read_text(errors="replace"), process, output)
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        yield Service(url, metrics_url, output, state / "logs", world.published[SEALED_MODEL], process)
    finally:
        interrupt(process)


def _wait_for(ready: Callable[[], bool], process: subprocess.Popen[bytes], output: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ready():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"sealserve serve did not get ready:\n{output.read_text()[-4000:]}")
        time.sleep(1)


def scrape(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Every sample of the scrape, by sample name."""
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(requests.get(url, timeout=10).text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
    return samples


def total(samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    """The sum over every series (workers, replicas) of ``name`` with ``labels``."""
    return sum(v for found, v in samples.get(name, []) if all(found.get(k) == x for k, x in labels.items()))


def _png() -> str:
    from PIL import Image

    return encode_png(Image.new("RGB", (16, 16), (30, 120, 200)))


@pytest.fixture(scope="module")
def traffic(service: Service) -> dict[str, Any]:
    """Known traffic; returns what the checks need (ids, the bad request's id)."""
    image = {"image": _png(), "top_k": 1}
    assert service.post("/v1/classify", image, key=None).status_code == 401  # missing credentials
    assert service.post("/v1/classify", image, key="ss_" + "x" * 40).status_code == 401  # unknown key
    created = service.post(
        "/v1/admin/keys", {"name": "metrics-test", "scopes": ["classify"], "rate_limit": "2/minute"}
    )
    assert created.status_code == 201, created.text
    key = created.json()
    statuses = [service.post("/v1/classify", image, key=key["key"]).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]
    for _ in range(2):
        assert service.post("/v1/classify", image).status_code == 200
    bad = service.post("/v1/classify", {"image": "not base64 at all!!", "top_k": 1})
    assert bad.status_code == 400, bad.text
    models = requests.get(f"{service.url}/v1/models", headers={"Authorization": f"Bearer {TEST_API_KEY}"},
                          timeout=30).json()["models"]
    sd = next(x["id"] for x in models if x["name"] == SEALED_MODEL)
    infer = {"id": "t-1", "model_id": sd, "prompt": "a lighthouse", "num_inference_steps": 2,
             "width": 256, "height": 256, "seed": 1, "num_images": 1}
    generated = service.post("/v1/infer", infer)
    assert generated.status_code == 200, generated.text
    return {"key": key, "sd": sd, "bad_request_id": bad.headers["X-Request-ID"],
            "bad_code": bad.json()["error"]["code"], "created_key": key["key"]}


def test_make_serve_prints_the_metrics_url(service: Service) -> None:
    assert f"metrics (Prometheus scrape URL): {service.metrics_url}" in service.output.read_text()


def test_every_metric_matches_the_traffic(service: Service, traffic: dict[str, Any]) -> None:
    key_id, sd = traffic["key"]["id"], traffic["sd"]
    bootstrap = bootstrap_subject(TEST_API_KEY)
    classify, infer = "POST /v1/classify", "POST /v1/infer"
    size = service.published
    expected: list[tuple[str, dict[str, str], float]] = [
        (m.REQUESTS.exported, {"route": classify, "status": "200"}, 4),
        (m.REQUESTS.exported, {"route": classify, "status": "401"}, 2),
        (m.REQUESTS.exported, {"route": classify, "status": "429"}, 1),
        (m.REQUESTS.exported, {"route": classify, "status": "400"}, 1),
        (m.REQUESTS.exported, {"route": infer, "status": "200"}, 1),
        (m.REQUESTS.exported, {"route": "POST /v1/admin/keys", "status": "201"}, 1),
        (m.AUTH_FAILURES.exported, {"reason": "missing"}, 1),
        (m.RATE_LIMITED.exported, {}, 1),
        (m.REQUEST_COST.exported, {"key_id": key_id}, 2),
        # Two classifies, and the generation at its charged cost (docs/accounts.md).
        (m.REQUEST_COST.exported, {"key_id": bootstrap},
         2 * CLASSIFY_COST + generation_cost(width=256, height=256, steps=2, images=1)),
        (m.GENERATION_SECONDS.exported + "_count", {"model": sd}, 1),
        (m.GENERATIONS_RUNNING.exported, {"model": sd}, 0),
        (m.MODEL_READY_SECONDS.exported + "_count", {"deployment": "TextToImage"}, 1),
        (m.MODEL_READY_SECONDS.exported + "_count", {"deployment": "ImageClassifier"}, 1),
        (m.LOADER_CACHE_MISSES.exported, {}, 1),
        (m.LOADER_FETCHES.exported, {"result": "ok"}, 1),
        (m.LOADER_KEY_RELEASES.exported, {}, 1),
        (m.LOADER_FETCHED_BYTES.exported, {}, size.sealed_size),
        (m.LOADER_DECRYPTED_BYTES.exported, {}, size.plaintext_size),
        (m.LOADER_CACHE_BYTES.exported, {}, size.plaintext_size),
        # Every admitted request is recorded: the key creation, 3 + 2 + 1 classify, the model
        # list, 1 infer.
        (m.USAGE_QUEUED.exported, {}, 9),
        (m.USAGE_WRITTEN.exported, {}, 9),
    ]
    at_least: list[tuple[str, dict[str, str], float]] = [
        (m.REQUESTS.exported, {"route": "GET /health", "status": "200"}, 1),
        (m.AUTH_FAILURES.exported, {"reason": "unknown_key"}, 1),
        (m.CLASSIFICATION_SECONDS.exported + "_count", {}, 1),
        # Ray's exporter gives a histogram's _sum only approximately: count the calls, not images.
        (m.BATCH_SIZE.exported + "_count", {}, 1),
    ]
    # Nothing in this traffic evicts, hits the node cache, retries or drops usage: those stay 0.
    zero = [m.LOADER_CACHE_HITS, m.LOADER_EVICTIONS, m.USAGE_RETRIED, m.USAGE_DROPPED, m.OVER_BUDGET,
            m.LOADER_FETCHES]
    deadline = time.monotonic() + SCRAPE_TIMEOUT_S
    while True:
        samples = scrape(service.metrics_url)
        wrong = [(n, labels, total(samples, n, **labels), want) for n, labels, want in expected
                 if total(samples, n, **labels) != want]
        wrong += [(n, labels, total(samples, n, **labels), f">={want}") for n, labels, want in at_least
                  if total(samples, n, **labels) < want]
        wrong += [(s.exported, {"result": "error"} if s is m.LOADER_FETCHES else {}, "!= 0") for s in zero
                  if total(samples, s.exported, **({"result": "error"} if s is m.LOADER_FETCHES else {}))]
        if not wrong or time.monotonic() > deadline:
            break
        time.sleep(2)  # Ray's agent exports every few seconds
    assert wrong == [], wrong
    assert any(name.startswith("ray_serve_") for name in samples)  # next to Serve's own metrics
    # A gauge that stays the same stays exported: Ray's agent drops a series not set again within
    # two export intervals, so the replicas set their gauges again while they run.
    time.sleep(GAUGE_OUTLIVES_S)
    later = scrape(service.metrics_url)
    assert total(later, m.LOADER_CACHE_BYTES.exported) == size.plaintext_size
    assert total(later, m.GENERATIONS_RUNNING.exported, model=sd) == 0
    assert [labels for labels, _ in later[m.GENERATIONS_RUNNING.exported]]


def _json_lines(logs_dir: Path) -> list[dict[str, Any]]:
    lines = []
    for path in sorted(logs_dir.rglob("*.log")):
        for line in path.read_text(errors="replace").splitlines():
            if line.strip():
                lines.append(json.loads(line))  # one JSON object per line, or this fails
    return lines


@pytest.fixture(scope="module")
def stopped(service: Service, traffic: dict[str, Any]) -> Service:
    """The service after a graceful stop (Ctrl-C): every log line is on disk."""
    interrupt(service.process)
    return service


def test_json_logs_one_line_per_client_error_with_its_request_id(
    stopped: Service, traffic: dict[str, Any]
) -> None:
    bad_id = traffic["bad_request_id"]
    lines = _json_lines(stopped.logs_dir)
    assert lines
    # Nothing in this traffic is a server error: no traceback anywhere, the bad image included.
    assert [x for x in lines if "Traceback" in json.dumps(x)] == []
    about_bad = [x for x in lines if x.get("request_id") == bad_id]
    text = json.dumps(about_bad)
    assert "Traceback" not in text
    answered = [x for x in about_bad if x.get("message", "").startswith("answered 400")]
    assert len(answered) == 1, about_bad
    assert f"answered 400 {traffic['bad_code']} (request {bad_id}, key bootstrap:" in answered[0]["message"]
    # Every line our code logs while serving a request carries the request's id.
    ours = [x for x in lines if x.get("message", "").startswith("answered ")]
    assert ours and all(x.get("request_id") for x in ours)


def test_no_secret_in_any_log(stopped: Service, traffic: dict[str, Any]) -> None:
    secrets = [TEST_SECRET_KEY, TEST_API_KEY, traffic["created_key"], READER_PASSWORD]
    texts = [p.read_text(errors="replace") for p in stopped.logs_dir.rglob("*.log")]
    texts.append(stopped.output.read_text(errors="replace"))
    assert all(texts)
    leaked = [s[:6] for s in secrets for t in texts if s in t]
    assert leaked == []
