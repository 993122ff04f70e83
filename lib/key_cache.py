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

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime

from lib.account_records import KeyRecord, hash_api_key, looks_like_api_key
from lib.db import utc_now


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
    ) -> None:
        if ttl_s < 0 or negative_ttl_s < 0 or max_entries < 1:
            raise ValueError("TTLs must be >= 0 and max_entries >= 1")
        self._lookup = lookup_by_hash
        self._ttl_s = ttl_s
        self._negative_ttl_s = negative_ttl_s
        self._max_entries = max_entries
        self._clock = clock
        self._wall_clock = wall_clock
        self._entries: OrderedDict[str, tuple[float, KeyRecord | None]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, plaintext: str) -> KeyRecord | None:
        """The usable key record for this plaintext key, or None; at most one lookup per TTL."""
        if not looks_like_api_key(plaintext):
            return None
        key_hash = hash_api_key(plaintext)
        now = self._clock()
        with self._lock:
            entry = self._entries.get(key_hash)
            if entry is not None and entry[0] > now:
                self._entries.move_to_end(key_hash)
                return self._if_unexpired(entry[1])
        # Looked up outside the lock: one slow query must not stall every other key's check.
        # Two concurrent misses on the same key may both query; that is bounded and harmless.
        record = self._lookup(key_hash)
        ttl = self._ttl_s if record is not None else self._negative_ttl_s
        with self._lock:
            self._entries[key_hash] = (now + ttl, record)
            self._entries.move_to_end(key_hash)
            while len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)
        return self._if_unexpired(record)

    def invalidate(self, plaintext: str) -> None:
        """Forget one key now (e.g. this process just revoked it)."""
        with self._lock:
            self._entries.pop(hash_api_key(plaintext), None)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def _if_unexpired(self, record: KeyRecord | None) -> KeyRecord | None:
        if record is None or not record.is_usable(self._wall_clock()):
            return None
        return record
