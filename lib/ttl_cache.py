"""A small thread-safe TTL cache in front of a blocking lookup (found and not-found answers alike).

:class:`lib.accounts.key_cache.KeyCache` builds on it for plaintext API keys (keyed by their hash); the
ingress also uses it directly for lookups by key *id* (the subject of a JWT), so that verifying
a token costs no database round trip either. ``None`` answers are cached for ``negative_ttl_s``.

Inside :func:`memory_only` a lookup that would block raises :class:`CacheMiss` instead: an event
loop first tries to answer from memory and goes to a thread only on a miss (the request gate
does, ``lib/accounts/gate.py``), so the common case costs no thread hop.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

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
    ) -> None:
        if ttl_s < 0 or negative_ttl_s < 0 or max_entries < 1:
            raise ValueError("TTLs must be >= 0 and max_entries >= 1")
        self._lookup = lookup
        self._ttl_s = ttl_s
        self._negative_ttl_s = negative_ttl_s
        self._max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[K, tuple[float, V | None]] = OrderedDict()
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
        value = self._lookup(key)
        ttl = self._ttl_s if value is not None else self._negative_ttl_s
        with self._lock:
            self._entries[key] = (now + ttl, value)
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
