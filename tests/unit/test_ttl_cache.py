"""TtlCache: one lookup per TTL per key, shorter TTL for misses, LRU bound, invalidation."""

from __future__ import annotations

import pytest

from lib.ttl_cache import TtlCache
from tests.fake_clock import FakeClock


class Lookup:
    def __init__(self, values: dict[str, str]) -> None:
        self.values = values
        self.calls: list[str] = []

    def __call__(self, key: str) -> str | None:
        self.calls.append(key)
        return self.values.get(key)


def make(values: dict[str, str], **kwargs: float) -> tuple[TtlCache[str, str], Lookup, FakeClock]:
    lookup, clock = Lookup(values), FakeClock(0.0)
    options = {"ttl_s": 5.0, "negative_ttl_s": 1.0, **kwargs}
    cache = TtlCache(lookup, clock=clock, **options)  # type: ignore[arg-type]
    return cache, lookup, clock


def test_hits_are_served_until_the_ttl_ends() -> None:
    cache, lookup, clock = make({"a": "A"})
    assert [cache.get("a") for _ in range(3)] == ["A"] * 3
    assert lookup.calls == ["a"]
    clock.now = 4.99
    lookup.values["a"] = "changed"
    assert cache.get("a") == "A"
    clock.now = 5.0
    assert cache.get("a") == "changed"
    assert lookup.calls == ["a", "a"]


def test_misses_are_cached_for_the_negative_ttl() -> None:
    cache, lookup, clock = make({})
    assert cache.get("x") is None and cache.get("x") is None
    assert lookup.calls == ["x"]
    clock.now = 1.0
    lookup.values["x"] = "X"
    assert cache.get("x") == "X"


def test_invalidate_forgets_one_key() -> None:
    cache, lookup, _ = make({"a": "A", "b": "B"})
    cache.get("a"), cache.get("b")
    cache.invalidate("a")
    cache.invalidate("never-seen")
    cache.get("a"), cache.get("b")
    assert lookup.calls == ["a", "b", "a"]


def test_least_recently_used_entries_go_first() -> None:
    cache, lookup, _ = make({k: k.upper() for k in "abc"}, max_entries=2)
    cache.get("a"), cache.get("b"), cache.get("a"), cache.get("c")  # b is the least recent
    assert len(cache) == 2
    cache.get("a")
    cache.get("b")
    assert lookup.calls == ["a", "b", "c", "b"]


def test_zero_ttl_always_looks_up() -> None:
    cache, lookup, _ = make({"a": "A"}, ttl_s=0.0)
    cache.get("a"), cache.get("a")
    assert lookup.calls == ["a", "a"]


@pytest.mark.parametrize("kwargs", [{"ttl_s": -1.0}, {"negative_ttl_s": -1.0}, {"max_entries": 0}])
def test_bad_bounds_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        make({}, **kwargs)


# --- stale on error (the database down) ------------------------------------------------------------


class Down(Exception):
    pass


class FailingLookup(Lookup):
    def __init__(self, values: dict[str, str]) -> None:
        super().__init__(values)
        self.down = False

    def __call__(self, key: str) -> str | None:
        self.calls.append(key)
        if self.down:
            raise Down("database down")
        return self.values.get(key)


def stale_cache(grace_s: float) -> tuple[TtlCache[str, str], FailingLookup, FakeClock]:
    lookup, clock = FailingLookup({"a": "A"}), FakeClock(0.0)
    cache = TtlCache(lookup, ttl_s=5.0, negative_ttl_s=1.0, clock=clock, stale_grace_s=grace_s,
                     stale_on=(Down,))
    return cache, lookup, clock


def test_a_known_entry_outlives_an_outage_for_the_grace_only() -> None:
    cache, lookup, clock = stale_cache(grace_s=60.0)
    assert cache.get("a") == "A"
    lookup.down = True
    clock.now = 10.0
    assert cache.get("a") == "A"  # stale, within 5 s TTL + 60 s grace of its lookup
    clock.now = 12.0
    assert cache.get("a") == "A"
    assert lookup.calls == ["a", "a"]  # asked again only after a TTL, not on every request
    clock.now = 65.1
    with pytest.raises(Down):
        cache.get("a")  # past the grace: the outage shows


def test_an_unknown_or_refused_key_is_never_served_stale() -> None:
    cache, lookup, clock = stale_cache(grace_s=60.0)
    assert cache.get("nope") is None  # cached as not found
    lookup.down = True
    clock.now = 2.0
    with pytest.raises(Down):
        cache.get("nope")
    with pytest.raises(Down):
        cache.get("never-seen")


def test_other_errors_and_a_zero_grace_fail_as_before() -> None:
    cache, lookup, clock = stale_cache(grace_s=0.0)
    cache.get("a")
    lookup.down = True
    clock.now = 5.5
    with pytest.raises(Down):
        cache.get("a")
    cache, lookup, clock = stale_cache(grace_s=60.0)
    cache.get("a")
    lookup.values = None  # type: ignore[assignment]  # a bug in the lookup: AttributeError
    lookup.down = False
    clock.now = 6.0
    with pytest.raises(AttributeError):
        cache.get("a")
