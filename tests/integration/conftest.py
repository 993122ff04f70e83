"""Fixtures shared by the integration tests: real servers, started as processes."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from devservers.s3 import S3Server, start_s3_server


@pytest.fixture(scope="module")
def s3_server() -> Iterator[S3Server]:
    """A moto S3 server process (behind a counting proxy) for the tests of one module."""
    server = start_s3_server()
    try:
        yield server
    finally:
        server.stop()
