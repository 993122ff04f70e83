"""Two Ray nodes on one machine: each node's loader fetches a sealed model exactly once.

This module runs its own Ray cluster (``ray.cluster_utils.Cluster``), so it shuts down the
session's single-node Ray first; the next module that needs Ray starts it again.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import ray
from ray import serve
from ray.cluster_utils import Cluster

from deployments.app import bind_graph
from deployments.model_loader import LOADER_NAMESPACE, loader_name
from lib.settings import AppSettings
from tests.sealed_world import SealedWorld, mark_unique, sealed_world
from tests.serve_harness import APP_NAME, ServeInstance, free_port, running_serve, worker_environment

NODES = 2


@pytest.fixture(scope="module")
def world(demo_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SealedWorld]:
    source, _ = mark_unique(demo_models_dir / "tiny-sd", tmp_path_factory.mktemp("sources") / "tiny-sd")
    with sealed_world(tmp_path_factory.mktemp("sealed"), {"tiny-sd": source}) as sealed:
        yield sealed


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    if ray.is_initialized():
        ray.shutdown()
    os.environ.update(worker_environment())
    local = Cluster(
        initialize_head=True,
        head_node_args={"gcs_server_port": free_port(), "num_cpus": 3, "include_dashboard": False},
    )
    for _ in range(NODES - 1):
        local.add_node(num_cpus=3)
    local.wait_for_nodes()
    ray.init(address=local.address, namespace="sealserve-tests", log_to_driver=False)
    try:
        yield local
    finally:
        ray.shutdown()
        local.shutdown()


@pytest.fixture(scope="module")
def api(
    cluster: Cluster, world: SealedWorld, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServeInstance]:
    no_local_models = tmp_path_factory.mktemp("no-local-models")
    settings = AppSettings.from_args(
        {
            "environment": "production",
            "model_dirs": [str(no_local_models)],
            "state_dir": str(tmp_path_factory.mktemp("state")),
            "sealed": world.sealed_args(["tiny-sd"]),
        }
    )
    one_per_node = {"num_replicas": NODES, "max_replicas_per_node": 1, "max_ongoing_requests": 1}
    app = bind_graph(settings, {"TextToImage": one_per_node})
    with running_serve(app, no_local_models, proxy_location="HeadOnly") as instance:
        yield instance


def loader_stats(node_id: str) -> dict[str, Any]:
    """The stats of the loader on ``node_id``, or {} if that node has none."""
    try:
        loader = ray.get_actor(loader_name(APP_NAME, node_id), namespace=LOADER_NAMESPACE)
    except ValueError:
        return {}
    stats: dict[str, Any] = ray.get(loader.stats.remote(), timeout=30)
    return stats


def alive_nodes() -> set[str]:
    return {node["NodeID"] for node in ray.nodes() if node["Alive"]}


def test_one_fetch_per_node(api: ServeInstance, world: SealedWorld) -> None:
    assert len(alive_nodes()) == NODES
    sd_id = world.published["tiny-sd"].id
    body = {"id": "c", "model_id": sd_id, "prompt": "two nodes", "width": 256, "height": 256,
            "num_inference_steps": 2, "seed": 3}
    loaders_busy: set[str] = set()
    with ThreadPoolExecutor(max_workers=4) as pool:
        for _ in range(8):  # until the replica on every node has loaded the model
            post = lambda _: api.post("/v1/infer", json=body, headers=api.auth())  # noqa: E731
            responses = list(pool.map(post, range(4)))
            assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
            loaders_busy = {n for n in alive_nodes() if loader_stats(n).get("ensure_calls", {}).get(sd_id)}
            if len(loaders_busy) == NODES:
                break
    assert len(loaders_busy) == NODES, "every node's replica must have loaded the model"
    for node in loaders_busy:
        stats = loader_stats(node)
        assert stats["node_id"] == node
        assert stats["sealed"]["tiny-sd"]["fetches"] == 1
    assert world.key_releases("tiny-sd") == NODES
    assert world.downloads("tiny-sd") == NODES
    serve.delete(APP_NAME)
