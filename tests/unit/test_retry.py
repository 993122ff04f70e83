"""call_with_retries and RetryPolicy.delay: bounded attempts, full jitter, exponential cap."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable

import pytest

from lib.retry import RetryPolicy, call_with_retries


class Transient(Exception):
    pass


class Fatal(Exception):
    pass


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, Transient)


class Flaky:
    """Fails with the given errors in order, then returns ``result``."""

    def __init__(self, errors: list[Exception], result: str = "done") -> None:
        self.errors = list(errors)
        self.result = result
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return self.result


class SleepRecorder:
    def __init__(self) -> None:
        self.delays: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


def run(fn: Callable[[], str], policy: RetryPolicy, sleep: SleepRecorder) -> str:
    return call_with_retries(fn, policy=policy, retry_on=is_transient, what="fetching a thing", sleep=sleep)


@pytest.mark.parametrize("failures", [0, 1, 3])
def test_succeeds_after_transient_failures(failures: int) -> None:
    fn, sleep = Flaky([Transient(f"t{i}") for i in range(failures)]), SleepRecorder()
    assert run(fn, RetryPolicy(attempts=4), sleep) == "done"
    assert fn.calls == failures + 1
    assert len(sleep.delays) == failures


@pytest.mark.parametrize("attempts", [1, 2, 5])
def test_stops_at_attempts_and_reraises_the_last_error(attempts: int) -> None:
    errors = [Transient(f"failure {i}") for i in range(attempts + 3)]
    fn, sleep = Flaky(errors), SleepRecorder()
    with pytest.raises(Transient) as caught:
        run(fn, RetryPolicy(attempts=attempts), sleep)
    assert fn.calls == attempts
    assert caught.value is errors[attempts - 1]  # unchanged, not wrapped
    assert len(sleep.delays) == attempts - 1  # no sleep after the last attempt


def test_non_retryable_error_is_raised_at_once() -> None:
    fatal = Fatal("no")
    fn, sleep = Flaky([Transient("t"), fatal, Transient("never reached")]), SleepRecorder()
    with pytest.raises(Fatal) as caught:
        run(fn, RetryPolicy(attempts=5), sleep)
    assert caught.value is fatal
    assert fn.calls == 2
    assert len(sleep.delays) == 1


def test_retry_on_sees_each_error() -> None:
    seen: list[BaseException] = []
    errors = [Transient("a"), Transient("b")]

    def retry_on(exc: BaseException) -> bool:
        seen.append(exc)
        return True

    result = call_with_retries(
        Flaky(list(errors)),
        policy=RetryPolicy(attempts=3),
        retry_on=retry_on,
        what="x",
        sleep=SleepRecorder(),
    )
    assert result == "done"
    assert seen == errors


def test_base_exceptions_are_not_retried() -> None:
    fn, sleep = Flaky([KeyboardInterrupt()]), SleepRecorder()  # type: ignore[list-item]
    with pytest.raises(KeyboardInterrupt):
        call_with_retries(fn, policy=RetryPolicy(attempts=3), retry_on=lambda _e: True, what="x", sleep=sleep)
    assert fn.calls == 1 and sleep.delays == []


def test_retries_are_logged_without_the_error_message(caplog: pytest.LogCaptureFixture) -> None:
    fn = Flaky([Transient("token=abc123 secret")])
    with caplog.at_level(logging.WARNING, logger="lib.retry"):
        run(fn, RetryPolicy(attempts=2), SleepRecorder())
    [record] = caplog.records
    message = record.getMessage()
    assert "fetching a thing" in message and "1/2" in message and "Transient" in message
    assert "abc123" not in caplog.text


# --- delays ----------------------------------------------------------------------------------------------


def test_sleeps_use_the_policy_delays_within_the_growing_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    policy = RetryPolicy(attempts=8, base_delay=0.5, max_delay=4.0)
    fn, sleep = Flaky([Transient(str(i)) for i in range(7)]), SleepRecorder()
    monkeypatch.setattr("lib.retry.random", random.Random(1234))  # deterministic draws
    assert run(fn, policy, sleep) == "done"
    caps = [0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0]
    assert len(sleep.delays) == len(caps)
    for delay, cap in zip(sleep.delays, caps, strict=True):
        assert 0.0 <= delay <= cap
    # Jittered, not fixed: seven draws are not all equal.
    assert len(set(sleep.delays)) > 1


@pytest.mark.parametrize(
    ("retry_number", "cap"),
    [(1, 0.2), (2, 0.4), (3, 0.8), (4, 1.6), (5, 3.2), (6, 5.0), (7, 5.0), (30, 5.0)],
)
def test_delay_is_within_an_exponential_cap_clamped_at_max_delay(retry_number: int, cap: float) -> None:
    policy = RetryPolicy(base_delay=0.2, max_delay=5.0)
    rng = random.Random(retry_number)
    delays = [policy.delay(retry_number, rng) for _ in range(400)]
    assert all(0.0 <= d <= cap + 1e-12 for d in delays)
    # Full jitter spreads over the whole range: with 400 draws both ends are approached.
    assert min(delays) < 0.1 * cap
    assert max(delays) > 0.9 * cap


class EdgeRandom(random.Random):
    """Returns the upper bound of every uniform draw: exposes the cap itself."""

    def uniform(self, a: float, b: float) -> float:
        return b


@pytest.mark.parametrize(
    ("base", "max_delay", "expected"),
    [(0.2, 5.0, [0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]), (1.0, 3.0, [1.0, 2.0, 3.0, 3.0, 3.0, 3.0, 3.0])],
)
def test_cap_doubles_then_is_clamped(base: float, max_delay: float, expected: list[float]) -> None:
    policy = RetryPolicy(base_delay=base, max_delay=max_delay)
    assert [policy.delay(n, EdgeRandom()) for n in range(1, 8)] == pytest.approx(expected)


def test_default_policy() -> None:
    policy = RetryPolicy()
    assert (policy.attempts, policy.base_delay, policy.max_delay) == (4, 0.2, 5.0)


@pytest.mark.parametrize(
    "kwargs", [{"attempts": 0}, {"attempts": -1}, {"base_delay": -0.1}, {"max_delay": -1.0}]
)
def test_policy_refuses_values_that_would_never_call_or_sleep_backwards(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="attempts >= 1"):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]
