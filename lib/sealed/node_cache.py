"""The node's plaintext cache of sealed models: each fetched **once per node**.

Concurrent requests for one model share one fetch (:class:`~lib.sealed.fetch.SealedFetcher`),
later ones are cache hits, and the plaintext lives only under the cache directory (tmpfs by
default), evicted LRU under a byte budget and removed with the cache. ``process_cache_dir`` names
that directory per process and sweeps those of dead processes.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lib.errors import ConfigurationError, SealserveError
from lib.observability import metrics
from lib.sealed.fetch import SealedFetcher, SealedRef
from lib.sealed.wire import ResourceManifest

log = logging.getLogger(__name__)


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

    def ensure(
        self, ref: SealedRef, *, hint: ResourceManifest | None = None
    ) -> tuple[Path, ResourceManifest]:
        """The verified plaintext path of ``ref``, fetching it unless cached or being fetched.

        ``hint``, the listed manifest, lets the download start while the key is being released.
        """
        with self._lock:
            stats = self._stats.setdefault(ref.name, ModelStats())
            entry = self._entries.get(ref.key)
            if entry is not None:
                self._entries.move_to_end(ref.key)
                stats.cache_hits += 1
                metrics.cache_hit()
                return entry.path, entry.manifest
            metrics.cache_miss()
            flight = self._flights.get(ref.key)
            leader = flight is None
            if flight is None:
                flight = self._flights[ref.key] = _Flight()
        if not leader:
            done = flight.future.result()  # raises the leader's error for every waiter
            return done.path, done.manifest
        try:
            outcome = self._fetcher.fetch(ref, self.root, hint=hint)
        except Exception as exc:
            with self._lock:
                stats.last_error = describe(exc)
                del self._flights[ref.key]
            metrics.fetch_failed()
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
            metrics.fetched(outcome.downloaded_bytes, entry.size, len(evicted), self._bytes())
        flight.future.set_result(entry)
        for old in evicted:
            _remove(old.path)
            log.info("evicted sealed model %s from the node cache", old.manifest.name)
        log.info("sealed model %s fetched and verified in %.2fs %s", ref.name, outcome.seconds,
                 outcome.details)
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

    def _bytes(self) -> int:
        return sum(e.size for e in self._entries.values())

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
        metrics.cache_bytes(0)
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
