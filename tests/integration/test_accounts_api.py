"""Accounts end to end: API keys, tokens, scopes, rate limits and usage through a real Serve instance.

Everything runs once per database backend: a SQLite file (its URL in the app args) and
PostgreSQL in a throwaway schema (its URL, with a password, in the ingress's DATABASE_URL). The
PostgreSQL run is skipped with the reason when the server is unreachable, unless
SEALSERVE_REQUIRE_POSTGRES=1 (CI), where that fails.

One Serve instance per backend, with two ingress replicas (so the rate limit is shown to hold
across replicas) and usage written only every hour (so the last test, which ends the instance
with ``serve.delete``, shows the usage drained on graceful shutdown rather than by the timer).
"""

from __future__ import annotations

import base64
import io
import json
import logging
import re
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
from PIL import Image

from lib.accounts.store import AccountStore, UsageRecord
from tests.postgres_schema import temporary_schema
from tests.serve_harness import (
    APP_NAME,
    TEST_API_KEY,
    TEST_SECRET_KEY,
    ServeInstance,
    serving_demo_models,
)

KEY_CACHE_TTL_S = 1.0
BOOTSTRAP_LIMIT = 1000  # the default accounts.bootstrap_rate_limit, 1000/minute
RATE_HEADERS = ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset")
PG_PASSWORD = f"pg-password-{uuid.uuid4().hex}"  # trust auth ignores it; it must never be logged
# Every credential this module sends or receives: none may appear in any log line.
SECRETS: set[str] = {TEST_API_KEY, TEST_SECRET_KEY, PG_PASSWORD}


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def driver_log_lines() -> Iterator[list[str]]:
    """Every log record this (driver) process handles while the module runs, formatted.

    Taken at ``Logger.handle``, so records of loggers that do not propagate to the root (Ray's
    own, e.g. ``ray.serve``) are seen too, whatever handlers Ray installs or replaces.
    """
    lines: list[str] = []
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    original = logging.Logger.handle

    def handle(logger: logging.Logger, record: logging.LogRecord) -> None:
        lines.append(formatter.format(record))
        original(logger, record)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(logging.Logger, "handle", handle)
        yield lines


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('accounts-db') / 'accounts.db'}"
        return
    with temporary_schema("sealserve_it") as url:
        yield url.set(password=PG_PASSWORD).render_as_string(hide_password=False)


@pytest.fixture(scope="module")
def api(
    database_url: str,
    driver_log_lines: list[str],
    demo_models_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ServeInstance]:
    accounts: dict[str, Any] = {
        "key_cache_ttl_s": KEY_CACHE_TTL_S,
        "key_cache_negative_ttl_s": 0.5,
        # Longer than the module runs: usage reaches the database only when the replicas stop.
        "usage_flush_interval_s": 3600,
        "usage_batch_size": 10_000,
    }
    ingress: dict[str, Any] = {"num_replicas": 2, "ray_actor_options": {"num_cpus": 0.25}}
    if database_url.startswith("sqlite"):
        accounts["database_url"] = database_url
    else:
        # The production way: a URL with a password comes from the ingress's environment.
        ingress["ray_actor_options"]["runtime_env"] = {"env_vars": {"DATABASE_URL": database_url}}
    args = {"accounts": accounts}
    with serving_demo_models(demo_models_dir, tmp_path_factory, args, {"Ingress": ingress}) as instance:
        yield instance


@pytest.fixture
def store(database_url: str) -> Iterator[AccountStore]:
    """The database the service uses, opened directly (as `sealserve keys` does)."""
    with AccountStore(database_url) as account_store:
        yield account_store


# --- helpers --------------------------------------------------------------------------------------


def bearer(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


ADMIN = bearer(TEST_API_KEY)


def create_key(api: ServeInstance, scopes: list[str], rate_limit: str, **fields: Any) -> dict[str, Any]:
    body = {"name": f"test-{uuid.uuid4().hex[:6]}", "scopes": scopes, "rate_limit": rate_limit, **fields}
    response = api.post("/v1/admin/keys", json=body, headers=ADMIN)
    assert response.status_code == 201, response.text
    created = dict(response.json())
    SECRETS.add(created["key"])
    return created


def get_token(api: ServeInstance, key: str) -> str:
    response = api.post("/v1/auth/token", headers=bearer(key))
    assert response.status_code == 200, response.text
    token = str(response.json()["access_token"])
    SECRETS.add(token)
    return token


def make_jwt(secret: str = TEST_SECRET_KEY, **overrides: Any) -> str:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": "sealserve", "aud": "sealserve-api", "sub": "someone", "scopes": ["infer"],
        "iat": now, "nbf": now, "exp": now + 300, "jti": uuid.uuid4().hex,
    }
    claims.update(overrides)
    token = jwt.encode(claims, secret, algorithm="HS256")
    SECRETS.add(token)
    return token


def assert_error(response: requests.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code


def assert_rate_headers(response: requests.Response, limit: int) -> None:
    assert response.headers["X-RateLimit-Limit"] == str(limit)
    assert 0 <= int(response.headers["X-RateLimit-Remaining"]) < limit
    assert 0 <= int(response.headers["X-RateLimit-Reset"]) <= 86_400


def delete(api: ServeInstance, path: str, **kwargs: Any) -> requests.Response:
    return requests.delete(api.base_url + path, timeout=60, **kwargs)


def png_b64() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def concurrently(calls: list[Callable[[], requests.Response]], workers: int) -> list[requests.Response]:
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda call: call(), calls))


# --- keys and the admin API -----------------------------------------------------------------------


def test_admin_creates_lists_gets_and_refuses_bad_keys(api: ServeInstance) -> None:
    response = api.post(
        "/v1/admin/keys",
        json={"name": "ci", "scopes": ["infer", "classify"], "rate_limit": "60/minute",
              "expires_in": "30d", "owner_email": "Dev@Example.com"},
        headers=ADMIN,
    )
    assert response.status_code == 201, response.text
    assert response.headers["Cache-Control"] == "no-store"
    created = response.json()
    SECRETS.add(created["key"])
    assert re.fullmatch(r"ss_[A-Za-z0-9_-]{43}", created["key"])
    assert created["prefix"] == created["key"][:10]
    assert created["scopes"] == ["infer", "classify"] and created["rate_limit"] == "60/minute"
    assert created["owner_email"] == "dev@example.com" and created["revoked"] is False
    expires = datetime.fromisoformat(created["expires_at"])
    assert abs(expires - datetime.now(timezone.utc) - timedelta(days=30)) < timedelta(minutes=5)

    listing = api.get("/v1/admin/keys", headers=ADMIN).json()
    assert listing["count"] == len(listing["keys"])
    listed = {k["id"]: k for k in listing["keys"]}
    assert created["id"] in listed and "key" not in listed[created["id"]]
    assert created["key"] not in json.dumps(listing)
    one = api.get(f"/v1/admin/keys/{created['id']}", headers=ADMIN).json()
    assert one == listed[created["id"]]

    bad: dict[str, Any]
    for bad in (
        {"scopes": ["root"]}, {"scopes": []}, {"rate_limit": "60/fortnight"}, {"rate_limit": "0/minute"},
        {"expires_in": "soon"}, {"name": ""}, {"surprise": 1},
    ):
        body = {"name": "bad", "scopes": ["infer"], "rate_limit": "1/second", **bad}
        assert_error(api.post("/v1/admin/keys", json=body, headers=ADMIN), 422, "validation_error")
    assert_error(api.get("/v1/admin/keys/nope", headers=ADMIN), 404, "not_found")
    assert_error(delete(api, "/v1/admin/keys/nope", headers=ADMIN), 404, "not_found")


def test_bootstrap_key_has_every_scope_and_the_bootstrap_limit(api: ServeInstance) -> None:
    for path in ("/v1/models", "/v1/admin/keys", "/v1/usage"):
        response = api.get(path, headers=ADMIN)
        assert response.status_code == 200, response.text
        assert_rate_headers(response, BOOTSTRAP_LIMIT)


def test_key_created_directly_in_the_database_works(api: ServeInstance, store: AccountStore) -> None:
    created = store.create_key("from the CLI", "infer", "5/second")
    SECRETS.add(created.key)
    response = api.get("/v1/models", headers=bearer(created.key))
    assert response.status_code == 200, response.text
    assert_rate_headers(response, 5)


def test_missing_scope_is_403_with_rate_headers(api: ServeInstance) -> None:
    key = create_key(api, ["classify"], "30/minute")["key"]
    response = api.get("/v1/models", headers=bearer(key))
    assert_error(response, 403, "forbidden")
    assert_rate_headers(response, 30)
    assert_error(api.get("/v1/admin/keys", headers=bearer(key)), 403, "forbidden")
    assert_error(api.post("/v1/admin/keys", json={}, headers=bearer(key)), 403, "forbidden")
    assert_error(
        api.post("/v1/infer", json={"id": "x", "model_id": "m", "prompt": "p"}, headers=bearer(key)),
        403, "forbidden",
    )
    # A token carries its key's scopes, no more.
    token = get_token(api, key)
    assert_error(api.get("/v1/models", headers=bearer(token)), 403, "forbidden")


# --- tokens ---------------------------------------------------------------------------------------


def test_token_exchange_gives_a_jwt_limited_as_its_key(api: ServeInstance) -> None:
    created = create_key(api, ["infer"], "5/minute")
    key = created["key"]
    response = api.post("/v1/auth/token", headers=bearer(key))  # hit 1
    assert response.status_code == 200, response.text
    assert response.headers["Cache-Control"] == "no-store"
    body = response.json()
    token = body["access_token"]
    SECRETS.add(token)
    assert (body["token_type"], body["expires_in"], body["scope"]) == ("bearer", 900, "infer")
    assert jwt.get_unverified_header(token)["alg"] == "HS256"
    claims = jwt.decode(token, TEST_SECRET_KEY, algorithms=["HS256"], audience="sealserve-api",
                        issuer="sealserve")
    assert {"iss", "aud", "exp", "iat", "nbf", "jti", "sub"} <= set(claims)
    assert claims["sub"] == created["id"] and claims["scopes"] == ["infer"]
    assert claims["exp"] - claims["iat"] == 900

    # A token cannot renew itself.
    assert_error(api.post("/v1/auth/token", headers=bearer(token)), 403, "forbidden")  # hit 2
    # The key and its token share one budget of 5.
    statuses = [api.get("/v1/models", headers=bearer(c)).status_code for c in (token, key, token)]
    assert statuses == [200, 200, 200]  # hits 3-5
    for credential in (token, key):
        refused = api.get("/v1/models", headers=bearer(credential))
        assert_error(refused, 429, "rate_limited")
        assert refused.headers["X-RateLimit-Limit"] == "5"
        assert refused.headers["X-RateLimit-Remaining"] == "0"
        assert int(refused.headers["Retry-After"]) >= 1


# --- refused credentials --------------------------------------------------------------------------


def _expired_key(database_url: str) -> str:
    now = datetime.now(timezone.utc)
    # Created by a store whose clock is an hour behind, so an expiry a minute ago is allowed.
    with AccountStore(database_url, clock=lambda: now - timedelta(hours=1)) as behind:
        created = behind.create_key("expired", "infer", "5/second", expires_at=now - timedelta(minutes=1))
    SECRETS.add(created.key)
    return created.key


def _alg_none_token() -> str:
    header = base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').rstrip(b"=").decode()
    payload = make_jwt().split(".")[1]
    token = f"{header}.{payload}."
    SECRETS.add(token)
    return token


CREDENTIALS: dict[str, Callable[[str], str]] = {
    "unknown-key": lambda _: "ss_" + "A" * 43,
    "malformed-key": lambda _: "ss_short",
    "not-a-key": lambda _: "hello world",
    "expired-key": _expired_key,
    "expired-jwt": lambda _: make_jwt(exp=int(time.time()) - 120, iat=int(time.time()) - 300,
                                      nbf=int(time.time()) - 300),
    "jwt-not-yet-valid": lambda _: make_jwt(nbf=int(time.time()) + 300),
    "jwt-other-secret": lambda _: make_jwt(secret="another-secret-that-is-at-least-32-bytes-long"),
    "jwt-alg-none": lambda _: _alg_none_token(),
    "jwt-other-audience": lambda _: make_jwt(aud="another-api"),
}


@pytest.mark.parametrize("make_credential", CREDENTIALS.values(), ids=CREDENTIALS.keys())
def test_invalid_credentials_are_401(
    api: ServeInstance, database_url: str, make_credential: Callable[[str], str]
) -> None:
    credential = make_credential(database_url)
    for response in (
        api.get("/v1/models", headers=bearer(credential)),
        api.post("/v1/auth/token", headers=bearer(credential)),
        api.get("/v1/usage", headers=bearer(credential)),
    ):
        assert_error(response, 401, "unauthorized")
        assert credential not in response.text
        assert not set(RATE_HEADERS) & set(response.headers)  # nobody to count against


def test_revoked_key_and_its_tokens_stop_within_the_cache_ttl(api: ServeInstance) -> None:
    created = create_key(api, ["infer"], "100/minute")
    key = created["key"]
    token = get_token(api, key)
    for _ in range(4):  # on both replicas, most likely: each now has the key cached
        for credential in (key, token):
            assert api.get("/v1/models", headers=bearer(credential)).status_code == 200
    revoked = delete(api, f"/v1/admin/keys/{created['id']}", headers=ADMIN)
    assert revoked.status_code == 200 and revoked.json()["revoked"] is True
    time.sleep(KEY_CACHE_TTL_S + 0.25)
    for _ in range(6):
        for credential in (key, token):
            assert_error(api.get("/v1/models", headers=bearer(credential)), 401, "unauthorized")
    listed = {k["id"]: k for k in api.get("/v1/admin/keys", headers=ADMIN).json()["keys"]}
    assert listed[created["id"]]["revoked"] is True
    active = api.get("/v1/admin/keys?include_revoked=false", headers=ADMIN).json()["keys"]
    assert created["id"] not in {k["id"] for k in active}


# --- rate limits ----------------------------------------------------------------------------------


def test_rate_limit_holds_across_two_ingress_replicas(api: ServeInstance) -> None:
    from ray import serve
    from ray.serve.schema import ReplicaState

    deployments = serve.status().applications[APP_NAME].deployments
    assert deployments["Ingress"].replica_states.get(ReplicaState.RUNNING) == 2
    assert deployments["RateLimiter"].replica_states.get(ReplicaState.RUNNING) == 1

    key = create_key(api, ["infer"], "10/minute")["key"]
    responses = concurrently([lambda: api.get("/v1/models", headers=bearer(key))] * 20, workers=20)
    assert Counter(r.status_code for r in responses) == {200: 10, 429: 10}
    for response in responses:
        assert response.headers["X-RateLimit-Limit"] == "10"
        if response.status_code == 429:
            assert response.json()["error"]["code"] == "rate_limited"
            assert 1 <= int(response.headers["Retry-After"]) <= 60
            assert response.headers["X-RateLimit-Remaining"] == "0"
    remaining = sorted(int(r.headers["X-RateLimit-Remaining"]) for r in responses if r.status_code == 200)
    assert remaining == list(range(10))  # one counter: every allowed hit saw a different count


# --- usage reports --------------------------------------------------------------------------------


def test_own_usage_and_admin_stats_report_the_database(api: ServeInstance, store: AccountStore) -> None:
    created = create_key(api, ["infer"], "100/minute")
    key_id, key = created["id"], created["key"]
    model = f"model-{uuid.uuid4().hex[:8]}"
    now = datetime.now(timezone.utc)
    store.record_usage([
        UsageRecord(key_id, "POST /v1/infer", 200, 100.0, model_id=model, image_count=2, timestamp=now),
        UsageRecord(key_id, "POST /v1/infer", 504, 300.0, model_id=model, timestamp=now),
        UsageRecord(key_id, "GET /v1/models", 200, 20.0, timestamp=now),
        UsageRecord(key_id, "GET /v1/models", 200, 20.0, timestamp=now - timedelta(days=3)),
    ])

    mine = api.get("/v1/usage", headers=bearer(key))
    assert mine.status_code == 200, mine.text
    assert_rate_headers(mine, 100)
    body = mine.json()
    assert body["key_id"] == key_id
    assert (body["total_requests"], body["successful_requests"], body["total_images"]) == (4, 3, 2)
    assert body["success_rate"] == pytest.approx(0.75)
    assert body["avg_response_time_ms"] == pytest.approx(110.0)
    assert body["by_endpoint"] == {"GET /v1/models": 2, "POST /v1/infer": 2}
    assert body["by_model"] == {model: 2}
    recent = api.get("/v1/usage?since=1d", headers=bearer(key)).json()
    assert recent["total_requests"] == 3

    summary = api.get(f"/v1/admin/usage/summary?key_id={key_id}&since=1d", headers=ADMIN).json()
    assert summary["total_requests"] == 3 and summary["key_id"] == key_id
    by_key = stats(api, "by=key")
    assert by_key[key_id]["requests"] == 4 and by_key[key_id]["images"] == 2
    by_model = stats(api, "by=model&since=7d")
    assert by_model[model]["requests"] == 2 and by_model[model]["success_rate"] == pytest.approx(0.5)
    assert {"GET /v1/models", "POST /v1/infer"} <= set(stats(api, "by=endpoint"))
    by_day = stats(api, "by=day&since=7d")
    assert {now.strftime("%Y-%m-%d"), (now - timedelta(days=3)).strftime("%Y-%m-%d")} <= set(by_day)

    assert_error(api.get("/v1/admin/usage?by=color", headers=ADMIN), 422, "validation_error")
    assert_error(api.get("/v1/usage?since=yesterday", headers=bearer(key)), 422, "validation_error")
    assert_error(api.get("/v1/admin/usage", headers=bearer(key)), 403, "forbidden")


def stats(api: ServeInstance, query: str) -> dict[str | None, dict[str, Any]]:
    response = api.get(f"/v1/admin/usage?{query}", headers=ADMIN)
    assert response.status_code == 200, response.text
    assert response.json()["by"] == query.split("&")[0].removeprefix("by=")
    return {group["group"]: group for group in response.json()["groups"]}


def test_usage_cleanup_deletes_only_old_records(api: ServeInstance, store: AccountStore) -> None:
    key_id = f"old-{uuid.uuid4().hex[:8]}"
    now = datetime.now(timezone.utc)
    store.record_usage(
        [UsageRecord(key_id, "GET /v1/models", 200, 1.0, timestamp=now - timedelta(days=100 + i))
         for i in range(3)]
        + [UsageRecord(key_id, "GET /v1/models", 200, 1.0, timestamp=now - timedelta(days=10))]
    )
    response = api.post("/v1/admin/usage/cleanup", json={"older_than": "90d"}, headers=ADMIN)
    assert response.status_code == 200, response.text
    assert response.json() == {"deleted": 3, "older_than": "90d"}
    assert store.usage_summary(key_id=key_id).total_requests == 1
    assert_error(api.post("/v1/admin/usage/cleanup", json={"older_than": "0d"}, headers=ADMIN),
                 422, "validation_error")


# --- last: recording, and the drain on graceful shutdown (ends this backend's instance) -----------


def ray_logs_dir() -> Path:
    import ray

    node = ray._private.worker.global_worker.node
    assert node is not None, "Ray is not running"
    return Path(node.get_logs_dir_path())


def _ingress_logs() -> list[Path]:
    return sorted((ray_logs_dir() / "serve").glob(f"replica_{APP_NAME}_Ingress_*.log"))


def _drain_lines() -> list[tuple[str, int, str]]:
    """(log file, line number, line) of every usage drain line, so that new ones can be told from
    old ones whichever replica log file they land in."""
    return [
        (path.name, number, line)
        for path in _ingress_logs()
        for number, line in enumerate(path.read_text(errors="replace").splitlines())
        if "usage recorder closed" in line
    ]


def test_zz_usage_is_recorded_and_drained_on_graceful_shutdown(
    api: ServeInstance, store: AccountStore, driver_log_lines: list[str]
) -> None:
    from ray import serve

    busy = create_key(api, ["infer"], "1000/minute")
    mixed = create_key(api, ["classify"], "5/minute")
    responses = concurrently(
        [lambda: api.get("/v1/models", headers=bearer(busy["key"]))] * 200, workers=50
    )
    assert Counter(r.status_code for r in responses) == {200: 200}
    classifier = None
    mixed_statuses = []
    for method, path, body in (  # 5/minute: the sixth request is over the limit
        ("post", "/v1/classify", {"image": png_b64(), "top_k": 2}),
        ("post", "/v1/classify", {"image": png_b64(), "top_k": 0}),  # 422 comes after authentication
        ("get", "/v1/models", None),  # no infer scope
        ("get", "/v1/models", None),
        ("post", "/v1/classify", {"image": png_b64()}),
        ("post", "/v1/classify", {"image": png_b64()}),
    ):
        kwargs: dict[str, Any] = {"headers": bearer(mixed["key"])}
        if body is not None:
            kwargs["json"] = body
        response = getattr(api, method)(path, **kwargs)
        mixed_statuses.append(response.status_code)
        if response.status_code == 200:
            classifier = response.json()["model"]
    assert mixed_statuses == [200, 422, 403, 403, 200, 429]

    drained_before = set(_drain_lines())
    assert store.usage_summary(key_id=busy["id"]).total_requests == 0  # all still queued in memory
    serve.delete(APP_NAME)  # graceful: drain requests, then each ingress replica's __del__

    busy_usage = store.usage_summary(key_id=busy["id"])
    assert busy_usage.total_requests == 200
    assert busy_usage.successful_requests == 200
    assert busy_usage.by_endpoint == {"GET /v1/models": 200}
    assert busy_usage.avg_response_time_ms > 0
    mixed_usage = store.usage_summary(key_id=mixed["id"])
    assert mixed_usage.total_requests == 6 and mixed_usage.successful_requests == 2
    assert mixed_usage.by_endpoint == {"GET /v1/models": 2, "POST /v1/classify": 4}
    assert mixed_usage.by_model == {str(classifier): 2}
    assert mixed_usage.total_images == 2
    # Both replicas drained their queues in __del__, with nothing left behind.
    drained = [entry[2] for entry in _drain_lines() if entry not in drained_before]
    assert len(drained) == 2, drained
    assert all(" 0 unwritten, 0 dropped" in line for line in drained), drained
    queued = [int(re.search(r"(\d+) queued at shutdown", line).group(1)) for line in drained]  # type: ignore[union-attr]
    assert sum(queued) >= 206  # this test's requests, and whatever earlier tests left queued

    _assert_no_secret_in_logs(driver_log_lines)


def _assert_no_secret_in_logs(driver_log_lines: list[str]) -> None:
    secrets = {s for s in SECRETS if len(s) >= 8}
    assert len(secrets) > 20  # keys, tokens, the JWT secret and the database password were all used
    leaks = []
    for path in ray_logs_dir().rglob("*"):
        if path.is_file() and not path.is_symlink():
            text = path.read_bytes()
            # Ray's runtime-env agent logs the env_vars of a runtime_env, which is how this test hands
            # the ingress its DATABASE_URL (docs/accounts.md says to use the nodes' environment).
            exempt = {PG_PASSWORD} if path.name.startswith("runtime_env") else set()
            leaks += [
                f"{path.name}: {secret[:6]}..." for secret in secrets - exempt if secret.encode() in text
            ]
    assert driver_log_lines, "no driver log line was captured: the check would be void"
    for line in driver_log_lines:
        leaks += [f"driver log: {secret[:6]}..." for secret in secrets if secret in line]
    assert leaks == []
