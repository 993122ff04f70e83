"""RateLimiterClient: the ingress's side of the shared limiter, with a fake deployment handle."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Generator
from typing import Any

import pytest

from deployments.rate_limiter import DEGRADED_MESSAGE, RateLimiterClient
from lib.accounts.rate_limit import Grant, RateDecision, RateLimitSpec
from tests.fake_clock import FakeClock

DECISION = Grant(1, RateDecision(True, 5, 4, 60.0, 0.0))


class FakeResponse:
    def __init__(self, outcome: Any, delay_s: float = 0.0) -> None:
        self.outcome = outcome
        self.delay_s = delay_s
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def __await__(self) -> Generator[Any, None, Any]:
        return self._wait().__await__()

    async def _wait(self) -> Any:
        await asyncio.sleep(self.delay_s)
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome


class FakeHandle:
    def __init__(self, response: FakeResponse) -> None:
        self.response = response
        self.calls: list[tuple[Any, ...]] = []
        self.take = self

    def remote(self, *args: Any) -> FakeResponse:
        self.calls.append(args)
        return self.response


def client_of(handle: FakeHandle, timeout_s: float = 1.0, replicas: int = 1,
              clock: FakeClock | None = None) -> RateLimiterClient:
    return RateLimiterClient(
        handle, timeout_s=timeout_s, replicas=lambda: replicas, fallback_s=5.0,  # type: ignore[arg-type]
        clock=clock or FakeClock(100.0),
    )


def hit(handle: FakeHandle, timeout_s: float = 1.0) -> Grant:
    return asyncio.run(client_of(handle, timeout_s).take("k1", 5, 60, 1))


def test_the_decision_comes_back() -> None:
    handle = FakeHandle(FakeResponse(DECISION))
    assert hit(handle) == DECISION
    assert handle.calls == [("k1", 5, 60, 1, 1)]  # one unit, at least one


def test_a_slow_limiter_is_cancelled_and_the_replica_counts_on_its_own() -> None:
    response = FakeResponse(DECISION, delay_s=5.0)
    grant = hit(FakeHandle(response), timeout_s=0.05)
    assert response.cancelled
    assert grant.granted == 1 and grant.decision.allowed


def test_a_failing_limiter_gives_way_to_a_per_replica_share(caplog: pytest.LogCaptureFixture) -> None:
    handle = FakeHandle(FakeResponse(RuntimeError("replica died")))
    clock = FakeClock(100.0)
    client = client_of(handle, replicas=4, clock=clock)

    async def take_all() -> list[bool]:
        return [(await client.take("k1", 100, 60, 1)).decision.allowed for _ in range(30)]

    with caplog.at_level(logging.WARNING):
        allowed = asyncio.run(take_all())
    assert allowed == [True] * 25 + [False] * 5  # 100/minute across 4 replicas: 25 here
    assert len(handle.calls) == 1  # a hit is not idempotent: never sent twice; then not asked
    assert client.degraded and client.health_errors() == [DEGRADED_MESSAGE]
    assert any("per-replica" in r.message or "share" in r.message for r in caplog.records)
    # After the fallback period the limiter is asked again; once it answers, shared limits are back.
    clock.now += 6
    handle.response = FakeResponse(DECISION)
    assert asyncio.run(client.take("k1", 100, 60, 1)) == DECISION
    assert not client.degraded and client.health_errors() == []


def test_a_cost_above_the_share_is_refused_not_half_charged() -> None:
    client = client_of(FakeHandle(FakeResponse(RuntimeError("down"))), replicas=10)
    grant = asyncio.run(client.take("k1", 100, 3600, 60, minimum=60))  # share: 10
    assert grant.granted == 0 and not grant.decision.allowed


def test_generations_fall_back_to_local_slots_released_locally() -> None:
    handle = FakeHandle(FakeResponse(RuntimeError("down")))
    handle.admit_generation = handle  # type: ignore[attr-defined]
    handle.release = handle  # type: ignore[attr-defined]
    client = client_of(handle, replicas=2)

    async def run() -> None:
        first = await client.admit_generation("k1", RateLimitSpec(1000, 3600), 30, 4, 60.0)
        second = await client.admit_generation("k1", RateLimitSpec(1000, 3600), 30, 4, 60.0)
        third = await client.admit_generation("k1", RateLimitSpec(1000, 3600), 30, 4, 60.0)
        assert first.slot is not None and first.slot < 0 and second.slot is not None
        assert third.slot is None and third.refused is not None  # 4 at once across 2 replicas: 2
        await client.release("k1", first.slot)
        again = await client.admit_generation("k1", RateLimitSpec(1000, 3600), 30, 4, 60.0)
        assert again.slot is not None

    asyncio.run(run())
    assert len(handle.calls) == 1  # only the first call went to the (failed) limiter
