"""Faults through real HTTP and a real Serve: killed replicas, and usage that survives them.

1. The TextToImage replica is killed with SIGKILL while generations run: their clients get 503
   in the documented error shape with Retry-After, and generations succeed again once Serve has
   replaced it.
2. The RateLimiter replica is killed: requests keep being answered on a per-replica share of the
   limits, which /health shows until the limiter answers again.
3. Classify requests run at some concurrency; after a third of them the Ingress replica's process
   is killed with SIGKILL (found by its actor's pid in Ray's actor table, never by name), Serve
   replaces it, and the load goes on. The ingress writes usage to the database only every hour
   here, so every record of the killed replica reaches the database through the node's usage
   journal alone (shipped by the replacement replica at its start). Once the application is
   deleted (a graceful stop, which drains the replacement's queue), the usage recorded for the
   key is at least the number of answers the clients got (2xx and 4xx) and exceeds it by at
   most the requests that were in flight when the replica died.
"""

from __future__ import annotations

import base64
import io
import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from PIL import Image

from lib.accounts.store import AccountStore
from tests.serve_harness import (
    APP_NAME,
    TEST_API_KEY,
    ServeInstance,
    background_load,
    replica_states,
    serving_demo_models,
    wait_for,
)

REQUESTS = 240
CLIENTS = 8
INGRESS_ACTOR = f"ServeReplica:{APP_NAME}:Ingress"
TEXT_TO_IMAGE_ACTOR = f"ServeReplica:{APP_NAME}:TextToImage"
LIMITER_ACTOR = f"ServeReplica:{APP_NAME}:RateLimiter"
STEPS = 40


@pytest.fixture(scope="module")
def service(
    demo_models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServeInstance, str, Path]]:
    state_dir = tmp_path_factory.mktemp("state")
    database_url = f"sqlite:///{state_dir / 'accounts.db'}"
    args = {
        "accounts": {
            "database_url": database_url,
            # Longer than the module runs: only the journal can save a killed replica's usage.
            "usage_flush_interval_s": 3600,
            "usage_batch_size": 10_000,
            "usage_recovery_interval_s": 2,
        },
    }
    fast_checks = {"num_replicas": 1, "health_check_period_s": 1, "health_check_timeout_s": 5}
    options = {"Ingress": fast_checks, "TextToImage": fast_checks}
    serving = serving_demo_models(demo_models_dir, tmp_path_factory, args, options, state_dir=state_dir)
    with serving as instance:
        yield instance, database_url, state_dir


def png_b64() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (20, 120, 200)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def replica_pids(actor_class: str = INGRESS_ACTOR) -> set[int]:
    """The pids of the live replica actors of a deployment, from this Ray's actor table (the GCS's,
    which ``ray.util.state`` reads through the dashboard this Ray runs without)."""
    from ray._private.state import actors

    return {
        int(actor["Pid"])
        for actor in actors().values()
        if actor["ActorClassName"] == actor_class and actor["State"] == "ALIVE" and actor["Pid"]
    }


def ingress_pids() -> set[int]:
    return replica_pids(INGRESS_ACTOR)


def test_a_model_replica_killed_mid_request_answers_503_with_retry_after(
    service: tuple[ServeInstance, str, Path],
) -> None:
    """Generations (slow enough to be caught in the middle) are running when the TextToImage
    replica is killed: their clients get 503 in the documented shape with Retry-After, and the
    next generation succeeds once Serve has replaced the replica."""
    instance, _, _ = service
    headers = {"Authorization": f"Bearer {TEST_API_KEY}"}

    def infer(steps: int) -> requests.Response:
        body = {"id": "drill", "model_id": "tiny-sd", "prompt": "a lighthouse in a storm",
                "width": 256, "height": 256, "num_inference_steps": steps, "seed": 1}
        return requests.post(instance.base_url + "/v1/infer", json=body, headers=headers, timeout=300)

    started = time.monotonic()
    assert infer(STEPS).status_code == 200  # loads the model, and paces the kill below
    one = time.monotonic() - started
    [victim] = replica_pids(TEXT_TO_IMAGE_ACTOR)
    with ThreadPoolExecutor(max_workers=2) as pool:
        running = [pool.submit(infer, STEPS) for _ in range(2)]
        time.sleep(min(one / 3, 5.0))  # pacing only: both generations are under way
        os.kill(victim, signal.SIGKILL)
        answers = [future.result() for future in running]
    print(f"a generation took {one:.1f} s; answers after the kill: {[a.status_code for a in answers]}")
    assert {a.status_code for a in answers} <= {200, 503}, [a.text[:300] for a in answers]
    assert any(a.status_code == 503 for a in answers), "no generation was caught by the kill"
    for answer in answers:
        if answer.status_code == 503:
            assert answer.json()["error"]["code"] == "service_unavailable", answer.text
            assert int(answer.headers["Retry-After"]) >= 1
    wait_for(lambda: replica_pids(TEXT_TO_IMAGE_ACTOR), lambda pids: bool(pids) and victim not in pids,
             timeout=180, what="Serve replacing the killed replica")
    wait_for(lambda: infer(2).status_code, lambda status: status == 200, timeout=180, interval=2,
             what="a generation after the replacement")


def test_with_the_rate_limiter_down_requests_flow_on_a_per_replica_share(
    service: tuple[ServeInstance, str, Path],
) -> None:
    """The RateLimiter replica killed: requests are still answered (not 503), and /health says
    the limits are a per-replica share until the limiter answers again."""
    from deployments.rate_limiter import DEGRADED_MESSAGE

    instance, _, _ = service
    body = {"image": png_b64(), "top_k": 1}
    headers = {"Authorization": f"Bearer {TEST_API_KEY}"}
    [victim] = replica_pids(LIMITER_ACTOR)
    os.kill(victim, signal.SIGKILL)
    seen: list[tuple[int, list[str]]] = []

    def classify_then_health() -> tuple[int, list[str]]:
        status = requests.post(instance.base_url + "/v1/classify", json=body, headers=headers,
                               timeout=60).status_code
        health = requests.get(instance.base_url + "/health", headers=instance.auth(), timeout=30)  # admin
        seen.append((status, health.json()["errors"]))
        return seen[-1]

    # The replica's lease of the key's limit lasts a second; the next request asks the limiter.
    wait_for(classify_then_health, lambda result: DEGRADED_MESSAGE in result[1], timeout=60,
             what="/health showing the per-replica share")
    assert {status for status, _ in seen} == {200}, seen
    wait_for(lambda: replica_pids(LIMITER_ACTOR), lambda pids: bool(pids) and victim not in pids,
             timeout=180, what="Serve replacing the limiter")
    wait_for(classify_then_health, lambda result: result == (200, []), timeout=60,
             what="shared limits back once the limiter answers")


def test_usage_of_a_sigkilled_ingress_replica_is_not_lost(service: tuple[ServeInstance, str, Path]) -> None:
    from ray import serve

    instance, database_url, state_dir = service
    with AccountStore(database_url) as store:
        key = store.create_key("durability", ["classify"], "100000/minute").key
        key_id = store.lookup_key(key)
    assert key_id is not None
    body = {"image": png_b64(), "top_k": 1}
    headers = {"Authorization": f"Bearer {key}"}

    def send() -> int:
        url = instance.base_url + "/v1/classify"
        return requests.post(url, json=body, headers=headers, timeout=60).status_code

    [victim] = ingress_pids()
    killed = threading.Event()
    with background_load(send, clients=CLIENTS, max_requests=REQUESTS) as stats:
        wait_for(lambda: stats.sent, lambda sent: sent >= REQUESTS // 3, timeout=300,
                 what="a third of the load")
        os.kill(victim, signal.SIGKILL)
        killed.set()
        replaced = wait_for(
            ingress_pids, lambda pids: bool(pids) and victim not in pids, timeout=180,
            what="Serve replacing the killed ingress replica",
        )
        wait_for(lambda: replica_states("Ingress"), lambda states: states == {"RUNNING": 1}, timeout=180,
                 what="the new ingress replica running")
        wait_for(lambda: stats.sent, lambda sent: sent >= REQUESTS, timeout=300, what="the rest of the load")
    statuses = stats.snapshot()
    answered = sum(count for status, count in statuses.items() if 200 <= status < 500)
    assert killed.is_set() and replaced and sum(statuses.values()) == REQUESTS
    assert statuses.get(200, 0) > REQUESTS // 3, statuses  # the service came back

    serve.delete(APP_NAME)  # graceful: the replacement drains its queue into the database
    with AccountStore(database_url) as store:
        recorded = store.usage_summary(key_id.id).total_requests
    print(f"answers by status {statuses}; {answered} answered, {recorded} recorded")
    assert answered <= recorded <= answered + CLIENTS, (statuses, recorded)
    journal = state_dir / "usage-journal"
    assert journal.is_dir() and list(journal.glob("*.usage")) == []  # everything shipped and deleted

