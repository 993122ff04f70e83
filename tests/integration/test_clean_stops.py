"""`sealserve serve` stops cleanly on SIGINT (Ctrl-C) and on SIGTERM (a process manager's stop),
and stops the rest (exit 1) when Ray's raylet dies under it.

A real `sealserve serve` process serves a sealed classifier published to a real resource API and
S3 (tests/sealed_world.py); one request makes the node decrypt it into the cache root. The pids
of the whole process tree of the run (the driver, Ray's processes, the replicas, HAProxy when
installed) are recorded, then the signal is sent. Afterwards: the driver has exited, no process
of that tree is left, the port can be bound again, and no plaintext of the model (found by a
random marker this run added to it) nor any file is left under the cache root.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from bench.processes import Server, describe, psutil, write_serve_config
from tests.sealed_world import SealedWorld, find_copies, mark_unique, sealed_world
from tests.serve_harness import TEST_API_KEY, free_port, wait_for, worker_environment

ROOT = Path(__file__).resolve().parents[2]
SEALSERVE = Path(sys.executable).parent / "sealserve"
MODEL = "tiny-classifier"
READY_TIMEOUT_S = 400
# The lead's measure of a stop is ~11 s; Serve's graceful timeouts bound it at 30 s a replica.
STOP_TIMEOUT_S = 90


@pytest.fixture(scope="module")
def plaintext(demo_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    return mark_unique(demo_models_dir / MODEL, tmp_path_factory.mktemp("sources") / MODEL)


@pytest.fixture(scope="module")
def world(
    plaintext: tuple[Path, dict[str, int]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SealedWorld]:
    with sealed_world(tmp_path_factory.mktemp("sealed"), {MODEL: plaintext[0]}) as sealed:
        yield sealed


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def start_serve(world: SealedWorld, workdir: Path, port: int) -> Server:
    models = workdir / "no-local-models"
    models.mkdir()
    path = write_serve_config(workdir / "serve_config.yaml", {
        "environment": "production",
        "model_dirs": [str(models)],
        "state_dir": str(workdir / "state"),
        "sealed": world.sealed_args([MODEL]),
    })
    env = {**os.environ, **worker_environment(), "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    return Server("sealserve", [str(SEALSERVE), "serve", "--config", str(path), "--port", str(port)],
                  workdir / "serve.log", cwd=workdir, env=env)


def ready(url: str) -> bool:
    try:
        return bool(requests.get(url + "/health", timeout=5).json().get("ready"))
    except (requests.RequestException, ValueError):
        return False


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM", "raylet-killed"])
def test_a_stop_leaves_no_process_no_port_and_no_plaintext(
    stop: str, world: SealedWorld, plaintext: tuple[Path, dict[str, int]], tmp_path: Path
) -> None:
    """A signal stops everything gracefully (exit 0). When Ray's raylet dies on its own (SIGKILL
    here), the service stops the rest and exits 1, so that a process manager restarts it; its
    model cache is then swept by the next start, not by this one (no replica shut down)."""
    from tests.integration.test_api import png_b64

    _, digests = plaintext
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    began = time.time()
    server = start_serve(world, tmp_path, port)
    try:
        wait_for(lambda: server.alive() and ready(url), bool, timeout=READY_TIMEOUT_S, interval=2,
                 what="sealserve serve ready", context=server.log_tail)
        response = requests.post(
            url + "/v1/classify", json={"image": png_b64(), "model_id": MODEL},
            headers={"Authorization": f"Bearer {TEST_API_KEY}"}, timeout=120,
        )
        assert response.status_code == 200, response.text
        assert find_copies(digests, [world.cache_dir], exclude=[]), "the test must see the plaintext"
        # Every process of the run, by pid and start time: its session, its descendants, and
        # Ray workers of its raylets (bench/processes.py).
        members = server.members(since=began)
        assert len(members) > 3, describe(members)  # the driver, Ray's processes and the replicas

        started = time.monotonic()
        if stop == "raylet-killed":
            raylets = [p for p in members if p.name() == "raylet"]
            assert len(raylets) == 1, describe(members)
            raylets[0].kill()
        else:
            server.process.send_signal(getattr(signal, stop))
        returncode = server.process.wait(timeout=STOP_TIMEOUT_S)
        wait_for(server.leftovers, lambda left: not left, timeout=30, what="every process of the run gone",
                 context=lambda: describe([psutil.Process(pid) for pid in server.leftovers()]))
        elapsed = time.monotonic() - started
        assert returncode == (1 if stop == "raylet-killed" else 0), server.log_tail()
        assert port_is_free(port), f"port {port} still held after the stop"
        if stop != "raylet-killed":
            assert find_copies(digests, [world.cache_dir], exclude=[]) == []
            left = [p for p in world.cache_dir.rglob("*") if p.is_file()] if world.cache_dir.exists() else []
            assert left == [], left
        print(f"{stop}: stopped in {elapsed:.1f} s, {len(server.seen)} processes")
    finally:
        server.stop()  # what a failed stop left, signalled by pid
