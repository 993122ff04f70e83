"""A throwaway PostgreSQL schema for a test: reachable server or a visible skip (a failure in CI).

The server is ``$DATABASE_URL`` when it names PostgreSQL, else the local default (user postgres,
trust auth, database ``test``). ``SEALSERVE_REQUIRE_POSTGRES=1`` (CI) turns "unreachable" from a
skip into a failure, so a broken CI database cannot pass silently.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool

from lib.db import redact_url

POSTGRES_DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
REQUIRE_ENV = "SEALSERVE_REQUIRE_POSTGRES"


def postgres_base_url() -> URL:
    configured = os.environ.get("DATABASE_URL", "")
    return make_url(configured if configured.startswith("postgresql") else POSTGRES_DEFAULT_URL)


@contextmanager
def temporary_schema(prefix: str = "sealserve_test") -> Iterator[URL]:
    """A URL whose connections use a fresh schema (search_path), dropped on exit.

    Skips the calling test (or fails it under SEALSERVE_REQUIRE_POSTGRES=1) when the server
    cannot be reached.
    """
    base = postgres_base_url()
    admin = create_engine(base, poolclass=NullPool, connect_args={"connect_timeout": 3})
    try:
        with admin.connect() as conn:
            conn.execute(text("SELECT 1"))
    except OperationalError as exc:
        admin.dispose()
        where = redact_url(base.render_as_string(hide_password=False))
        reason = f"PostgreSQL not reachable at {where} ({type(exc.orig).__name__})"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{reason} and {REQUIRE_ENV}=1")
        pytest.skip(reason)
    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield base.update_query_dict({"options": f"-csearch_path={schema}"})
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()
