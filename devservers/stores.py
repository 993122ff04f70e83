"""The two sealed stores as local processes, set up as a publisher and a node expect them.

``sealed_stores`` starts the S3-compatible server and the resource API, creates a publisher and a
reader account, stores the CDN config, and stops both servers (by their process) on exit. The
sealed-model benches share it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from devservers.resource_api import ResourceApiServer, start_resource_api_server
from devservers.s3 import S3Server, start_s3_server


@contextmanager
def sealed_stores(
    work: Path, bucket: str, *, publisher: tuple[str, str], reader: tuple[str, str], direct: bool
) -> Iterator[tuple[S3Server, ResourceApiServer]]:
    """(S3 server, resource API) with ``publisher`` and ``reader`` as (email, password); with
    ``direct`` the CDN config points straight at moto, else through the counting proxy."""
    s3 = start_s3_server()
    api = None
    try:
        api = start_resource_api_server(work / "resource-api")
        api.create_user(*publisher, role="publisher")
        api.create_user(*reader, role="reader")
        api.set_cdn(s3.config(bucket, direct=direct))
        yield s3, api
    finally:
        if api is not None:
            api.stop()
        s3.stop()
