"""Leases on the shared rate limit: most requests are admitted without a round trip to the limiter.

The application has one limiter (``deployments/rate_limiter.py``), so a limit holds across every
ingress replica; asking it on every request costs a Ray round trip. Instead a replica takes a
*lease*: several hits at once (:meth:`lib.accounts.rate_limit.SlidingWindowLimiter.take`, counted
as taken now), which it spends locally for at most ``ttl_s``.

Exactness. The shared limiter never grants more than the limit in any window, so the cluster never
admits more than the limit. Tokens a replica leased but did not spend before the lease expired are
lost for the rest of their window: the limit is then stricter, by at most one lease per replica,
never more generous. A lease is at most ``1/LEASE_FRACTION`` of the limit, so small limits (up to
``LEASE_FRACTION`` per window, e.g. 10/minute) lease one hit at a time and are exact; large ones lease
up to ``MAX_LEASE``. Lease sizes adapt: a lease spent before it expired doubles the next one, an
unspent one halves it, so an idle key costs a replica at most one hit of slack.

A denial is remembered until the limiter's ``Retry-After``: no slot can free before then, so
repeating the question would only load the limiter (a flood of over-limit requests costs one
round trip per key per retry interval, not one per request).

Weighted spending. The same leases carry compute budgets (``lib/accounts/compute.py``), where a
request costs several units (image-steps): ``hit(..., cost=n)`` spends ``n`` tokens at once. When
the lease holds fewer, the renewal asks the limiter for the rest of the cost as a minimum (all of
it or nothing: a request is never half charged) and keeps the tokens it still had, so a lease is
not wasted because the next request is large. A remembered denial refuses only requests at least
as large as the one denied.

Plain asyncio, no Ray: the shared limiter is any :class:`SharedLimiter`.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from lib.accounts.rate_limit import Grant, RateDecision

# A replica holds at most 1/100 of a key's limit unspent: limits up to 100 per window are exact.
LEASE_FRACTION = 100
# Reasoned: at the ~500 req/s bench/request_path.py reaches with one key, leases of 64 cost the
# limiter ~8 calls/s instead of 500; larger ones would save little and strand more on expiry.
MAX_LEASE = 64
# A lease must be spent well inside its window (the hits it took expire with the window) and soon
# enough that its unspent rest is small; one second keeps both for minute-or-longer windows.
LEASE_TTL_S = 1.0
# Keys with a live lease per replica; beyond it the least recently used lease is dropped (its
# tokens are lost, which is stricter, never more generous).
MAX_KEYS = 10_000


class SharedLimiter(Protocol):
    """The application's one limiter (``SlidingWindowLimiter.take``, awaitable)."""

    async def take(self, key: str, limit: int, window_s: int, count: int, minimum: int = 1) -> Grant: ...


@dataclass
class _Lease:
    limit: int
    window_s: int
    tokens: int  # units granted and not yet spent
    size: int  # what was asked for
    need: int  # the least that would do (the request's cost): a denial refuses costs from here up
    granted_at: float
    oldest_at: float  # when the oldest of its tokens was granted (carried over from an older lease)
    expires_at: float
    decision: RateDecision  # the limiter's answer at grant time

    def fits(self, limit: int, window_s: int, now: float) -> bool:
        return self.limit == limit and self.window_s == window_s and now < self.expires_at


class LeasedLimiter:
    """A replica's view of the shared limit: ``await hit(key, limit, window_s)`` like the limiter's."""

    def __init__(
        self,
        shared: SharedLimiter,
        *,
        ttl_s: float = LEASE_TTL_S,
        max_lease: int = MAX_LEASE,
        max_keys: int = MAX_KEYS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl_s <= 0 or max_lease < 1 or max_keys < 1:
            raise ValueError("ttl_s must be > 0, max_lease and max_keys >= 1")
        self._shared = shared
        self._ttl_s = ttl_s
        self._max_lease = max_lease
        self._max_keys = max_keys
        self._clock = clock
        self._leases: OrderedDict[str, _Lease] = OrderedDict()
        self._locks: dict[str, asyncio.Lock] = {}
        self.round_trips = 0  # calls to the shared limiter, for health and benchmarks

    async def hit(self, key: str, limit: int, window_s: int, cost: int = 1) -> RateDecision:
        """One request costing ``cost`` units (1: a hit of a rate limit) against ``limit``."""
        if not 1 <= cost <= limit:
            raise ValueError("cost must be between 1 and the limit")
        decision = self._spend(key, limit, window_s, cost)
        if decision is not None:
            return decision
        # One renewal per key at a time: the requests that arrive meanwhile spend what it brings.
        async with self._locks.setdefault(key, asyncio.Lock()):
            decision = self._spend(key, limit, window_s, cost)
            if decision is None:
                await self._renew(key, limit, window_s, cost)
                decision = self._spend(key, limit, window_s, cost)
        if decision is None:  # a lease without the tokens is a denial, remembered by _spend
            raise AssertionError("a renewed lease always answers")  # pragma: no cover
        return decision

    def _spend(self, key: str, limit: int, window_s: int, cost: int) -> RateDecision | None:
        """The answer from the live lease, or None when only the shared limiter can answer."""
        now = self._clock()
        lease = self._leases.get(key)
        if lease is None or not lease.fits(limit, window_s, now):
            return None
        self._leases.move_to_end(key)
        elapsed = now - lease.granted_at
        reset_after = max(0.0, lease.decision.reset_after_s - elapsed)
        if lease.tokens >= cost:
            lease.tokens -= cost
            remaining = lease.decision.remaining + lease.tokens
            return RateDecision(True, limit, remaining, reset_after, 0.0)
        if not lease.decision.allowed and cost >= lease.need:
            retry_after = max(0.0, lease.decision.retry_after_s - elapsed)
            return RateDecision(False, limit, lease.tokens, reset_after, retry_after)
        return None  # spent, or a smaller request than the one denied: renew

    async def _renew(self, key: str, limit: int, window_s: int, cost: int) -> None:
        previous = self._leases.get(key)
        now = self._clock()
        live = previous is not None and previous.fits(limit, window_s, now)
        # Tokens of a live lease stay spendable (they are counted in the shared log already).
        carry = previous.tokens if previous is not None and live else 0
        size = max(cost, self._next_size(previous, limit))
        grant = await self._shared.take(key, limit, window_s, size - carry, minimum=cost - carry)
        self.round_trips += 1
        now = self._clock()
        decision = grant.decision
        oldest_at = previous.oldest_at if previous is not None and carry else now
        # A denial lives until a slot frees (the limiter's Retry-After); a lease until its TTL;
        # neither beyond half a window after its oldest token was granted (which then expires
        # from the shared log: spending it later would be more generous than the limit).
        lifetime = self._ttl_s if grant.granted else max(decision.retry_after_s, 0.001)
        expires_at = min(now + min(lifetime, window_s / 2), oldest_at + window_s / 2)
        self._leases[key] = _Lease(
            limit, window_s, carry + grant.granted, size, cost, now, oldest_at, expires_at, decision
        )
        self._leases.move_to_end(key)
        while len(self._leases) > self._max_keys:
            evicted, _ = self._leases.popitem(last=False)
            evicted_lock = self._locks.get(evicted)
            if evicted_lock is not None and not evicted_lock.locked():
                del self._locks[evicted]

    def _next_size(self, previous: _Lease | None, limit: int) -> int:
        ceiling = max(1, min(self._max_lease, limit // LEASE_FRACTION))
        if previous is None or not previous.decision.allowed:
            return 1
        # Renewed before it expired: the lease ran out (for this request), so the key is busy.
        spent_in_time = self._clock() < previous.expires_at
        size = previous.size * 2 if spent_in_time else previous.size // 2
        return max(1, min(ceiling, size))
