"""A real Ray Serve instance for integration tests: one Ray per session, one Serve per module.

Ray runs in-process (``ray.init``) with a fixed number of logical CPUs so that the replicas of a
test graph always fit, whatever the machine; processes are Ray's own and go away with
``ray.shutdown``. Serve listens on a free loopback port and is shut down after each module.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import requests

TEST_SECRET_KEY = "test-secret-key-0123456789abcdefghijklmnopqrstuvwxyz"
TEST_API_KEY = "ss_test_bootstrap_key_0123456789abcdefghijklmnop"
# The reader account every test loader uses for sealed models (created by tests.sealed_world).
READER_EMAIL = "reader@sealserve.test"
READER_PASSWORD = "reader-password-for-tests-0123456789"
APP_NAME = "sealserve"
# This machine's node key for every test loader (lib/sealed/signing.py): made on first use, 0600,
# enrolled and approved on each test's resource API by tests.sealed_world.
NODE_KEY_FILE = str(Path(tempfile.gettempdir()) / f"sealserve-test-node-{os.getuid()}" / "node.key")
READY_TIMEOUT_S = 240

T = TypeVar("T")


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
        "SEALSERVE_NODE_KEY_FILE": NODE_KEY_FILE,
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


@contextmanager
def serving_demo_models(
    demo_models_dir: Path,
    tmp_path_factory: Any,
    args: dict[str, Any] | None = None,
    options: dict[str, Any] | None = None,
    *,
    state_dir: Path | None = None,
) -> Iterator[ServeInstance]:
    """The application in production mode on a copy of the demo models, with a state directory
    of its own (``state_dir``, else a new one): ``args`` add app args, ``options`` Serve options
    by deployment name. Deployed as ``build_app`` deploys (preflight, then the graph)."""
    start_ray()
    from deployments.app import bind_graph
    from lib.preflight import preflight
    from lib.settings import AppSettings

    model_dir = copy_demo_models(demo_models_dir, tmp_path_factory.mktemp("models"))
    settings = AppSettings.from_args({
        "environment": "production",
        **(args or {}),
        "model_dirs": [str(model_dir)],
        "state_dir": str(state_dir or tmp_path_factory.mktemp("state")),
    })
    preflight(settings)
    with running_serve(bind_graph(settings, options), model_dir) as instance:
        yield instance


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


# --- helpers for modules that need their own Ray, replica counts and load ------------------------


@contextmanager
def own_ray(*, num_cpus: int, num_gpus: int = 0, env: dict[str, str] | None = None) -> Iterator[None]:
    """A Ray of this module's own shape (e.g. one logical GPU), in-process like :func:`start_ray`.

    The session's Ray is shut down first (the next module's :func:`start_ray` starts it again);
    this one is shut down at the end, with every process it started. ``env`` is added to the
    environment its processes inherit, and taken away again afterwards.
    """
    import ray

    if ray.is_initialized():
        ray.shutdown()
    os.environ.update(worker_environment())
    saved = {name: os.environ.get(name) for name in env or {}}
    os.environ.update(env or {})
    try:
        ray.init(
            num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, log_to_driver=False,
            namespace="sealserve-tests",
        )
        yield
    finally:
        ray.shutdown()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def replica_states(deployment: str, app: str = APP_NAME) -> dict[str, int]:
    """How many replicas of ``deployment`` are in each state (``{"RUNNING": 2}``), from serve.status()."""
    from ray import serve

    application = serve.status().applications.get(app)
    if application is None or deployment not in application.deployments:
        return {}
    states = application.deployments[deployment].replica_states
    return {str(getattr(state, "value", state)): count for state, count in states.items() if count}


def wait_for(
    probe: Callable[[], T],
    done: Callable[[T], bool],
    *,
    timeout: float,
    what: str,
    interval: float = 0.5,
    context: Callable[[], Any] | None = None,
) -> T:
    """Call ``probe`` until ``done(result)``; AssertionError with the last result (and what
    ``context`` says then) after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if done(result):
            return result
        if time.monotonic() > deadline:
            more = f"; {context()!r}" if context is not None else ""
            raise AssertionError(f"{what}: not reached within {timeout:g}s; last seen {result!r}{more}")
        time.sleep(interval)


def deployment_status(deployment: str, app: str = APP_NAME) -> tuple[str, str]:
    """(status, message) of ``deployment`` in serve.status(), e.g. ("UPSCALING", "Upscaling from 1 to 3")."""
    from ray import serve

    application = serve.status().applications.get(app)
    if application is None or deployment not in application.deployments:
        return "", ""
    status = application.deployments[deployment]
    return str(getattr(status.status, "value", status.status)), status.message


@dataclass
class LoadStats:
    """What a :func:`background_load` has sent so far: status codes (0: no response) by count."""

    statuses: Counter[int] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def sent(self) -> int:
        with self.lock:
            return sum(self.statuses.values())

    def snapshot(self) -> dict[int, int]:
        with self.lock:
            return dict(self.statuses)


@contextmanager
def background_load(send: Callable[[], int], *, clients: int, max_requests: int) -> Iterator[LoadStats]:
    """``clients`` threads call ``send`` (which returns an HTTP status) back to back, in a closed
    loop, until the block ends or ``max_requests`` have been sent; leaving the block waits for the
    requests in flight."""
    stats = LoadStats()
    stop = threading.Event()
    budget = iter(range(max_requests))
    budget_lock = threading.Lock()

    def client() -> None:
        while not stop.is_set():
            with budget_lock:
                if next(budget, None) is None:
                    return
            try:
                status = send()
            except Exception:  # a refused or timed-out connection counts as a failed request
                status = 0
            with stats.lock:
                stats.statuses[status] += 1

    with ThreadPoolExecutor(max_workers=clients, thread_name_prefix="load") as pool:
        futures = [pool.submit(client) for _ in range(clients)]
        try:
            yield stats
        finally:
            stop.set()
            for future in futures:
                future.result()
