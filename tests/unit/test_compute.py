"""Compute budgets and concurrency caps: costs, the shared counts, leases, the gate, the store.

The store tests run on SQLite and PostgreSQL (skipped with the reason when PostgreSQL cannot be
reached, unless SEALSERVE_REQUIRE_POSTGRES=1), the schema upgrade of an older database included.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone
from typing import Any

import pytest
from sqlalchemy import Column, MetaData, Table, create_engine, insert, inspect, select

from lib.accounts.auth import Principal
from lib.accounts.compute import CLASSIFY_COST, ComputeGate, generation_cost
from lib.accounts.concurrency import ConcurrencySlots, GenerationGrant, SharedCompute
from lib.accounts.gate import Admission, usage_record
from lib.accounts.leases import LeasedLimiter
from lib.accounts.rate_limit import Grant, RateLimitSpec, SlidingWindowLimiter, parse_budget
from lib.accounts.records import DEFAULT_BUDGET, DEFAULT_MAX_CONCURRENT, UsageRecord
from lib.accounts.store import UNCHANGED, AccountStore
from lib.accounts.tables import ADDED_COLUMNS, AccountsBase
from lib.errors import NotFoundError, RateLimitedError, ValidationFailedError
from tests.fake_clock import FakeClock

HOUR = 3600


class Shared:
    """The application's one limiter (deployments/rate_limiter.py) in process; counts round trips."""

    def __init__(self, clock: FakeClock) -> None:
        self.limiter = SlidingWindowLimiter(clock=clock)
        self.compute = SharedCompute(self.limiter, ConcurrencySlots(clock=clock))
        self.calls: list[str] = []

    async def take(self, key: str, limit: int, window_s: int, count: int, minimum: int = 1) -> Grant:
        self.calls.append("take")
        return self.limiter.take(key, limit, window_s, count, minimum=minimum)

    async def admit_generation(
        self, subject: str, budget: RateLimitSpec | None, cost: int, max_concurrent: int, ttl_s: float
    ) -> GenerationGrant:
        self.calls.append("admit_generation")
        return self.compute.admit_generation(subject, budget, cost, max_concurrent, ttl_s)

    async def release(self, subject: str, slot: int) -> None:
        self.calls.append("release")
        self.compute.release(subject, slot)


def principal(budget: str | None = "100/hour", max_concurrent: int | None = None) -> Principal:
    return Principal(
        "key1", frozenset({"infer", "classify"}), "api_key", None,
        parse_budget(budget) if budget else None, max_concurrent,
    )


# --- costs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("width", "height", "steps", "images", "cost"),
    [
        (512, 512, 1, 1, 1),
        (512, 512, 30, 1, 30),
        (1024, 1024, 150, 4, 2400),  # the most expensive request
        (256, 256, 10, 1, 3),  # 2.5 rounds up
        (256, 256, 1, 1, 1),  # never free
        (768, 512, 20, 2, 60),
    ],
)
def test_a_generation_costs_its_image_steps_rounded_up(
    width: int, height: int, steps: int, images: int, cost: int
) -> None:
    assert generation_cost(width=width, height=height, steps=steps, images=images) == cost


# --- the shared side ------------------------------------------------------------------------------


def test_a_charge_is_all_or_nothing_and_says_when_it_would_fit() -> None:
    limiter = SlidingWindowLimiter()
    assert limiter.take("b", 100, HOUR, 60, now=0.0, minimum=60).granted == 60
    assert limiter.take("b", 100, HOUR, 30, now=10.0, minimum=30).granted == 30
    refused = limiter.take("b", 100, HOUR, 30, now=20.0, minimum=30)
    # 10 remain: 30 fit only once the first 60 expire (at 3600), not when 20 would.
    assert (refused.granted, refused.decision.remaining) == (0, 10)
    assert refused.decision.retry_after_s == pytest.approx(HOUR - 20.0)
    assert limiter.take("b", 100, HOUR, 10, now=20.0, minimum=10).granted == 10
    assert limiter.take("b", 100, HOUR, 30, now=HOUR + 0.5, minimum=30).granted == 30


def test_slots_are_counted_per_key_released_once_and_expire() -> None:
    clock = FakeClock()
    slots = ConcurrencySlots(clock=clock)
    first, _ = slots.acquire("k", 2, ttl_s=60)
    second, in_use = slots.acquire("k", 2, ttl_s=60)
    assert first is not None and second is not None and in_use == 2
    assert slots.acquire("k", 2, ttl_s=60) == (None, 2)
    assert slots.acquire("other", 2, ttl_s=60)[0] is not None
    assert slots.release("k", first) and not slots.release("k", first)  # idempotent
    assert slots.acquire("k", 2, ttl_s=60)[0] is not None
    clock.now += 61  # an ingress that died never gave its slots back: they free themselves
    assert slots.in_use("k") == 0


def test_a_generation_refused_for_either_limit_takes_nothing() -> None:
    clock = FakeClock()
    shared = SharedCompute(SlidingWindowLimiter(clock=clock), ConcurrencySlots(clock=clock))
    budget = RateLimitSpec(100, HOUR)
    held = shared.admit_generation("k", budget, 40, 1, 60)
    assert held.refused is None and held.slot is not None and held.budget is not None
    assert held.budget.remaining == 60
    busy = shared.admit_generation("k", budget, 40, 1, 60)
    assert (busy.refused, busy.slot, busy.in_use) == ("concurrency", None, 1)
    assert shared.release("k", held.slot)
    # The refusal for concurrency charged nothing: 60 remain, so 60 fit and 1 more does not.
    broke = shared.admit_generation("k", budget, 61, 1, 60)
    assert (broke.refused, broke.slot) == ("budget", None)
    assert broke.retry_after_s == pytest.approx(HOUR)
    fits = shared.admit_generation("k", budget, 60, 1, 60)
    assert fits.refused is None and fits.budget is not None and fits.budget.remaining == 0


# --- leases carry weighted costs exactly ----------------------------------------------------------


def test_budgets_stay_exact_across_replicas_with_mixed_costs() -> None:
    clock = FakeClock()
    shared = Shared(clock)
    replicas = [LeasedLimiter(shared, clock=clock) for _ in range(2)]
    costs = [1, 30, 3, 1, 60, 1, 30, 1, 1, 3] * 10

    async def go() -> int:
        spent = 0
        for i, cost in enumerate(costs):
            decision = await replicas[i % 2].hit("budget:k", 500, HOUR, cost)
            spent += cost if decision.allowed else 0
        return spent

    spent = asyncio.run(go())
    # A budget of 500 leases at most 500 // 100 = 5 units beyond a request's cost: the two
    # replicas can strand at most that much each, never spend more than the budget.
    assert 500 - 2 * 5 - max(costs) < spent <= 500
    assert shared.limiter.take("budget:k", 500, HOUR, 1, minimum=1).decision.remaining <= 500 - spent


def test_a_lease_keeps_its_tokens_when_a_larger_request_renews_it() -> None:
    clock = FakeClock()
    shared = Shared(clock)
    limiter = LeasedLimiter(shared, clock=clock)

    async def go() -> None:
        for _ in range(8):  # grow the lease: 1, 2, 4, 8 ... up to 20 (2000 // 100)
            await limiter.hit("b", 2000, HOUR, 1)
        await limiter.hit("b", 2000, HOUR, 30)

    asyncio.run(go())
    counted = 2000 - shared.limiter.take("b", 2000, HOUR, 1, minimum=1).decision.remaining - 1
    assert counted <= 8 + 30 + 20  # what was spent plus at most one lease


def test_a_denied_large_request_does_not_refuse_a_small_one() -> None:
    clock = FakeClock()
    shared = Shared(clock)
    limiter = LeasedLimiter(shared, clock=clock)

    async def go() -> list[bool]:
        return [
            (await limiter.hit("b", 100, HOUR, 95)).allowed,
            (await limiter.hit("b", 100, HOUR, 10)).allowed,  # 5 remain
            (await limiter.hit("b", 100, HOUR, 20)).allowed,  # remembered: no round trip
            (await limiter.hit("b", 100, HOUR, 5)).allowed,  # smaller: asked again, fits
        ]

    assert asyncio.run(go()) == [True, False, False, True]
    assert shared.calls == ["take", "take", "take"]


# --- the gate -------------------------------------------------------------------------------------


def test_a_classify_charge_needs_no_round_trip_once_leased() -> None:
    clock = FakeClock()
    shared = Shared(clock)
    gate = ComputeGate(shared, default_steps=30, slot_ttl_s=60)
    who = principal("20000/hour")

    async def go() -> None:
        for _ in range(200):
            charge = await gate.charge(who, CLASSIFY_COST, generation=False)
            assert charge.refused is None and charge.cost == 1

    asyncio.run(go())
    assert shared.calls.count("take") < 20  # leases of up to 64 units


def test_an_admission_charges_a_generation_reports_it_and_gives_the_slot_back() -> None:
    clock = FakeClock()
    shared = Shared(clock)
    gate = ComputeGate(shared, default_steps=30, slot_ttl_s=60)
    who = principal("100/hour", max_concurrent=1)

    async def go() -> None:
        first = Admission(who, None, compute=gate)
        assert await first.charge_generation(width=512, height=512, steps=None, images=2) == 60
        assert first.headers() == {"X-Cost": "60", "X-Budget-Remaining": "40"}
        second = Admission(who, None, compute=gate)
        with pytest.raises(RateLimitedError, match="maximum of 1 concurrent"):
            await second.charge_generation(width=512, height=512, steps=10, images=1)
        assert second.headers() == {"X-Cost": "0", "Retry-After": "1"}
        first.release()
        first.release()  # idempotent
        await asyncio.sleep(0)  # the release runs in the background
        third = Admission(who, None, compute=gate)
        with pytest.raises(RateLimitedError, match="budget of 100/hour image-steps exceeded") as info:
            await third.charge_generation(width=512, height=512, steps=41, images=1)
        assert "costs 41, 40 remain" in info.value.message
        assert int(third.headers()["Retry-After"]) == HOUR
        with pytest.raises(ValidationFailedError, match="more than this key's whole budget"):
            await Admission(who, None, compute=gate).charge_generation(
                width=1024, height=1024, steps=30, images=1
            )
        record = usage_record(first, endpoint="POST /v1/infer", status_code=200, latency_ms=1.0)
        refused = usage_record(second, endpoint="e", status_code=429, latency_ms=1)
        assert (record.cost, refused.cost) == (60, 0)

    asyncio.run(go())
    assert shared.calls.count("release") == 1


def test_an_unlimited_key_is_charged_without_asking_anyone() -> None:
    shared = Shared(FakeClock())
    gate = ComputeGate(shared, default_steps=30, slot_ttl_s=60)

    async def go() -> dict[str, str]:
        admission = Admission(principal(None, None), None, compute=gate)
        await admission.charge_generation(width=1024, height=1024, steps=150, images=4)
        return admission.headers()

    assert asyncio.run(go()) == {"X-Cost": "2400"}
    assert shared.calls == []


# --- the store, on both backends ------------------------------------------------------------------


def test_keys_carry_budgets_that_can_be_changed_and_lifted(database_url: str) -> None:
    with AccountStore(database_url) as store:
        created = store.create_key("k", "infer", "60/minute", budget="500/minute", max_concurrent=3)
        assert (created.record.budget, created.record.max_concurrent) == ("500/minute", 3)
        key_id = created.record.id
        updated = store.update_key(key_id, budget=None, max_concurrent=UNCHANGED)
        assert (updated.budget, updated.max_concurrent, updated.rate_limit) == (None, 3, "60/minute")
        updated = store.update_key(key_id, rate_limit="5/second", max_concurrent=None)
        assert (updated.budget, updated.max_concurrent, updated.rate_limit) == (None, None, "5/second")
        assert store.lookup_key(created.key) == updated
        assert updated.compute_limits == (None, None)
        with pytest.raises(ValidationFailedError, match="invalid budget"):
            store.update_key(key_id, budget="lots")
        with pytest.raises(ValidationFailedError, match="max_concurrent"):
            store.create_key("k", "infer", "60/minute", max_concurrent=0)
        with pytest.raises(NotFoundError):
            store.update_key("nope", budget="1/hour")


def test_usage_reports_the_cost(database_url: str) -> None:
    now = datetime.now(timezone.utc)
    with AccountStore(database_url) as store:
        store.record_usage(
            [
                UsageRecord("a", "POST /v1/infer", 200, 5.0, "m", 2, now, cost=60),
                UsageRecord("a", "POST /v1/classify", 200, 5.0, "c", 1, now, cost=1),
                UsageRecord("b", "POST /v1/infer", 429, 5.0, None, 0, now, cost=0),
            ]
        )
        assert store.usage_summary("a").total_cost == 61
        assert {s.group: s.cost for s in store.usage_stats("key")} == {"a": 61, "b": 0}


def test_an_older_database_gains_the_columns_and_its_keys_the_default_limits(database_url: str) -> None:
    # The tables as they were before budgets: every current column but the added ones.
    added = {(table, column) for table, column, _, _ in ADDED_COLUMNS}
    old = MetaData()
    for table in AccountsBase.metadata.sorted_tables:
        columns: list[Column[Any]] = [c._copy() for c in table.columns if (table.name, c.name) not in added]
        Table(table.name, old, *columns)
    engine = create_engine(database_url)
    try:
        old.create_all(engine)
        with engine.begin() as conn:
            conn.execute(
                insert(old.tables["api_keys"]).values(
                    id="oldkey", key_hash="0" * 64, prefix="ss_old", name="old", scopes="infer",
                    rate_limit="60/minute", revoked=False, created_at=datetime.now(timezone.utc),
                )
            )
            conn.execute(
                insert(old.tables["usage_records"]).values(
                    key_id="oldkey", endpoint="POST /v1/infer", status_code=200, latency_ms=1.0,
                    image_count=1, timestamp=datetime.now(timezone.utc),
                )
            )
    finally:
        engine.dispose()
    for _ in range(2):  # the second start finds nothing to add
        with AccountStore(database_url) as store:
            record = store.get_key("oldkey")
            assert record is not None
            assert (record.budget, record.max_concurrent) == (DEFAULT_BUDGET, DEFAULT_MAX_CONCURRENT)
            assert store.usage_summary("oldkey").total_cost == 0
            created = store.create_key("new", "infer", "60/minute")  # no limits given: unlimited
            assert (created.record.budget, created.record.max_concurrent) == (None, None)
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            assert {"budget", "max_concurrent"} <= {c["name"] for c in inspect(conn).get_columns("api_keys")}
            assert conn.execute(select(old.tables["usage_records"].c.key_id)).scalars().all() == ["oldkey"]
    finally:
        engine.dispose()
