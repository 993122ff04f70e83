"""The node's plaintext cache of sealed models: each fetched **once per node**.

Concurrent requests for one model share one fetch (:class:`~lib.sealed.fetch.SealedFetcher`),
later ones are cache hits, and the plaintext lives only under the cache directory (tmpfs by
default), evicted LRU under a byte budget and removed with the cache. ``process_cache_dir`` makes
that directory per process, under a base that must be a private directory of the service user,
and sweeps the marked directories of dead processes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import stat
import tempfile
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


# The file that makes a directory under the cache base one of ours: only such directories are
# ever swept, so a base shared with anything else loses nothing but our own leftovers.
MARKER = ".sealserve-node-cache"
_MARKER_PREFIX = "sealserve node cache of pid "


def private_base(base: Path) -> Path:
    """``base`` as a private directory of this user, created 0700 if missing; else ConfigurationError.

    /dev/shm is world-writable: a link or directory planted there by another local user could make
    us chmod, sweep or fill a place of their choosing (a persistent disk, their own directory), so
    a link, another user's directory, or one open to group or others is refused, never repaired.
    """
    base.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        base.mkdir(mode=0o700)
    st = os.lstat(base)
    if stat.S_ISLNK(st.st_mode):
        raise ConfigurationError(f"model cache directory {base} is a symbolic link; give a real directory")
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigurationError(f"model cache directory {base} is not a directory")
    if st.st_uid != os.getuid():
        raise ConfigurationError(f"model cache directory {base} belongs to another user")
    if st.st_mode & 0o077:
        raise ConfigurationError(
            f"model cache directory {base} is open to group or others (mode {st.st_mode & 0o777:o}); "
            "make it 0700"
        )
    return base


def process_cache_dir(base: Path, owner: str) -> Path:
    """A new private directory of this process under ``base``, after removing those of dead processes.

    Made with ``mkdtemp`` (a fresh, unguessable name, 0700) and marked with the pid, so a loader that
    was killed before it could clean up (SIGKILL, a node crash, a Ray session torn down) has its
    plaintext removed by the next loader that starts on the machine, whatever application or
    session it belonged to. Only marked directories are swept.
    """
    private_base(base)
    for entry in os.scandir(base):
        if not entry.is_dir(follow_symlinks=False):
            continue
        pid = _marked_pid(Path(entry.path))
        if pid is not None and pid != os.getpid() and not _alive(pid):
            shutil.rmtree(entry.path, ignore_errors=True)
    path = Path(tempfile.mkdtemp(prefix=f"{owner}-{os.getpid()}-", dir=base))
    fd = os.open(path / MARKER, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as marker:
        marker.write(f"{_MARKER_PREFIX}{os.getpid()}\n")
    return path


def _marked_pid(directory: Path) -> int | None:
    """The pid in ``directory``'s marker, if it holds our marker as a regular file of ours."""
    try:
        fd = os.open(directory / MARKER, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as marker:
        st = os.fstat(marker.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
            return None
        text = marker.read(128).decode("ascii", "replace").strip()
    number = text.removeprefix(_MARKER_PREFIX)
    return int(number) if text.startswith(_MARKER_PREFIX) and number.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # OverflowError: a number no pid can be
        return False
    except PermissionError:
        return True
    return True
