"""The two sealed stores as local processes, set up as a publisher and a node expect them.

``sealed_stores`` starts the S3-compatible server and the resource API, creates a publisher and a
reader account, stores the CDN config, makes this machine's node key (``work/node.key``) and has
it enrolled and approved, and stops both servers (by their process) on exit. The sealed-model
benches share it; their node processes find the key with :func:`bench_node_key` (the file's path
is in ``$SEALSERVE_NODE_KEY_FILE`` while the stores run, and child processes inherit it).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from devservers.resource_api import ResourceApiServer, start_resource_api_server
from devservers.s3 import S3Server, start_s3_server
from lib.sealed.fingerprint import node_fingerprint
from lib.sealed.settings import NODE_KEY_FILE_ENV
from lib.sealed.signing import SigningKey, load_or_create_node_key


def bench_node_key() -> SigningKey:
    """The node key :func:`sealed_stores` approved (in this process or a child of it)."""
    return load_or_create_node_key(Path(os.environ[NODE_KEY_FILE_ENV]))


@contextmanager
def sealed_stores(
    work: Path, bucket: str, *, publisher: tuple[str, str], reader: tuple[str, str], direct: bool
) -> Iterator[tuple[S3Server, ResourceApiServer]]:
    """(S3 server, resource API) with ``publisher`` and ``reader`` as (email, password); with
    ``direct`` the CDN config points straight at moto, else through the counting proxy."""
    s3 = start_s3_server()
    api = None
    previous = os.environ.get(NODE_KEY_FILE_ENV)
    try:
        api = start_resource_api_server(work / "resource-api")
        api.create_user(*publisher, role="publisher")
        api.create_user(*reader, role="reader")
        api.set_cdn(s3.config(bucket, direct=direct))
        key_file = work / "node.key"
        api.approve_node(reader, load_or_create_node_key(key_file), node_fingerprint())
        os.environ[NODE_KEY_FILE_ENV] = str(key_file)
        yield s3, api
    finally:
        if previous is None:
            os.environ.pop(NODE_KEY_FILE_ENV, None)
        else:
            os.environ[NODE_KEY_FILE_ENV] = previous
        if api is not None:
            api.stop()
        s3.stop()
