"""Fetching sealed models onto a node and keeping their plaintext in a node-local cache.

``SealedFetcher`` does one fetch: key release and small part from the resource API, big part
from S3, join, open (decrypt + verify every segment), check the plaintext SHA-256 against the
model id, unpack a directory model. ``SealedModelCache`` makes that happen **once per node**:
concurrent requests for one model share one fetch, later ones are cache hits, and the plaintext
lives only under the cache directory (tmpfs by default), evicted LRU under a byte budget and
removed with the cache.

Plaintext is written to temporary names and renamed into place only after the whole file has
verified and its digest matched, so a path handed out always holds verified bytes.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from lib.digest import HashingIO
from lib.errors import ConfigurationError, IntegrityError, SealserveError
from lib.sealed.archive import unpack_archive
from lib.sealed.cdn import CdnClient
from lib.sealed.cdn_config import CdnConfig
from lib.sealed.format import JoinedReader, open_stream
from lib.sealed.keywrap import NodeKeyPair
from lib.sealed.resource_client import FetchedResource
from lib.sealed.wire import ResourceManifest

log = logging.getLogger(__name__)


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
    """The part of ``ResourceClient`` a node needs."""

    def get(self, folder: str, name: str, keypair: NodeKeyPair, fingerprint: str) -> FetchedResource: ...

    def list(self, folder: str) -> list[dict[str, Any]]: ...

    def cdn_config(self, keypair: NodeKeyPair, fingerprint: str) -> CdnConfig: ...


@dataclass(frozen=True)
class FetchOutcome:
    path: Path
    manifest: ResourceManifest
    downloaded_bytes: int
    seconds: float


class SealedFetcher:
    """One node's way to the sealed stores: a per-process key pair and the node fingerprint."""

    def __init__(
        self,
        resources: ResourceSource,
        *,
        fingerprint: str,
        keypair: NodeKeyPair | None = None,
        cdn_factory: Callable[[CdnConfig], CdnClient] = CdnClient,
    ) -> None:
        self._resources = resources
        self._fingerprint = fingerprint
        self._keypair = keypair or NodeKeyPair.generate()
        self._cdn_factory = cdn_factory
        self._cdn: CdnClient | None = None
        self._cdn_lock = threading.Lock()

    def list(self, folder: str) -> list[ResourceManifest]:
        return [ResourceManifest.model_validate(m) for m in self._resources.list(folder)]

    def _cdn_client(self) -> CdnClient:
        with self._cdn_lock:
            if self._cdn is None:
                config = self._resources.cdn_config(self._keypair, self._fingerprint)
                self._cdn = self._cdn_factory(config)
            return self._cdn

    def fetch(self, ref: SealedRef, root: Path) -> FetchOutcome:
        """Fetch, verify and open ``ref`` into ``root``; returns the verified plaintext path."""
        started = time.monotonic()
        fetched = self._resources.get(ref.folder, ref.name, self._keypair, self._fingerprint)
        manifest = ResourceManifest.model_validate(fetched.manifest)
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


@dataclass
class ModelStats:
    fetches: int = 0
    cache_hits: int = 0
    bytes: int = 0
    seconds: float = 0.0
    last_error: str | None = None


@dataclass
class _Entry:
    path: Path
    manifest: ResourceManifest
    size: int


@dataclass
class _Flight:
    future: Future[_Entry] = field(default_factory=Future)


class SealedModelCache:
    """The node's plaintext cache of sealed models: one fetch per model, LRU under a budget."""

    def __init__(self, root: Path, *, fetcher: SealedFetcher, budget_bytes: int) -> None:
        self.root = root
        self._fetcher = fetcher
        self._budget = budget_bytes
        self._entries: OrderedDict[tuple[str, str, str | None], _Entry] = OrderedDict()
        self._flights: dict[tuple[str, str, str | None], _Flight] = {}
        self._stats: dict[str, ModelStats] = {}
        self._lock = threading.Lock()
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        root.chmod(0o700)

    def cached(self, ref: SealedRef) -> Path | None:
        with self._lock:
            entry = self._entries.get(ref.key)
            return entry.path if entry else None

    def ensure(self, ref: SealedRef) -> tuple[Path, ResourceManifest]:
        """The verified plaintext path of ``ref``, fetching it unless cached or being fetched."""
        with self._lock:
            stats = self._stats.setdefault(ref.name, ModelStats())
            entry = self._entries.get(ref.key)
            if entry is not None:
                self._entries.move_to_end(ref.key)
                stats.cache_hits += 1
                return entry.path, entry.manifest
            flight = self._flights.get(ref.key)
            leader = flight is None
            if flight is None:
                flight = self._flights[ref.key] = _Flight()
        if not leader:
            done = flight.future.result()  # raises the leader's error for every waiter
            return done.path, done.manifest
        try:
            outcome = self._fetcher.fetch(ref, self.root)
        except Exception as exc:
            with self._lock:
                stats.last_error = describe(exc)
                del self._flights[ref.key]
            flight.future.set_exception(exc)
            raise
        entry = _Entry(outcome.path, outcome.manifest, outcome.manifest.plaintext_size)
        with self._lock:
            self._entries[ref.key] = entry
            del self._flights[ref.key]
            stats.fetches += 1
            stats.bytes += outcome.downloaded_bytes
            stats.seconds += outcome.seconds
            stats.last_error = None
            evicted = [  # earlier versions of a republished model are not served again
                self._entries.pop(key) for key in list(self._entries)
                if key[:2] == ref.location and key != ref.key
            ]
            evicted += self._evict_over_budget(keep=ref.key)
        flight.future.set_result(entry)
        for old in evicted:
            _remove(old.path)
            log.info("evicted sealed model %s from the node cache", old.manifest.name)
        log.info("sealed model %s fetched and verified in %.2fs", ref.name, outcome.seconds)
        return entry.path, entry.manifest

    def _evict_over_budget(self, keep: tuple[str, str, str | None]) -> list[_Entry]:
        evicted = []
        total = sum(e.size for e in self._entries.values())
        for key in list(self._entries):
            if total <= self._budget:
                break
            if key != keep:
                entry = self._entries.pop(key)
                total -= entry.size
                evicted.append(entry)
        return evicted

    def stats(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {name: vars(s).copy() for name, s in self._stats.items()}

    def errors(self) -> dict[str, str]:
        with self._lock:
            return {name: s.last_error for name, s in self._stats.items() if s.last_error}

    def release(self) -> None:
        """Remove every cached plaintext now; the cache stays usable (later ensures refetch)."""
        with self._lock:
            released = list(self._entries.values())
            self._entries.clear()
        for entry in released:
            _remove(entry.path)

    def clear(self) -> None:
        """Remove every plaintext and the cache directory: called when the loader exits."""
        with self._lock:
            self._entries.clear()
        shutil.rmtree(self.root, ignore_errors=True)


def describe(exc: BaseException) -> str:
    message = exc.message if isinstance(exc, SealserveError) else type(exc).__name__
    return f"{type(exc).__name__}: {message}"


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def process_cache_dir(base: Path, owner: str) -> Path:
    """This process's cache directory under ``base``, after removing those of dead processes.

    The name ends with the pid, so a loader that was killed before it could clean up (SIGKILL,
    a node crash, a Ray session torn down) has its plaintext removed by the next loader that
    starts on the machine, whatever application or session it belonged to.
    """
    base.mkdir(parents=True, exist_ok=True, mode=0o700)
    # /dev/shm is world-writable: a directory planted there by another user could let them
    # read or swap our plaintext, so it must be ours and private.
    if base.stat().st_uid != os.getuid():
        raise ConfigurationError(f"model cache directory {base} belongs to another user")
    base.chmod(0o700)
    for stale in base.iterdir():
        pid = stale.name.rpartition("-")[2]
        if stale.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    return base / f"{owner}-{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # OverflowError: a number no pid can be
        return False
    except PermissionError:
        return True
    return True
