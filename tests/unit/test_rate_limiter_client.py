"""RateLimiterClient: the ingress's side of the shared limiter, with a fake deployment handle."""

from __future__ import annotations

import asyncio
from collections.abc import Generator
from typing import Any

import pytest

from deployments.rate_limiter import RateLimiterClient
from lib.accounts.rate_limit import Grant, RateDecision
from lib.errors import ServiceUnavailableError

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


def hit(handle: FakeHandle, timeout_s: float = 1.0) -> Grant:
    client = RateLimiterClient(handle, timeout_s=timeout_s)  # type: ignore[arg-type]
    return asyncio.run(client.take("k1", 5, 60, 1))


def test_the_decision_comes_back() -> None:
    handle = FakeHandle(FakeResponse(DECISION))
    assert hit(handle) == DECISION
    assert handle.calls == [("k1", 5, 60, 1, 1)]  # one unit, at least one


def test_a_slow_limiter_is_503_and_the_call_is_cancelled() -> None:
    response = FakeResponse(DECISION, delay_s=5.0)
    with pytest.raises(ServiceUnavailableError, match="rate limiter"):
        hit(FakeHandle(response), timeout_s=0.05)
    assert response.cancelled


def test_a_failing_limiter_is_503_without_retry() -> None:
    handle = FakeHandle(FakeResponse(RuntimeError("replica died")))
    with pytest.raises(ServiceUnavailableError, match="rate limiter"):
        hit(handle)
    assert len(handle.calls) == 1  # a hit is not idempotent: never sent twice
