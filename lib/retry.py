"""Bounded retries with exponential backoff and full jitter, for every network call."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry a call.

    ``attempts`` counts the first call, so ``attempts=1`` means no retry. The delay before retry
    *n* (1-based) is uniform in ``[0, min(max_delay, base_delay * 2**(n-1))]`` ("full jitter"), so
    replicas that fail together do not retry together.
    """

    attempts: int = 4
    base_delay: float = 0.2
    max_delay: float = 5.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.base_delay < 0 or self.max_delay < 0:
            raise ValueError("a retry policy needs attempts >= 1 and non-negative delays")

    def delay(self, retry_number: int, rng: random.Random | None = None) -> float:
        cap = min(self.max_delay, self.base_delay * (2 ** (retry_number - 1)))
        return (rng or random).uniform(0, cap)


def call_with_retries(
    fn: Callable[[], T],
    *,
    policy: RetryPolicy,
    retry_on: Callable[[BaseException], bool],
    what: str,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call ``fn`` until it succeeds, an error is not retryable, or the attempts run out.

    The last error is re-raised unchanged; callers translate it into their own error type with
    a message naming ``what`` failed.
    """
    for attempt in range(1, policy.attempts + 1):
        try:
            return fn()
        except Exception as exc:
            if attempt >= policy.attempts or not retry_on(exc):
                raise
            wait = policy.delay(attempt)
            log.warning(
                "%s failed (attempt %d/%d: %s); retrying in %.2fs",
                what, attempt, policy.attempts, type(exc).__name__, wait,
            )
            sleep(wait)
    raise AssertionError("unreachable")  # pragma: no cover
