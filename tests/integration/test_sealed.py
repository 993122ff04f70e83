"""Sealed models end to end: published to a real resource API and S3, served through Serve.

One node, TextToImage with two replicas: the node's loader must release the key once and
download the big part once however many replicas ask, and plaintext must exist only in the
node cache, and nowhere once the application is deleted.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import ray
from ray import serve

from deployments.app import bind_graph
from deployments.model_loader import LOADER_NAMESPACE, loader_name
from lib.sealed.node_cache import MARKER
from lib.settings import AppSettings
from tests.sealed_world import SealedWorld, find_copies, mark_unique, sealed_world
from tests.serve_harness import APP_NAME, ServeInstance, running_serve, start_ray

MODELS = ("tiny-sd", "tiny-classifier")
# This run's model directories, and {sha256: size} of the plaintext a leak search looks for.
Plaintext = tuple[dict[str, Path], dict[str, int]]


@pytest.fixture(scope="module")
def plaintext(demo_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Plaintext:
    """This run's model directories, each with a random marker, and {sha256: size} to search for."""
    sources = tmp_path_factory.mktemp("sources")
    models, digests = {}, {}
    for name in MODELS:
        models[name], marker = mark_unique(demo_models_dir / name, sources / name)
        digests.update(marker)
    return models, digests


@pytest.fixture(scope="module")
def world(
    plaintext: Plaintext, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SealedWorld]:
    with sealed_world(tmp_path_factory.mktemp("sealed"), plaintext[0]) as sealed:
        yield sealed


@pytest.fixture(scope="module")
def api(world: SealedWorld, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeInstance]:
    start_ray()
    no_local_models = tmp_path_factory.mktemp("no-local-models")
    settings = AppSettings.from_args(
        {
            "environment": "production",
            "model_dirs": [str(no_local_models)],
            "state_dir": str(tmp_path_factory.mktemp("state")),
            "model_scan_interval": 5,
            "default_inference_steps": 2,
            "sealed": world.sealed_args(list(MODELS)),
        }
    )
    # max_ongoing_requests=1 makes concurrent requests spread over both replicas.
    app = bind_graph(settings, {"TextToImage": {"num_replicas": 2, "max_ongoing_requests": 1}})
    with running_serve(app, no_local_models) as instance:
        yield instance


def loader_stats() -> dict[str, Any]:
    node_id = ray.get_runtime_context().get_node_id()
    loader = ray.get_actor(loader_name(APP_NAME, node_id), namespace=LOADER_NAMESPACE)
    stats: dict[str, Any] = ray.get(loader.stats.remote(), timeout=30)
    return stats


def catalog(api: ServeInstance) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in api.get("/v1/models", headers=api.auth()).json()["models"]}


def infer(api: ServeInstance, model_id: str, seed: int = 1) -> Any:
    body = {"id": f"s{seed}", "model_id": model_id, "prompt": "a sealed lighthouse",
            "width": 256, "height": 256, "num_inference_steps": 2, "seed": seed}
    return api.post("/v1/infer", json=body, headers=api.auth())


def test_sealed_models_are_listed_without_releasing_keys(api: ServeInstance, world: SealedWorld) -> None:
    models = catalog(api)
    for name in MODELS:
        entry = models[name]
        assert entry["source"] == "sealed" and entry["status"] == "sealed"
        assert entry["id"] == world.published[name].id and entry["path"] is None
        assert world.key_releases(name) == 0
    assert models["tiny-sd"]["kind"] == "text-to-image"


def test_two_replicas_on_one_node_fetch_once(api: ServeInstance, world: SealedWorld) -> None:
    sd_id = world.published["tiny-sd"].id
    with ThreadPoolExecutor(max_workers=4) as pool:
        for round_ in range(6):  # until both replicas have loaded the model
            seeds = range(round_ * 4, round_ * 4 + 4)
            responses = list(pool.map(lambda seed: infer(api, sd_id, seed), seeds))
            assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
            if loader_stats()["ensure_calls"].get(sd_id, 0) >= 2:
                break
    stats = loader_stats()
    assert stats["ensure_calls"][sd_id] >= 2, "both replicas must have asked the loader"
    # The second replica either joined the first one's fetch or hit the cache: one fetch.
    assert stats["sealed"]["tiny-sd"]["fetches"] == 1
    assert world.key_releases("tiny-sd") == 1
    assert world.downloads("tiny-sd") == 1


def test_infer_is_reproducible_from_sealed_weights(api: ServeInstance, world: SealedWorld) -> None:
    sd_id = world.published["tiny-sd"].id
    first, second = infer(api, sd_id, seed=77).json(), infer(api, sd_id, seed=77).json()
    assert first["images"][0]["base64"] == second["images"][0]["base64"]


def test_classify_from_sealed_model(api: ServeInstance, world: SealedWorld) -> None:
    from tests.integration.test_api import png_b64

    response = api.post(
        "/v1/classify", json={"image": png_b64(), "top_k": 3, "model_id": "tiny-classifier"},
        headers=api.auth(),
    )
    assert response.status_code == 200, response.text
    assert response.json()["model"] == world.published["tiny-classifier"].id
    assert world.key_releases("tiny-classifier") == 1
    assert world.downloads("tiny-classifier") == 1


def test_catalog_and_health_after_fetch(api: ServeInstance, world: SealedWorld) -> None:
    models = catalog(api)
    for name in MODELS:
        assert models[name]["status"] == "available"
        assert models[name]["path"] is None  # where it lies on the node is not shown
    health = api.get("/health", headers=api.auth()).json()
    assert health["status"] == "ok" and health["errors"] == []


def cached_files(cache_dir: Path) -> list[Path]:
    """Files under the cache, bar the empty markers of its per-process directories."""
    if not cache_dir.exists():
        return []
    return [p for p in cache_dir.rglob("*") if p.is_file() and p.name != MARKER]


def _search_roots() -> list[Path]:
    session = Path(ray._private.worker.global_worker.node.get_session_dir_path())
    return [Path("/dev/shm"), session, Path(tempfile.gettempdir())]


def plaintext_digests(world: SealedWorld, plaintext: Plaintext) -> dict[str, int]:
    """The markers, and the whole plaintext tars (their sha256 is the model id)."""
    tars = {world.published[name].id: world.published[name].plaintext_size for name in MODELS}
    return {**plaintext[1], **tars}


def test_plaintext_only_in_the_node_cache(
    api: ServeInstance,
    world: SealedWorld,
    plaintext: Plaintext,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    digests = plaintext_digests(world, plaintext)
    # The search works: it finds the cached plaintext ...
    cached = find_copies(digests, [world.cache_dir], exclude=[])
    assert cached, "the node cache must hold the decrypted models"
    # ... and finds no copy anywhere else (pytest's own temp tree holds the demo sources).
    exclude = [world.cache_dir, tmp_path_factory.getbasetemp()]
    elsewhere = find_copies(digests, _search_roots(), exclude=exclude)
    assert elsewhere == []
    assert oct(world.cache_dir.stat().st_mode & 0o777) == oct(0o700)


def test_no_plaintext_once_the_application_is_deleted(
    api: ServeInstance,
    world: SealedWorld,
    plaintext: Plaintext,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    node_id = ray.get_runtime_context().get_node_id()
    serve.delete(APP_NAME)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            ray.get_actor(loader_name(APP_NAME, node_id), namespace=LOADER_NAMESPACE)
        except ValueError:
            break  # no loader outlives its application
        time.sleep(0.5)
    else:
        pytest.fail("the model loader outlived its application")
    # The loader removes its cache on the SIGTERM Ray sends it; give that handler time to finish.
    remaining = cached_files(world.cache_dir)
    while remaining and time.monotonic() < deadline:
        time.sleep(0.5)
        remaining = cached_files(world.cache_dir)
    assert remaining == []
    copies = find_copies(
        plaintext_digests(world, plaintext), _search_roots(), exclude=[tmp_path_factory.getbasetemp()]
    )
    assert copies == []
