"""The application-wide side of compute limits: concurrency slots, and a generation's admission.

One instance lives in the application's one ``RateLimiter`` deployment (beside the rate limit's
:class:`lib.accounts.rate_limit.SlidingWindowLimiter`, which also holds the compute budgets under
:func:`budget_key`), so a key's budget and its cap on concurrent generations hold across every
ingress replica.

A generation of a key with a cap is admitted here in one call (:meth:`SharedCompute.admit_generation`):
a free slot is checked first and the budget charged second, and either refusal leaves the other
untouched (a refused request costs nothing and holds nothing). The ingress gives the slot back when
the request ends (:meth:`SharedCompute.release`); a slot whose ingress never did (the replica died)
expires after ``ttl_s``, the longest a request can last, so no slot leaks for good.

Plain Python, no Ray: a lock makes it safe for a threaded or async host.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from lib.accounts.rate_limit import RateDecision, RateLimitSpec, SlidingWindowLimiter

# How long a client refused for its concurrency cap should wait: a slot frees when one of its
# generations ends, which nobody can know in advance; one second is a cheap poll.
SLOT_RETRY_AFTER_S = 1.0
# Keys of the compute budgets in the shared sliding-window limiter (the rate limit uses the bare
# subject, so the two never share a log).
_BUDGET_PREFIX = "budget:"

Refusal = Literal["budget", "concurrency"]


def budget_key(subject: str) -> str:
    return _BUDGET_PREFIX + subject


class ConcurrencySlots:
    """Counted slots per key, each with a deadline after which it frees itself."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._slots: dict[str, dict[int, float]] = {}  # key -> slot id -> expires at
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._clock = clock

    def acquire(self, key: str, limit: int, ttl_s: float) -> tuple[int | None, int]:
        """(a new slot's id, or None when ``limit`` are in use; the slots in use after this)."""
        if limit < 1 or ttl_s <= 0:
            raise ValueError("limit must be >= 1 and ttl_s > 0")
        now = self._clock()
        with self._lock:
            held = self._live(key, now)
            if len(held) >= limit:
                return None, len(held)
            slot = next(self._ids)
            held[slot] = now + ttl_s
            self._slots[key] = held
            return slot, len(held)

    def in_use(self, key: str) -> int:
        with self._lock:
            return len(self._live(key, self._clock()))

    def release(self, key: str, slot: int) -> bool:
        """Give a slot back (idempotent); False when it was not held (released, or expired)."""
        with self._lock:
            held = self._slots.get(key)
            if held is None or held.pop(slot, None) is None:
                return False
            if not held:
                del self._slots[key]
            return True

    def __len__(self) -> int:
        with self._lock:
            return len(self._slots)

    def _live(self, key: str, now: float) -> dict[int, float]:
        held = self._slots.get(key, {})
        for slot in [slot for slot, expires_at in held.items() if expires_at <= now]:
            del held[slot]
        if not held:
            self._slots.pop(key, None)
        return held


@dataclass(frozen=True)
class GenerationGrant:
    """The answer to :meth:`SharedCompute.admit_generation`.

    ``budget``: the budget decision (None: the key has no budget, or the slot was refused first);
    ``slot``: the slot to give back (None when refused); ``in_use``: the key's running generations
    after this one; ``refused``: why not, or None; ``retry_after_s``: when to try again.
    """

    budget: RateDecision | None
    slot: int | None
    in_use: int
    refused: Refusal | None
    retry_after_s: float


class SharedCompute:
    def __init__(self, limiter: SlidingWindowLimiter, slots: ConcurrencySlots) -> None:
        self._limiter = limiter
        self._slots = slots
        self._lock = threading.Lock()  # the slot check and the charge are one step

    def admit_generation(
        self,
        subject: str,
        budget: RateLimitSpec | None,
        cost: int,
        max_concurrent: int,
        ttl_s: float,
    ) -> GenerationGrant:
        """A slot, then the whole ``cost`` from the budget (if any); refused: neither is taken."""
        with self._lock:
            in_use = self._slots.in_use(subject)
            if in_use >= max_concurrent:
                return GenerationGrant(None, None, in_use, "concurrency", SLOT_RETRY_AFTER_S)
            decision = None
            if budget is not None:
                grant = self._limiter.take(
                    budget_key(subject), budget.limit, budget.window_s, cost, minimum=cost
                )
                decision = grant.decision
                if not grant.granted:
                    return GenerationGrant(decision, None, in_use, "budget", decision.retry_after_s)
            slot, in_use = self._slots.acquire(subject, max_concurrent, ttl_s)
            assert slot is not None  # checked under the same lock
            return GenerationGrant(decision, slot, in_use, None, 0.0)

    def release(self, subject: str, slot: int) -> bool:
        return self._slots.release(subject, slot)
