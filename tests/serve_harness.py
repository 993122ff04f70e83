"""A real Ray Serve instance for integration tests: one Ray per session, one Serve per module.

Ray runs in-process (``ray.init``) with a fixed number of logical CPUs so that the replicas of a
test graph always fit, whatever the machine; processes are Ray's own and go away with
``ray.shutdown``. Serve listens on a free loopback port and is shut down after each module.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

TEST_SECRET_KEY = "test-secret-key-0123456789abcdefghijklmnopqrstuvwxyz"
TEST_API_KEY = "ss_test_bootstrap_key_0123456789abcdefghijklmnop"
# The reader account every test loader uses for sealed models (created by tests.sealed_world).
READER_EMAIL = "reader@sealserve.test"
READER_PASSWORD = "reader-password-for-tests-0123456789"
APP_NAME = "sealserve"
READY_TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def worker_environment() -> dict[str, str]:
    """Environment the Ray workers inherit: real secrets, production mode, offline hubs."""
    return {
        "SECRET_KEY": TEST_SECRET_KEY,
        "API_KEYS": TEST_API_KEY,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "RAY_SERVE_LOG_TO_STDERR": "0",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "RESOURCE_API_EMAIL": READER_EMAIL,
        "RESOURCE_API_PASSWORD": READER_PASSWORD,
    }


def start_ray() -> None:
    import ray

    os.environ.update(worker_environment())
    if not ray.is_initialized():
        ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, namespace="sealserve-tests")


@dataclass
class ServeInstance:
    base_url: str
    model_dir: Path

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return requests.get(self.base_url + path, timeout=kwargs.pop("timeout", 120), **kwargs)

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        return requests.post(self.base_url + path, timeout=kwargs.pop("timeout", 120), **kwargs)

    def auth(self, credential: str = TEST_API_KEY) -> dict[str, str]:
        return {"Authorization": f"Bearer {credential}"}


def copy_demo_models(source: Path, target: Path) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    for child in source.iterdir():
        shutil.copytree(child, target / child.name)
    return target


@contextmanager
def running_serve(
    app: Any, model_dir: Path, *, name: str = APP_NAME, proxy_location: str = "EveryNode"
) -> Iterator[ServeInstance]:
    """Start Serve on a free port, run ``app`` at ``/`` and wait until /health says ready.

    Several Ray nodes on one machine cannot all bind the port: use ``proxy_location="HeadOnly"``.
    """
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location=proxy_location)
    try:
        serve.run(app, name=name, route_prefix="/")
        instance = ServeInstance(f"http://127.0.0.1:{port}", model_dir)
        wait_ready(instance)
        yield instance
    finally:
        serve.shutdown()


def wait_ready(instance: ServeInstance, timeout: float = READY_TIMEOUT_S) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            response = instance.get("/health", timeout=10)
            last = response.json()
            if response.status_code == 200 and last.get("ready"):
                return dict(last)
        except requests.RequestException as exc:
            last = exc
        time.sleep(0.5)
    raise TimeoutError(f"sealserve not ready after {timeout}s: {last}")
