"""No key can pin a replica: compute budgets, concurrency caps, authentication before the body and
bounded image decoding, through real HTTP against a real Serve instance with two ingress replicas.

What an attacker holding one ordinary key (or none) would try: spend more compute than the key's
budget by spreading requests over the replicas, run more generations at once than its cap, make
the ingress hold large anonymous bodies, and stall the classifier with a hostile data: URL.
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil
import pytest
import requests
from PIL import Image

from tests.serve_harness import (
    APP_NAME,
    TEST_API_KEY,
    ServeInstance,
    serving_demo_models,
    wait_for,
)

ADMIN = {"Authorization": f"Bearer {TEST_API_KEY}"}
MIB = 1024 * 1024
DEFAULT_STEPS = 2


@pytest.fixture(scope="module")
def api(demo_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeInstance]:
    args = {
        "default_inference_steps": DEFAULT_STEPS,
        "accounts": {
            "database_url": f"sqlite:///{tmp_path_factory.mktemp('db') / 'accounts.db'}",
            "usage_flush_interval_s": 0.5,
        },
    }
    ingress = {"num_replicas": 2, "ray_actor_options": {"num_cpus": 0.25}}
    with serving_demo_models(demo_models_dir, tmp_path_factory, args, {"Ingress": ingress}) as instance:
        yield instance


@pytest.fixture(scope="module")
def models(api: ServeInstance) -> dict[str, str]:
    listed = api.get("/v1/models", headers=ADMIN).json()["models"]
    return {m["kind"]: m["id"] for m in listed if m["kind"]}


def create_key(api: ServeInstance, **fields: Any) -> tuple[str, dict[str, str]]:
    body = {"name": f"t-{uuid.uuid4().hex[:6]}", "scopes": ["infer", "classify"], "rate_limit": "1000/minute"}
    response = api.post("/v1/admin/keys", json={**body, **fields}, headers=ADMIN)
    assert response.status_code == 201, response.text
    return response.json()["id"], {"Authorization": f"Bearer {response.json()['key']}"}


def all_at_once(calls: list[Callable[[], requests.Response]]) -> list[requests.Response]:
    """Every call in its own thread, released together."""
    barrier = threading.Barrier(len(calls))

    def run(call: Callable[[], requests.Response]) -> requests.Response:
        barrier.wait()
        return call()

    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        return list(pool.map(run, calls))


def generation(model_id: str, **fields: Any) -> dict[str, Any]:
    return {"id": uuid.uuid4().hex, "model_id": model_id, "prompt": "a red square", "seed": 1, **fields}


def png_b64() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_the_graph_has_two_ingress_replicas_and_one_limiter(api: ServeInstance) -> None:
    from ray import serve
    from ray.serve.schema import ReplicaState

    deployments = serve.status().applications[APP_NAME].deployments
    assert deployments["Ingress"].replica_states.get(ReplicaState.RUNNING) == 2
    assert deployments["RateLimiter"].replica_states.get(ReplicaState.RUNNING) == 1


# --- compute budgets and concurrency caps ---------------------------------------------------------


def test_a_budget_holds_exactly_across_two_ingress_replicas(
    api: ServeInstance, models: dict[str, str]
) -> None:
    key_id, key = create_key(api, budget="20/hour", max_concurrent=None)
    body = generation(models["text-to-image"], width=512, height=512, num_inference_steps=4)  # cost 4
    responses = all_at_once([lambda: api.post("/v1/infer", json=body, headers=key)] * 8)
    assert Counter(r.status_code for r in responses) == {200: 5, 429: 3}, [r.text for r in responses]
    allowed = [r for r in responses if r.status_code == 200]
    assert {r.headers["X-Cost"] for r in allowed} == {"4"}
    # One budget for the whole application: every admitted request saw a different remainder.
    assert sorted(int(r.headers["X-Budget-Remaining"]) for r in allowed) == [0, 4, 8, 12, 16]
    for refused in (r for r in responses if r.status_code == 429):
        error = refused.json()["error"]
        assert error["code"] == "rate_limited" and "budget of 20/hour" in error["message"]
        assert 3000 < int(refused.headers["Retry-After"]) <= 3600
        assert refused.headers["X-Cost"] == "0"
    # Nothing is left, whatever the replica: a classify (cost 1) is refused too.
    for _ in range(4):
        classify = api.post("/v1/classify", json={"image": png_b64()}, headers=key)
        assert classify.status_code == 429 and classify.headers["X-Budget-Remaining"] == "0"
    # The costs reach usage: the key's own report and the admin statistics.
    usage = wait_for(
        lambda: api.get("/v1/usage", headers=key).json(),
        lambda u: [u["by_endpoint"].get(f"POST /v1/{e}") for e in ("infer", "classify")] == [8, 4],
        timeout=30,
        what="usage of the budget key",
    )
    assert usage["total_cost"] == 20
    stats = api.get("/v1/admin/usage?by=key", headers=ADMIN).json()["groups"]
    assert {g["group"]: g["cost"] for g in stats}[key_id] == 20


def test_a_concurrency_cap_holds_across_two_ingress_replicas(
    api: ServeInstance, models: dict[str, str]
) -> None:
    key_id, key = create_key(api, budget=None, max_concurrent=2)
    assert api.get(f"/v1/admin/keys/{key_id}", headers=ADMIN).json()["max_concurrent"] == 2
    # Heavy enough to be running for a while (seconds on a CPU), light enough to finish soon.
    heavy = generation(models["text-to-image"], width=512, height=512, num_inference_steps=10, num_images=2)
    light = {**heavy, "num_inference_steps": 1, "num_images": 1}
    assert_capped(api, key, heavy, light, cap=2)
    # A cap changed by the admin API applies within the key cache TTL (5 s by default).
    changed = requests.patch(
        api.base_url + f"/v1/admin/keys/{key_id}", json={"max_concurrent": 1}, headers=ADMIN, timeout=30
    )
    assert changed.status_code == 200 and changed.json()["max_concurrent"] == 1
    for _ in range(10):  # each replica re-reads the key within its cache TTL
        try:
            assert_capped(api, key, heavy, light, cap=1)
            break
        except CapNotYetApplied:
            continue
    else:
        raise AssertionError("the lowered cap never applied")


class CapNotYetApplied(Exception):
    pass


def assert_capped(
    api: ServeInstance, key: dict[str, str], heavy: dict[str, Any], light: dict[str, Any], cap: int
) -> None:
    """``cap`` heavy generations hold the key's slots; every other generation of the key, on
    either replica, is refused while they surely hold them; afterwards the slots are free again.

    Surely, without trusting timing: a heavy one sent at ``t0`` (client clock) holds its slot from
    its admission (the probes start a second later, after it) until after its generation ended,
    which is after ``t0 + processing_time`` (its generation started after ``t0`` and lasted that
    long, as the response reports). A probe answered before ``t0 + min(processing_time)`` was
    therefore admitted or refused while all ``cap`` slots were held: it must have been refused.
    Later probes decide nothing. When no probe was decided, the heavy ones are made heavier.
    """
    body = dict(heavy)
    for _ in range(3):
        decided, finished = _probe_while_running(api, key, body, light, cap)
        if cap == 1 and any(p.status_code == 200 for p in decided):
            raise CapNotYetApplied  # a replica's cached key still had the old cap
        if decided:
            break
        body["num_inference_steps"] = min(150, body["num_inference_steps"] * 3)
    else:
        raise AssertionError("no probe was answered while the heavy generations surely ran")
    assert {p.status_code for p in decided} == {429}, [p.text for p in decided]
    for refused in decided:
        assert f"maximum of {cap} concurrent generations" in refused.json()["error"]["message"]
        assert refused.headers["Retry-After"] == "1" and refused.headers["X-Cost"] == "0"
    expected_cost = str(body["num_inference_steps"] * body["num_images"])  # 512x512
    assert {r.headers["X-Cost"] for r in finished} == {expected_cost}


def _probe_while_running(
    api: ServeInstance, key: dict[str, str], heavy: dict[str, Any], light: dict[str, Any], cap: int
) -> tuple[list[requests.Response], list[requests.Response]]:
    with ThreadPoolExecutor(max_workers=cap) as pool:
        sent_at = time.monotonic()
        running = [
            pool.submit(api.post, "/v1/infer", json=heavy, headers=key, timeout=600) for _ in range(cap)
        ]
        # Let them take their slots first (a wait, not a measurement: a probe that took a slot
        # before them would show as a refused heavy one, and fail the test).
        threading.Event().wait(1.0)
        probes: list[tuple[float, requests.Response]] = []
        while not all(f.done() for f in running) and len(probes) < 50:
            probe = api.post("/v1/infer", json=light, headers=key)
            probes.append((time.monotonic(), probe))
        finished = [f.result() for f in running]
    assert [r.status_code for r in finished] == [200] * cap, [r.text for r in finished]
    # (processing_time is rounded to 0.1 ms: a millisecond less covers it)
    surely_held_until = sent_at + min(float(r.json()["processing_time"]) for r in finished) - 0.001
    decided = [probe for answered_at, probe in probes if answered_at < surely_held_until]
    # The slots come back when the requests end: the next generation is admitted again.
    wait_for(
        lambda: api.post("/v1/infer", json=light, headers=key).status_code,
        lambda status: status == 200,
        timeout=30,
        what="a slot free again",
    )
    return decided, finished


# --- authentication before the body ---------------------------------------------------------------


def ingress_pids() -> list[int]:
    """The ingress replicas' processes of this test's Ray (Ray titles an actor's process after
    its class; this process started Ray, so it is an ancestor of each of its workers)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if cmdline and cmdline[0].startswith(f"ray::ServeReplica:{APP_NAME}:Ingress"):
            try:
                if any(parent.pid == os.getpid() for parent in process.parents()):
                    found.append(process.pid)
            except psutil.Error:
                continue
    return found


def peak_rss_bytes(pid: int) -> int:
    """VmHWM: the most resident memory the process has ever held."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for {pid}")


def post_raw(base_url: str, path: str, *, declared: int, send: int, headers: str = "") -> int:
    """POST declaring ``declared`` body bytes, sending ``send`` of them (on another thread) while
    waiting for the answer; returns its status, 0 when the connection closed without one."""
    url = urlsplit(base_url)
    sock = socket.create_connection((url.hostname, url.port), timeout=60)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {url.hostname}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {declared}\r\n{headers}\r\n"
    )
    sock.sendall(head.encode())

    def send_body() -> None:
        chunk = b"[" * (256 * 1024)
        try:
            for _ in range(send // len(chunk)):
                sock.sendall(chunk)
        except OSError:
            pass  # the server answered and closed: the rest is not wanted

    sender = threading.Thread(target=send_body, daemon=True)
    sender.start()
    received = b""
    try:
        while b"\r\n" not in received:
            part = sock.recv(4096)
            if not part:
                break
            received += part
    finally:
        sock.close()
        sender.join(timeout=60)
    return int(received.split(b" ")[1]) if received.startswith(b"HTTP/1.1 ") else 0


def test_large_anonymous_bodies_get_401_without_being_read(api: ServeInstance) -> None:
    pids = ingress_pids()
    assert len(pids) == 2, f"ingress processes not found: {pids}"
    before = {pid: peak_rss_bytes(pid) for pid in pids}
    size = 19 * MIB
    # Declared and not sent at all: answered anyway, so the body was never waited for.
    for path in ("/v1/classify", "/v1/infer", "/v1/auth/token"):
        assert post_raw(api.base_url, path, declared=size, send=0) == 401
        bad = "Authorization: Bearer x\r\n"
        assert post_raw(api.base_url, path, declared=size, send=0, headers=bad) == 401
    # Sent in full, several at once, more than once: the ingress's peak does not grow by them.
    for _ in range(2):
        with ThreadPoolExecutor(max_workers=4) as pool:
            statuses = list(pool.map(
                lambda path: post_raw(api.base_url, path, declared=size, send=size),
                ["/v1/classify", "/v1/infer", "/v1/classify", "/v1/infer"],
            ))
        assert statuses == [401] * 4
    grown = {pid: peak_rss_bytes(pid) - before[pid] for pid in pids}
    # 8 bodies of 19 MiB (152 MiB) were sent; a replica that read one would grow by 19 MiB or more.
    assert all(growth < 8 * MIB for growth in grown.values()), grown
    # An authenticated body over its route's cap is refused up front as well.
    assert post_raw(api.base_url, "/v1/infer", declared=size, send=0,
                    headers=f"Authorization: Bearer {TEST_API_KEY}\r\n") == 413


# --- bounded image decoding -----------------------------------------------------------------------


def test_a_hostile_data_url_is_refused_while_ordinary_classifies_are_answered(api: ServeInstance) -> None:
    hostile = json.dumps({"image": "data:image/png" + ";" * (19 * MIB) + ",AAAA"})
    ordinary = {"image": png_b64()}
    bomb = {"image": "data:image/png;base64," + base64.b64encode(_png_claiming(4097, 4096)).decode()}

    def post_hostile() -> requests.Response:
        headers = {**ADMIN, "Content-Type": "application/json"}
        return requests.post(api.base_url + "/v1/classify", data=hostile, headers=headers, timeout=120)

    calls: list[Callable[[], requests.Response]] = [post_hostile, post_hostile]
    calls += [lambda: api.post("/v1/classify", json=ordinary, headers=ADMIN, timeout=120)] * 6
    calls += [lambda: api.post("/v1/classify", json=bomb, headers=ADMIN, timeout=120)]
    responses = all_at_once(calls)
    for refused in responses[:2]:
        assert refused.status_code == 400, refused.text
        assert "first 256 characters" in refused.json()["error"]["message"]
    for answered in responses[2:8]:
        assert answered.status_code == 200, answered.text
        assert answered.json()["predictions"]
    assert responses[8].status_code == 413 and "4097x4096" in responses[8].text


def _png_claiming(width: int, height: int) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
