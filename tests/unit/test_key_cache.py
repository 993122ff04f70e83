"""KeyCache: hits skip the store, revocation takes effect after the TTL, bad keys are cached briefly."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from lib.accounts.key_cache import KeyCache
from lib.accounts.records import KeyRecord, generate_api_key, hash_api_key
from lib.accounts.store import AccountStore
from lib.errors import ServiceUnavailableError

T0 = datetime(2025, 3, 10, 12, 0, tzinfo=timezone.utc)


class Ticker:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class CountingLookup:
    def __init__(self, records: dict[str, KeyRecord]) -> None:
        self.records = records
        self.calls: list[str] = []

    def __call__(self, key_hash: str) -> KeyRecord | None:
        self.calls.append(key_hash)
        return self.records.get(key_hash)


def record(**fields: object) -> KeyRecord:
    values: dict[str, object] = {
        "id": "k1", "prefix": "ss_abcdefg", "name": "n", "scopes": ("infer",),
        "rate_limit": "10/second", "created_at": T0,
    }
    values.update(fields)
    return KeyRecord(**values)  # type: ignore[arg-type]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[AccountStore]:
    with AccountStore(f"sqlite:///{tmp_path / 'keys.db'}") as account_store:
        yield account_store


def test_revoked_key_works_until_the_ttl_then_stops(store: AccountStore) -> None:
    ticker = Ticker()
    cache = KeyCache(store.lookup_key_hash, ttl_s=5.0, clock=ticker)
    created = store.create_key("ci", ["infer"], "10/second")
    assert cache.get(created.key) == created.record

    store.revoke_key(created.record.id)
    assert store.lookup_key(created.key) is None
    ticker.now += 4.9
    assert cache.get(created.key) == created.record  # still cached: at most one TTL of grace
    ticker.now += 0.2
    assert cache.get(created.key) is None


def test_hits_within_the_ttl_do_not_query_and_only_the_hash_is_passed() -> None:
    key = generate_api_key()
    lookup = CountingLookup({hash_api_key(key): record()})
    ticker = Ticker()
    cache = KeyCache(lookup, ttl_s=5.0, clock=ticker)
    for _ in range(100):
        assert cache.get(key) is not None
    assert lookup.calls == [hash_api_key(key)]
    assert all(key not in cached for cached in [*cache._known, *cache._unknown])
    ticker.now += 5.0
    cache.get(key)
    assert len(lookup.calls) == 2


def test_unknown_keys_are_cached_for_the_negative_ttl() -> None:
    lookup = CountingLookup({})
    ticker = Ticker()
    cache = KeyCache(lookup, ttl_s=5.0, negative_ttl_s=1.0, clock=ticker)
    bad = generate_api_key()
    for _ in range(50):
        assert cache.get(bad) is None
    assert len(lookup.calls) == 1
    ticker.now += 1.0
    assert cache.get(bad) is None
    assert len(lookup.calls) == 2


def test_malformed_keys_never_reach_the_store() -> None:
    lookup = CountingLookup({})
    cache = KeyCache(lookup)
    for junk in ["", "Bearer", "ss_short", "x" * 46, "ss_" + "!" * 43]:
        assert cache.get(junk) is None
    assert lookup.calls == []
    assert len(cache) == 0


def test_a_cached_key_still_expires_on_time() -> None:
    key = generate_api_key()
    expiring = record(expires_at=T0 + timedelta(seconds=2))
    wall = [T0]
    cache = KeyCache(
        CountingLookup({hash_api_key(key): expiring}), ttl_s=60.0, clock=Ticker(), wall_clock=lambda: wall[0]
    )
    assert cache.get(key) == expiring
    wall[0] = T0 + timedelta(seconds=2)
    assert cache.get(key) is None


def test_cache_is_bounded_and_can_be_invalidated() -> None:
    keys = [generate_api_key() for _ in range(3)]
    lookup = CountingLookup({hash_api_key(k): record(id=str(i)) for i, k in enumerate(keys)})
    cache = KeyCache(lookup, max_entries=2, clock=Ticker())
    for key in keys:
        cache.get(key)
    assert len(cache) == 2
    cache.get(keys[0])  # evicted as least recently used: queried again
    assert len(lookup.calls) == 4
    cache.invalidate(keys[0])
    cache.get(keys[0])
    assert len(lookup.calls) == 5
    cache.clear()
    assert len(cache) == 0


# -- failed-auth traffic (issue: a lookup per random key, and valid keys evicted) -----------------


def test_random_keys_neither_query_per_key_nor_evict_valid_keys() -> None:
    valid = generate_api_key()
    lookup = CountingLookup({hash_api_key(valid): record()})
    ticker = Ticker()
    cache = KeyCache(
        lookup, ttl_s=5.0, max_entries=50, unknown_lookups_per_s=10, unknown_burst=20, clock=ticker
    )
    assert cache.get(valid) is not None

    refused = 0
    for _ in range(5000):  # an attacker's well-shaped random keys, all within one second
        try:
            assert cache.get(generate_api_key()) is None
        except ServiceUnavailableError:
            refused += 1
    assert len(lookup.calls) == 20  # the valid key and the rest of the burst: not one query per key
    assert refused == 5000 - 19
    assert cache.get(valid) is not None  # still cached: the flood evicted nothing
    assert len(lookup.calls) == 20


def test_a_key_seen_valid_is_refreshed_even_when_the_budget_is_spent() -> None:
    valid = generate_api_key()
    lookup = CountingLookup({hash_api_key(valid): record()})
    ticker = Ticker()
    cache = KeyCache(lookup, ttl_s=5.0, unknown_lookups_per_s=1, unknown_burst=1, clock=ticker)
    assert cache.get(valid) is not None  # takes the one token
    ticker.now += 0.5
    with pytest.raises(ServiceUnavailableError):
        cache.get(generate_api_key())
    ticker.now += 5.0  # the positive entry is stale; the budget has one token again, spend it
    assert cache.get(generate_api_key()) is None
    assert cache.get(valid) is not None  # a refresh: not held back by the spent budget
    assert lookup.calls.count(hash_api_key(valid)) == 2


def test_the_budget_refills_over_time() -> None:
    lookup = CountingLookup({})
    ticker = Ticker()
    cache = KeyCache(lookup, unknown_lookups_per_s=2, unknown_burst=2, clock=ticker)
    for _ in range(2):
        assert cache.get(generate_api_key()) is None
    with pytest.raises(ServiceUnavailableError):
        cache.get(generate_api_key())
    ticker.now += 1.0
    assert cache.get(generate_api_key()) is None
    assert len(lookup.calls) == 3


def test_the_database_down_known_keys_answer_within_the_grace_and_unknown_ones_fail() -> None:
    ticker = Ticker()
    found = record(expires_at=None)
    calls = {"n": 0, "down": False}

    def lookup(digest: str) -> KeyRecord | None:
        calls["n"] += 1
        if calls["down"]:
            raise ServiceUnavailableError("database down")
        return found

    cache = KeyCache(lookup, ttl_s=5.0, clock=ticker, stale_grace_s=60.0, stale_on=(ServiceUnavailableError,))
    key = generate_api_key()
    assert cache.get(key) == found
    calls["down"] = True
    ticker.now += 30.0  # past the TTL, within the grace: answered from memory, asked again once
    assert cache.get(key) == found
    asked = calls["n"]
    assert cache.get(key) == found and calls["n"] == asked  # not asked again within a TTL
    ticker.now += 40.0  # past TTL + grace since it was last found
    with pytest.raises(ServiceUnavailableError):
        cache.get(key)
    with pytest.raises(ServiceUnavailableError):  # a key never seen valid is not guessed
        cache.get(generate_api_key())
