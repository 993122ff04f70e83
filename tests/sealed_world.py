"""The outside world of sealed models for integration tests, all real processes on loopback.

An S3-compatible server (moto, behind a counting proxy), the resource API (its own process and
SQLite database), a publisher and a reader account, this machine's node key enrolled and
approved, a publisher signing key that signs the CDN config and every manifest (the loaders
trust it: ``sealed_args``), and the demo models published with ``lib.sealed.publish``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from devservers.resource_api import ResourceApiServer, start_resource_api_server
from devservers.s3 import S3Server, start_s3_server
from lib.cli.publish import detect_kind
from lib.retry import RetryPolicy
from lib.sealed.cdn import CdnClient
from lib.sealed.fingerprint import node_fingerprint
from lib.sealed.publish import PublishResult, publish_model
from lib.sealed.resource_client import ResourceClient
from lib.sealed.signing import SigningKey, load_or_create_node_key
from tests.serve_harness import NODE_KEY_FILE, READER_EMAIL, READER_PASSWORD

PUBLISHER_EMAIL = "publisher@sealserve.test"
PUBLISHER_PASSWORD = "publisher-password-for-tests-0123456789"
BUCKET = "sealed-models"
FOLDER = "models"
SMALL_SIZE_KB = 64
# Quick to give up, so failure tests stay short; still more than one attempt.
FAST_RETRY = {"retry_attempts": 2, "timeout_s": 5.0}


@dataclass
class SealedWorld:
    s3: S3Server
    resource_api: ResourceApiServer
    published: dict[str, PublishResult]
    cache_dir: Path
    signing_key: SigningKey

    def publisher(self) -> ResourceClient:
        return ResourceClient(
            self.resource_api.url, PUBLISHER_EMAIL, PUBLISHER_PASSWORD,
            retry=RetryPolicy(attempts=2, base_delay=0.05),
        )

    def key_releases(self, name: str) -> int:
        return self.publisher().fetch_count(folder=FOLDER, name=name, kind="dek")

    def downloads(self, name: str) -> int:
        return self.s3.download_count(BUCKET, self.published[name].big_key)

    def publish(self, path: Path, name: str) -> PublishResult:
        result = publish_model(
            path, name=name, folder=FOLDER, kind=detect_kind(path), resources=self.publisher(),
            cdn=CdnClient(self.s3.config(BUCKET)), small_size_kb=SMALL_SIZE_KB,
            signing_key=self.signing_key,
        )
        self.published[name] = result
        return result

    def sealed_args(self, names: list[str], **overrides: Any) -> dict[str, Any]:
        """The ``sealed`` app argument serving ``names``."""
        return {
            "resource_api_url": self.resource_api.url,
            "folder": FOLDER,
            "models": names,
            "cache_dir": str(self.cache_dir),
            "node_key_file": NODE_KEY_FILE,
            "trusted_publishers": [self.signing_key.public_b64],
            **FAST_RETRY,
            **overrides,
        }


@contextmanager
def sealed_world(workdir: Path, models: dict[str, Path]) -> Iterator[SealedWorld]:
    s3 = start_s3_server()
    resource_api = start_resource_api_server(workdir / "resource-api")
    # A tmpfs directory of this test run only, so the plaintext search can be exact.
    cache_dir = Path("/dev/shm") / f"sealserve-test-{os.getpid()}-{workdir.name}"
    try:
        resource_api.create_user(PUBLISHER_EMAIL, PUBLISHER_PASSWORD, role="publisher")
        resource_api.create_user(READER_EMAIL, READER_PASSWORD, role="reader")
        node_key = load_or_create_node_key(Path(NODE_KEY_FILE))
        resource_api.approve_node((READER_EMAIL, READER_PASSWORD), node_key, node_fingerprint())
        signing_key_file = workdir / "publisher-signing.key"
        signing_key = SigningKey.generate()
        signing_key.save(signing_key_file)
        resource_api.set_cdn(s3.config(BUCKET), signing_key_file=signing_key_file)
        world = SealedWorld(s3, resource_api, {}, cache_dir, signing_key)
        for name, path in models.items():
            world.publish(path, name)
        s3.reset_counts()
        yield world
    finally:
        resource_api.stop()
        s3.stop()
        shutil.rmtree(cache_dir, ignore_errors=True)


def mark_unique(source: Path, target: Path) -> tuple[Path, dict[str, int]]:
    """Copy a model directory and add a random file, so its plaintext exists nowhere else.

    The demo models are built deterministically, so their files exist in every test run's temp
    tree; the random marker (and the tar that holds it) tell this run's plaintext apart.
    Returns the copy and {sha256: size} of the marker.
    """
    shutil.copytree(source, target)
    marker = os.urandom(4096)
    (target / "sealserve-test-marker.bin").write_bytes(marker)
    return target, {hashlib.sha256(marker).hexdigest(): len(marker)}


def find_copies(digests: dict[str, int], roots: list[Path], *, exclude: list[Path]) -> list[Path]:
    """Files under ``roots`` (not under ``exclude``) whose sha256 is one of ``digests``.

    Other processes create and delete temp files while we walk, so vanished entries are skipped.
    """
    sizes = set(digests.values())
    found = []
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root, onerror=lambda _: None):
            here = Path(dirpath)
            if any(here.is_relative_to(e) for e in exclude):
                dirnames.clear()
                continue
            for name in filenames:
                path = here / name
                try:
                    candidate = not path.is_symlink() and path.stat().st_size in sizes
                    if candidate and hashlib.sha256(path.read_bytes()).hexdigest() in digests:
                        found.append(path)
                except OSError:
                    continue
    return found
