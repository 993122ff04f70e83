"""A small thread-safe TTL cache in front of a blocking lookup (found and not-found answers alike).

:class:`lib.accounts.key_cache.KeyCache` builds on it for plaintext API keys (keyed by their hash); the
ingress also uses it directly for lookups by key *id* (the subject of a JWT), so that verifying
a token costs no database round trip either. ``None`` answers are cached for ``negative_ttl_s``.

Stale on error: with ``stale_grace_s``, a lookup that fails with one of ``stale_on`` (the database
is down) answers a found value that expired less than ``stale_grace_s`` ago instead of failing,
so known keys keep working through a short outage; a key never seen, or seen only as not found,
still fails. Each fallback is logged once per outage.

Inside :func:`memory_only` a lookup that would block raises :class:`CacheMiss` instead: an event
loop first tries to answer from memory and goes to a thread only on a miss (the request gate
does, ``lib/accounts/gate.py``), so the common case costs no thread hop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

log = logging.getLogger(__name__)

_MEMORY_ONLY: ContextVar[bool] = ContextVar("ttl_cache_memory_only", default=False)


class CacheMiss(LookupError):
    """No fresh entry, and the caller asked not to block on the lookup (:func:`memory_only`)."""


@contextmanager
def memory_only() -> Iterator[None]:
    """Within this block, every :class:`TtlCache` answers from memory or raises :class:`CacheMiss`."""
    token = _MEMORY_ONLY.set(True)
    try:
        yield
    finally:
        _MEMORY_ONLY.reset(token)


def is_memory_only() -> bool:
    """Whether the caller is inside :func:`memory_only` (and a lookup must raise :class:`CacheMiss`)."""
    return _MEMORY_ONLY.get()


class TtlCache(Generic[K, V]):
    def __init__(
        self,
        lookup: Callable[[K], V | None],
        *,
        ttl_s: float,
        negative_ttl_s: float,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
        stale_grace_s: float = 0.0,
        stale_on: tuple[type[BaseException], ...] = (),
    ) -> None:
        if ttl_s < 0 or negative_ttl_s < 0 or max_entries < 1 or stale_grace_s < 0:
            raise ValueError("TTLs and the grace must be >= 0 and max_entries >= 1")
        self._stale_grace_s = stale_grace_s
        self._stale_on = stale_on
        self._serving_stale = False
        self._lookup = lookup
        self._ttl_s = ttl_s
        self._negative_ttl_s = negative_ttl_s
        self._max_entries = max_entries
        self._clock = clock
        # key -> (fresh until, value, looked up at)
        self._entries: OrderedDict[K, tuple[float, V | None, float]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        now = self._clock()
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry[0] > now:
                self._entries.move_to_end(key)
                return entry[1]
        if _MEMORY_ONLY.get():
            raise CacheMiss(key)
        # Looked up outside the lock: one slow lookup must not stall every other key's check.
        # Two concurrent misses on the same key may both look it up; bounded and harmless.
        try:
            value = self._lookup(key)
        except self._stale_on:
            with self._lock:
                stale = self._entries.get(key)
                if stale is None or stale[1] is None or stale[2] + self._ttl_s + self._stale_grace_s <= now:
                    raise
                # Asked again after a TTL, not on every request (each try may wait for a timeout).
                self._entries[key] = (now + self._ttl_s, stale[1], stale[2])
                if not self._serving_stale:
                    self._serving_stale = True
                    log.warning(
                        "lookups failing: known entries answered up to %.0fs stale", self._stale_grace_s
                    )
                return stale[1]
        if self._serving_stale:
            self._serving_stale = False
            log.warning("lookups answer again: stale entries no longer used")
        ttl = self._ttl_s if value is not None else self._negative_ttl_s
        with self._lock:
            self._entries[key] = (now + ttl, value, now)
            self._entries.move_to_end(key)
            while len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)
        return value

    def invalidate(self, key: K) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
