"""LeasedLimiter: replicas spend leased hits locally, and the shared limit still holds exactly."""

from __future__ import annotations

import asyncio

import pytest

from lib.accounts.leases import LEASE_FRACTION, MAX_LEASE, LeasedLimiter
from lib.accounts.rate_limit import Grant, SlidingWindowLimiter
from tests.fake_clock import FakeClock


class Shared:
    """The application's one limiter, in process, on the same fake clock; counts round trips."""

    def __init__(self, clock: FakeClock, delay_s: float = 0.0) -> None:
        self.limiter = SlidingWindowLimiter(clock=clock)
        self.calls: list[tuple[str, int]] = []
        self.delay_s = delay_s

    async def take(self, key: str, limit: int, window_s: int, count: int, minimum: int = 1) -> Grant:
        self.calls.append((key, count))
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        return self.limiter.take(key, limit, window_s, count, minimum=minimum)


def run_hits(limiter: LeasedLimiter, n: int, limit: int, window_s: int = 60, key: str = "k") -> list[bool]:
    async def go() -> list[bool]:
        return [(await limiter.hit(key, limit, window_s)).allowed for _ in range(n)]

    return asyncio.run(go())


def test_small_limits_lease_one_hit_at_a_time_and_stay_exact_across_replicas() -> None:
    clock = FakeClock()
    shared = Shared(clock)
    replicas = [LeasedLimiter(shared, clock=clock) for _ in range(2)]
    allowed = 0
    for i in range(20):
        allowed += run_hits(replicas[i % 2], 1, limit=10).count(True)
    assert allowed == 10
    assert {count for _, count in shared.calls} == {1}


def test_a_busy_key_needs_few_round_trips_and_never_exceeds_the_limit() -> None:
    clock = FakeClock()
    shared = Shared(clock)
    limit = 20_000
    replicas = [LeasedLimiter(shared, clock=clock) for _ in range(2)]
    allowed = 0
    for _ in range(100):
        clock.now += 0.01  # 100 hits per 10 ms on each replica: well inside the lease TTL
        for replica in replicas:
            allowed += run_hits(replica, 100, limit=limit).count(True)
    # Unspent tokens on one replica can make the other hit the limit early: never more than one
    # lease per replica. Draining both replicas then allows exactly the rest, never more.
    assert limit - 2 * MAX_LEASE <= allowed <= limit
    for replica in replicas:
        while run_hits(replica, 1, limit=limit)[0]:
            allowed += 1
    assert allowed == limit
    assert max(count for _, count in shared.calls) == min(MAX_LEASE, limit // LEASE_FRACTION)
    assert len(shared.calls) < limit / 16  # leases grew: one round trip per many hits


def test_unspent_tokens_expire_with_the_lease_and_are_never_spent_late() -> None:
    clock = FakeClock()
    shared = Shared(clock)
    limiter = LeasedLimiter(shared, clock=clock, ttl_s=1.0)
    assert all(run_hits(limiter, 10, limit=10_000))  # leases of 1, 2, 4, 8: 15 hits taken
    taken = sum(count for _, count in shared.calls)
    assert taken == 15
    clock.now += 1.5  # the lease expired with 5 unspent tokens
    calls_before = len(shared.calls)
    assert run_hits(limiter, 1, limit=10_000) == [True]
    assert len(shared.calls) == calls_before + 1  # a new lease, not a leftover token


def test_a_denial_is_remembered_until_a_slot_frees() -> None:
    clock = FakeClock()
    shared = Shared(clock)
    limiter = LeasedLimiter(shared, clock=clock)
    assert run_hits(limiter, 3, limit=3, window_s=60) == [True, True, True]
    denied = run_hits(limiter, 5, limit=3, window_s=60)
    assert denied == [False] * 5
    assert len(shared.calls) == 4  # three hits and ONE denial; the other four answered locally
    decision = asyncio.run(limiter.hit("k", 3, 60))
    assert not decision.allowed and 59.0 <= decision.retry_after_s <= 60.0
    clock.now += 30.5  # the denial is held at most half a window, then the limiter is asked again
    assert run_hits(limiter, 1, limit=3, window_s=60) == [False]
    assert len(shared.calls) == 5
    clock.now += 30.0  # the first hits' window has passed: slots are free again
    assert run_hits(limiter, 1, limit=3, window_s=60) == [True]


def test_a_changed_limit_replaces_the_lease() -> None:
    clock = FakeClock()
    shared = Shared(clock)
    limiter = LeasedLimiter(shared, clock=clock)
    run_hits(limiter, 5, limit=10_000)
    calls = len(shared.calls)
    assert run_hits(limiter, 1, limit=50) == [True]
    assert len(shared.calls) == calls + 1 and shared.calls[-1] == ("k", 1)


def test_concurrent_requests_share_one_renewal_at_a_time() -> None:
    clock = FakeClock()
    shared = Shared(clock, delay_s=0.01)
    limiter = LeasedLimiter(shared, clock=clock)

    async def burst() -> list[bool]:
        decisions = await asyncio.gather(*(limiter.hit("k", 100_000, 60) for _ in range(60)))
        return [d.allowed for d in decisions]

    assert all(asyncio.run(burst()))
    # Sizes 1, 2, 4, 8, 16, 32, 64 cover 60 requests in 6 renewals, none of them concurrent.
    assert len(shared.calls) <= 6


def test_remaining_counts_down_through_local_tokens() -> None:
    clock = FakeClock()
    limiter = LeasedLimiter(Shared(clock), clock=clock)

    async def remaining(n: int) -> list[int]:
        return [(await limiter.hit("k", 10_000, 60)).remaining for _ in range(n)]

    counts = asyncio.run(remaining(12))
    assert counts == sorted(counts, reverse=True) and len(set(counts)) == 12
    assert counts[-1] == 10_000 - 12


@pytest.mark.parametrize("kwargs", [{"ttl_s": 0}, {"max_lease": 0}, {"max_keys": 0}])
def test_invalid_configuration_is_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        LeasedLimiter(Shared(FakeClock()), **kwargs)  # type: ignore[arg-type]
