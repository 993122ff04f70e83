"""A TTL cache in front of the key lookup, so checking an API key costs no database round trip.

Entries are keyed by the key's sha256 (never the plaintext, so a heap dump of the cache does not
hold usable keys). A positive entry lives ``ttl_s`` (5 s by default): a revoked key keeps working
on a replica for at most that long. A negative entry (unknown, revoked or expired key) lives
``negative_ttl_s``, so a flood of bad keys costs one query per distinct key per interval rather
than one per request. The cache is bounded (LRU beyond ``max_entries``).

Expiry is re-checked on every hit against the wall clock, so a key never outlives its
``expires_at`` because it happened to be cached.

The lookup is synchronous; an async caller should run :meth:`KeyCache.get` in a thread on a miss
(or always, since a hit is a dictionary read).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime

from lib.accounts.records import KeyRecord, hash_api_key, looks_like_api_key
from lib.clock import utc_now
from lib.ttl_cache import TtlCache


class KeyCache:
    """Caches ``lookup_by_hash(sha256_hex) -> KeyRecord | None`` (e.g. ``AccountStore.lookup_key_hash``)."""

    def __init__(
        self,
        lookup_by_hash: Callable[[str], KeyRecord | None],
        *,
        ttl_s: float = 5.0,
        negative_ttl_s: float = 1.0,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = utc_now,
        stale_grace_s: float = 0.0,
        stale_on: tuple[type[BaseException], ...] = (),
    ) -> None:
        self._cache: TtlCache[str, KeyRecord] = TtlCache(
            lookup_by_hash,
            ttl_s=ttl_s,
            negative_ttl_s=negative_ttl_s,
            max_entries=max_entries,
            clock=clock,
            stale_grace_s=stale_grace_s,  # the database down: see lib/ttl_cache.py
            stale_on=stale_on,
        )
        self._wall_clock = wall_clock

    def get(self, plaintext: str) -> KeyRecord | None:
        """The usable key record for this plaintext key, or None; at most one lookup per TTL."""
        if not looks_like_api_key(plaintext):
            return None
        record = self._cache.get(hash_api_key(plaintext))
        if record is None or not record.is_usable(self._wall_clock()):
            return None
        return record

    def invalidate(self, plaintext: str) -> None:
        """Forget one key now (e.g. this process just revoked it)."""
        self._cache.invalidate(hash_api_key(plaintext))

    def clear(self) -> None:
        self._cache.clear()

    def __len__(self) -> int:
        return len(self._cache)
