"""One fetch of one sealed model onto a node (docs/sealed-format.md).

``SealedFetcher.fetch`` does it: key release and small part from the resource API, big part
from S3, join, open (decrypt + verify every segment), check the plaintext SHA-256 against the
model id, unpack a directory model. Making that happen once per node is
:class:`~lib.sealed.node_cache.SealedModelCache`'s job.

Plaintext is written to temporary names and renamed into place only after the whole file has
verified and its digest matched, so a path handed out always holds verified bytes.
"""

from __future__ import annotations

import builtins
import io
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from lib.digest import HashingIO
from lib.errors import IntegrityError
from lib.sealed.archive import unpack_archive
from lib.sealed.format import JoinedReader, open_stream
from lib.sealed.keywrap import NodeKeyPair
from lib.sealed.resource_client import FetchedResource
from lib.sealed.wire import CdnConfig, ResourceManifest


@dataclass(frozen=True)
class SealedRef:
    """A sealed model: where it is, and the id it must have (None: whatever is published)."""

    folder: str
    name: str
    id: str | None = None

    @property
    def location(self) -> tuple[str, str]:
        return (self.folder, self.name)

    @property
    def key(self) -> tuple[str, str, str | None]:
        # The id is part of the key: a model republished under the same name is another entry.
        return (self.folder, self.name, self.id)


class ResourceSource(Protocol):
    """The part of :class:`~lib.sealed.resource_client.ResourceClient` a node needs."""

    def get(self, folder: str, name: str, keypair: NodeKeyPair, fingerprint: str) -> FetchedResource: ...

    def list(self, folder: str) -> builtins.list[ResourceManifest]: ...

    def cdn_config(self, keypair: NodeKeyPair, fingerprint: str) -> CdnConfig: ...


class BigPartSource(Protocol):
    """The part of :class:`~lib.sealed.cdn.CdnClient` a node needs."""

    def download_file(self, key: str, dest: Path, *, expected_size: int | None = None) -> int: ...


@dataclass(frozen=True)
class FetchOutcome:
    path: Path
    manifest: ResourceManifest
    downloaded_bytes: int
    seconds: float


class SealedFetcher:
    """One node's way to the sealed stores: a per-process key pair and the node fingerprint.

    ``cdn_factory`` makes the S3 client from the config the resource API releases; it is called
    once, on the first fetch, so a node that lists but never fetches gets no S3 credentials.
    """

    def __init__(
        self,
        resources: ResourceSource,
        *,
        fingerprint: str,
        cdn_factory: Callable[[CdnConfig], BigPartSource],
        keypair: NodeKeyPair | None = None,
    ) -> None:
        self._resources = resources
        self._fingerprint = fingerprint
        self._keypair = keypair or NodeKeyPair.generate()
        self._cdn_factory = cdn_factory
        self._cdn: BigPartSource | None = None
        self._cdn_lock = threading.Lock()

    def list(self, folder: str) -> list[ResourceManifest]:
        return self._resources.list(folder)

    def _cdn_client(self) -> BigPartSource:
        with self._cdn_lock:
            if self._cdn is None:
                config = self._resources.cdn_config(self._keypair, self._fingerprint)
                self._cdn = self._cdn_factory(config)
            return self._cdn

    def fetch(self, ref: SealedRef, root: Path) -> FetchOutcome:
        """Fetch, verify and open ``ref`` into ``root``; returns the verified plaintext path."""
        started = time.monotonic()
        fetched = self._resources.get(ref.folder, ref.name, self._keypair, self._fingerprint)
        manifest = fetched.manifest
        if ref.id is not None and manifest.id != ref.id:
            raise IntegrityError(
                f"sealed model {ref.name} has id {manifest.id[:12]}, configuration pins {ref.id[:12]}"
            )
        if len(fetched.small_part) != manifest.small_size:
            raise IntegrityError(f"small part of {ref.name} has the wrong size")
        # Names carry the id and the resource name: the same bytes published under two names are
        # two entries with two files, so evicting one never pulls the file from under the other.
        stem = f"{manifest.id}.{ref.folder}.{ref.name}"
        big, opened, unpacked = (root / f".{stem}.{part}.part" for part in ("big", "open", "dir"))
        final = root / stem
        try:
            self._cdn_client().download_file(
                manifest.big_key, big, expected_size=manifest.sealed_size - manifest.small_size
            )
            with big.open("rb") as big_part, opened.open("wb") as sink:
                writer = HashingIO(sink)
                open_stream(JoinedReader([io.BytesIO(fetched.small_part), big_part]), writer, fetched.dek)
            big.unlink()
            if writer.hexdigest() != manifest.id:
                raise IntegrityError(f"plaintext of sealed model {ref.name} does not match its id")
            if manifest.is_directory:
                unpack_archive(opened, unpacked)
                opened.unlink()
                unpacked.rename(final)
            else:
                opened.rename(final)
        finally:
            for leftover in (big, opened):
                leftover.unlink(missing_ok=True)
            shutil.rmtree(unpacked, ignore_errors=True)
        return FetchOutcome(final, manifest, manifest.sealed_size, time.monotonic() - started)
