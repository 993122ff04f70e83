"""Rate limit specs and the sliding-log limiter: exact counts, sliding behaviour, threads, pruning."""

from __future__ import annotations

import threading
from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lib.accounts.rate_limit import RateLimitSpec, SlidingWindowLimiter, parse_rate_limit
from lib.errors import ValidationFailedError


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("60/minute", (60, 60)),
        ("1/second", (1, 1)),
        ("1000/hour", (1000, 3600)),
        ("5/day", (5, 86400)),
        (" 10 / Minutes ", (10, 60)),
        ("100000/DAY", (100000, 86400)),
    ],
)
def test_parse_valid_specs(spec: str, expected: tuple[int, int]) -> None:
    parsed = parse_rate_limit(spec)
    assert parsed == expected
    assert isinstance(parsed, RateLimitSpec)
    assert parse_rate_limit(str(parsed)) == parsed


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "expected N/second"),
        ("60", "expected N/second"),
        ("60/", "expected N/second"),
        ("-1/minute", "expected N/second"),
        ("1.5/minute", "expected N/second"),
        ("60/fortnight", "unit 'fortnight'"),
        ("60/s", "unit"),
        ("0/minute", "between 1 and"),
        ("100001/minute", "between 1 and"),
    ],
)
def test_parse_invalid_specs_explain_the_format(spec: str, message: str) -> None:
    with pytest.raises(ValidationFailedError, match=message) as info:
        parse_rate_limit(spec)
    assert info.value.status_code == 422


def test_exactly_limit_hits_are_allowed_at_one_instant() -> None:
    limiter = SlidingWindowLimiter()
    decisions = [limiter.hit("k", 10, 60, now=100.0) for _ in range(20)]
    assert sum(d.allowed for d in decisions) == 10
    assert all(d.allowed for d in decisions[:10]) and not any(d.allowed for d in decisions[10:])
    assert [d.remaining for d in decisions[:10]] == list(range(9, -1, -1))
    denied = decisions[-1]
    assert (denied.limit, denied.remaining, denied.retry_after_s, denied.reset_after_s) == (10, 0, 60, 60)
    assert decisions[0].retry_after_s == 0


def test_window_slides_hit_by_hit() -> None:
    limiter = SlidingWindowLimiter()
    for second in range(10):  # one hit a second fills 10/minute by t=9
        assert limiter.hit("k", 10, 60, now=float(second)).allowed
    blocked = limiter.hit("k", 10, 60, now=59.5)
    assert not blocked.allowed and blocked.retry_after_s == pytest.approx(0.5)
    assert blocked.reset_after_s == pytest.approx(9.5)  # until the t=9 hit leaves the window
    # At t=60 the t=0 hit has left the window: exactly one slot frees, not a whole new window.
    assert limiter.hit("k", 10, 60, now=60.0).allowed
    again = limiter.hit("k", 10, 60, now=60.0)
    assert not again.allowed and again.retry_after_s == pytest.approx(1.0)
    assert limiter.hit("k", 10, 60, now=61.0).allowed
    # Long after everything expired the full quota is back.
    fresh = limiter.hit("k", 10, 60, now=500.0)
    assert fresh.allowed and fresh.remaining == 9


def test_keys_are_limited_independently() -> None:
    limiter = SlidingWindowLimiter()
    assert limiter.hit("a", 1, 1, now=0.0).allowed
    assert not limiter.hit("a", 1, 1, now=0.5).allowed
    assert limiter.hit("b", 1, 1, now=0.5).allowed


@settings(max_examples=200, deadline=None)
@given(
    limit=st.integers(min_value=1, max_value=5),
    window=st.integers(min_value=1, max_value=10),
    gaps=st.lists(st.integers(min_value=0, max_value=6), min_size=1, max_size=60),
)
def test_limiter_matches_the_definition_of_a_sliding_window(limit: int, window: int, gaps: list[int]) -> None:
    """Allowed iff fewer than ``limit`` allowed hits fall in (now - window, now]; checked by brute force."""
    limiter = SlidingWindowLimiter()
    allowed_at: list[int] = []
    now = 0
    for gap in gaps:
        now += gap
        in_window = sum(1 for t in allowed_at if t > now - window)
        decision = limiter.hit("k", limit, window, now=float(now))
        assert decision.allowed == (in_window < limit)
        if decision.allowed:
            allowed_at.append(now)
        assert decision.remaining == limit - min(limit, in_window + decision.allowed)


def test_concurrent_hits_from_threads_stay_exact() -> None:
    limiter = SlidingWindowLimiter()
    results: deque[bool] = deque()
    start = threading.Barrier(8)

    def hammer() -> None:
        start.wait()
        for _ in range(50):
            results.append(limiter.hit("shared", 100, 60, now=1.0).allowed)

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 400
    assert sum(results) == 100


def test_idle_keys_are_pruned_explicitly_and_on_the_prune_interval() -> None:
    limiter = SlidingWindowLimiter(prune_interval_s=100)
    limiter.hit("short", 5, 1, now=0.0)
    limiter.hit("long", 5, 1000, now=0.0)
    assert len(limiter) == 2
    assert limiter.prune(now=2.0) == 1
    assert len(limiter) == 1
    limiter.hit("short", 5, 1, now=3.0)
    assert len(limiter) == 2
    limiter.hit("long", 5, 1000, now=150.0)  # past the interval: this hit sweeps idle keys
    assert len(limiter) == 1
    assert limiter.prune(now=2000.0) == 1  # past the long window too
    assert len(limiter) == 0


def test_the_default_clock_is_used_without_now() -> None:
    ticks = iter([10.0, 10.0, 10.5])
    limiter = SlidingWindowLimiter(clock=lambda: next(ticks))
    assert limiter.hit("k", 1, 1).allowed
    blocked = limiter.hit("k", 1, 1)
    assert not blocked.allowed and blocked.retry_after_s == pytest.approx(1.0)


def test_a_lowered_limit_applies_at_once() -> None:
    limiter = SlidingWindowLimiter()
    for t in range(5):
        assert limiter.hit("k", 10, 60, now=float(t)).allowed
    lowered = limiter.hit("k", 3, 60, now=5.0)
    assert not lowered.allowed and lowered.remaining == 0
    # Three slots are needed, so the hit at t=2 must expire (index len-limit = 2).
    assert lowered.retry_after_s == pytest.approx(57.0)


def test_invalid_arguments_are_refused() -> None:
    limiter = SlidingWindowLimiter()
    with pytest.raises(ValueError, match="limit"):
        limiter.hit("k", 0, 60, now=0.0)
    with pytest.raises(ValueError, match="window_s"):
        limiter.hit("k", 1, 0, now=0.0)
