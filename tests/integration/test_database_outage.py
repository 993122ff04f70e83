"""The database down, the service up: PostgreSQL refusing the service's connections mid-traffic.

The service uses a fresh database on the local PostgreSQL server. The outage is made without
touching the shared server: the database stops accepting connections (``ALLOW_CONNECTIONS
false``) and the service's connections are terminated (``pg_terminate_backend``). Meanwhile a key
the ingress had already looked up keeps working past its cache TTL (the stale grace), a key it
never saw and key management answer 503 in the documented shape, and once the database is back
every answered request's usage reaches it. Skipped when PostgreSQL is unreachable, unless
SEALSERVE_REQUIRE_POSTGRES=1.
"""

from __future__ import annotations

import base64
import io
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from PIL import Image
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

from lib.accounts.store import AccountStore
from tests.postgres_schema import REQUIRE_ENV, postgres_base_url
from tests.serve_harness import (
    TEST_API_KEY,
    ServeInstance,
    serving_demo_models,
    wait_for,
)

pytestmark = pytest.mark.postgres
KEY_CACHE_TTL_S = 1.0
DURING_OUTAGE = 12


def admin_sql(statement: str, **params: str) -> None:
    engine = create_engine(postgres_base_url(), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text(statement), params)
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def database_url() -> Iterator[str]:
    name = f"sealserve_outage_{uuid.uuid4().hex[:10]}"
    try:
        admin_sql(f'CREATE DATABASE "{name}"')
    except OperationalError as exc:
        reason = f"PostgreSQL not reachable ({type(exc.orig).__name__})"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        yield postgres_base_url().set(database=name).render_as_string(hide_password=False)
    finally:
        admin_sql(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        admin_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def api(
    database_url: str, demo_models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServeInstance]:
    args = {"accounts": {"key_cache_ttl_s": KEY_CACHE_TTL_S, "usage_flush_interval_s": 0.5}}
    environment = {"env_vars": {"DATABASE_URL": database_url}}
    ingress = {"num_replicas": 1, "ray_actor_options": {"runtime_env": environment}}
    with serving_demo_models(demo_models_dir, tmp_path_factory, args, {"Ingress": ingress}) as instance:
        yield instance


def png_b64() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 120, 20)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_known_keys_work_and_usage_arrives_after_a_database_outage(
    api: ServeInstance, database_url: str
) -> None:
    name = database_url.rsplit("/", 1)[-1].split("?")[0]
    with AccountStore(database_url) as store:
        known = store.create_key("known", ["classify"], "100000/minute")
        unseen = store.create_key("unseen", ["classify"], "100000/minute")
    body = {"image": png_b64(), "top_k": 1}

    def classify(key: str) -> requests.Response:
        return api.post("/v1/classify", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)

    assert classify(known.key).status_code == 200  # the ingress has now looked the key up
    admin_sql(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
    admin_sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :name", name=name)
    try:
        statuses = []
        for _ in range(DURING_OUTAGE):
            statuses.append(classify(known.key).status_code)
            time.sleep(KEY_CACHE_TTL_S / 2)  # pacing: the outage outlasts the key's cache TTL
        refused = classify(unseen.key)
        new_key = {"name": "x", "scopes": ["classify"], "rate_limit": "9/minute"}
        admin = {"Authorization": f"Bearer {TEST_API_KEY}"}
        management = api.post("/v1/admin/keys", json=new_key, headers=admin)
    finally:
        admin_sql(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
    assert statuses == [200] * DURING_OUTAGE
    for response in (refused, management):
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "service_unavailable"
        assert int(response.headers["Retry-After"]) >= 1

    def recorded() -> int:
        with AccountStore(database_url) as store:
            return store.usage_summary(known.record.id).total_requests

    wait_for(recorded, lambda n: n == DURING_OUTAGE + 1, timeout=120,
             what="the outage's usage in the database")
