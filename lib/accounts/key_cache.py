"""A TTL cache in front of the key lookup, so checking an API key costs no database round trip.

Entries are keyed by the key's sha256 (never the plaintext, so a heap dump of the cache does not
hold usable keys). A positive entry lives ``ttl_s`` (5 s by default): a revoked key keeps working
on a replica for at most that long. A negative entry (unknown, revoked or expired key) lives
``negative_ttl_s``, so repeating one bad key costs one query per interval.

Failed-auth traffic cannot crowd out valid keys or the database: positive and negative entries are
two separate LRUs (``max_entries`` each), so no number of bad keys evicts a valid one; and a key
this replica has not seen valid (a random guess, or a key's first use here) is looked up only
within a budget (``unknown_lookups_per_s``, bursts of ``unknown_burst``). Past it the request gets
a 503 to retry, not a database query; refreshing a key seen valid before is never held back.

The database down: with ``stale_grace_s``, a lookup that fails with one of ``stale_on`` answers a
key seen valid less than ``ttl_s + stale_grace_s`` ago instead of failing (asked again once per
TTL, logged once per outage), so known keys keep working through a short outage; a key never
seen valid still fails.

Expiry is re-checked on every hit against the wall clock, so a key never outlives its
``expires_at`` because it happened to be cached.

The lookup is synchronous; inside :func:`lib.ttl_cache.memory_only` a lookup that would block
raises :class:`lib.ttl_cache.CacheMiss` instead, and the caller retries it in a thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime
from typing import TypeVar

from lib.accounts.records import KeyRecord, hash_api_key, looks_like_api_key
from lib.clock import utc_now
from lib.errors import ServiceUnavailableError
from lib.ttl_cache import CacheMiss, is_memory_only

log = logging.getLogger(__name__)


class KeyCache:
    """Caches ``lookup_by_hash(sha256_hex) -> KeyRecord | None`` (e.g. ``AccountStore.lookup_key_hash``)."""

    def __init__(
        self,
        lookup_by_hash: Callable[[str], KeyRecord | None],
        *,
        ttl_s: float = 5.0,
        negative_ttl_s: float = 1.0,
        max_entries: int = 10_000,
        unknown_lookups_per_s: float = 50.0,
        unknown_burst: int = 100,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = utc_now,
        stale_grace_s: float = 0.0,
        stale_on: tuple[type[BaseException], ...] = (),
    ) -> None:
        if min(ttl_s, negative_ttl_s, stale_grace_s) < 0 or max_entries < 1 or unknown_lookups_per_s <= 0:
            raise ValueError("TTLs and the grace must be >= 0, max_entries >= 1 and the lookup budget > 0")
        self._stale_grace_s = stale_grace_s
        self._stale_on = stale_on
        self._serving_stale = False
        self._lookup = lookup_by_hash
        self._ttl_s = ttl_s
        self._negative_ttl_s = negative_ttl_s
        self._max_entries = max_entries
        self._rate = unknown_lookups_per_s
        self._burst = float(max(1, unknown_burst))
        self._tokens = self._burst
        self._clock = clock
        self._refilled = clock()
        self._wall_clock = wall_clock
        # digest -> (fresh until, record, looked up at); an expired entry stays (LRU-bounded) as
        # "seen valid".
        self._known: OrderedDict[str, tuple[float, KeyRecord, float]] = OrderedDict()
        self._unknown: OrderedDict[str, float] = OrderedDict()  # digest -> refused until
        self._lock = threading.Lock()

    def get(self, plaintext: str) -> KeyRecord | None:
        """The usable key record for this plaintext key, or None; at most one lookup per TTL."""
        if not looks_like_api_key(plaintext):
            return None
        digest = hash_api_key(plaintext)
        record = self._cached(digest)
        if record is not None and not record.is_usable(self._wall_clock()):
            return None
        return record

    def _cached(self, digest: str) -> KeyRecord | None:
        now = self._clock()
        with self._lock:
            known = self._known.get(digest)
            if known is not None:
                self._known.move_to_end(digest)
                if known[0] > now:
                    return known[1]
            elif self._unknown.get(digest, now) > now:
                return None
            if is_memory_only():
                raise CacheMiss(digest)
            if known is None and not self._take_token(now):
                raise ServiceUnavailableError("too many unknown credentials at once; retry shortly")
        try:
            record = self._lookup(digest)  # outside the lock: one slow lookup must not stall the rest
        except self._stale_on as exc:
            return self._stale(digest, now, exc)
        if self._serving_stale:
            self._serving_stale = False
            log.warning("key lookups answer again: stale entries no longer used")
        with self._lock:
            if record is not None:
                self._unknown.pop(digest, None)
                _put(self._known, digest, (now + self._ttl_s, record, now), self._max_entries)
            else:
                self._known.pop(digest, None)
                _put(self._unknown, digest, now + self._negative_ttl_s, self._max_entries)
        return record

    def _stale(self, digest: str, now: float, error: BaseException) -> KeyRecord:
        """The lookup failed with a ``stale_on`` error: a key seen valid recently enough, or raise."""
        with self._lock:
            known = self._known.get(digest)
            if known is None or known[2] + self._ttl_s + self._stale_grace_s <= now:
                raise error
            # Asked again after a TTL, not on every request (each try may wait for a timeout).
            self._known[digest] = (now + self._ttl_s, known[1], known[2])
        if not self._serving_stale:
            self._serving_stale = True
            log.warning("key lookups failing: known keys answered up to %.0fs stale", self._stale_grace_s)
        return known[1]

    def _take_token(self, now: float) -> bool:
        self._tokens = min(self._burst, self._tokens + (now - self._refilled) * self._rate)
        self._refilled = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    def invalidate(self, plaintext: str) -> None:
        """Forget one key now (e.g. this process just revoked it)."""
        digest = hash_api_key(plaintext)
        with self._lock:
            self._known.pop(digest, None)
            self._unknown.pop(digest, None)

    def clear(self) -> None:
        with self._lock:
            self._known.clear()
            self._unknown.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._known) + len(self._unknown)


V = TypeVar("V")


def _put(entries: OrderedDict[str, V], key: str, value: V, bound: int) -> None:
    entries[key] = value
    entries.move_to_end(key)
    while len(entries) > bound:
        entries.popitem(last=False)
