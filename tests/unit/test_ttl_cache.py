"""TtlCache: one lookup per TTL per key, shorter TTL for misses, LRU bound, invalidation."""

from __future__ import annotations

import pytest

from lib.ttl_cache import TtlCache


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Lookup:
    def __init__(self, values: dict[str, str]) -> None:
        self.values = values
        self.calls: list[str] = []

    def __call__(self, key: str) -> str | None:
        self.calls.append(key)
        return self.values.get(key)


def make(values: dict[str, str], **kwargs: float) -> tuple[TtlCache[str, str], Lookup, Clock]:
    lookup, clock = Lookup(values), Clock()
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
