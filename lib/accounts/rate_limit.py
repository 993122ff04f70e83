"""Rate limit specs ("60/minute"), compute budget specs ("20000/hour") and an exact sliding-window limiter.

Algorithm: a sliding **log**. For each key the limiter keeps one entry per grant it made during the
last ``window_s`` seconds (its time and how many units it granted: a hit of the rate limit, or the
image-steps of a compute budget) and their running total; a grant is allowed while the total stays
within ``limit``. This is exact: at no instant do more than ``limit`` granted units fall inside
any window of ``window_s`` seconds, unlike fixed windows (2x bursts at a boundary) or the weighted
two-counter approximation. The price is memory:

* per key, at most one entry per grant still inside the window (denied requests are not
  recorded), about 70 bytes each (a tuple of a float and an int, and its ``deque`` slot) plus
  ~700 bytes of per-key overhead: 1,000 active keys at 60/minute is at most roughly 5 MB (much
  less when replicas take leases of several hits per grant); one grant costs the same whatever
  its size, so a 20,000/hour budget costs no more than its number of requests;
* keys with no grant inside their window hold nothing and are dropped by :meth:`prune`, which
  ``take`` runs on its own at most every ``prune_interval_s``, so idle keys cost nothing for long.

Very large rate limits (say 1,000,000/day) are better expressed as a smaller window (700/minute),
and :data:`MAX_LIMIT` refuses the extreme ones; budgets go up to :data:`MAX_BUDGET`.

The class is plain Python so it can be hosted in one Ray actor per application (the limit then holds
across all ingress replicas); a lock makes it safe for a threaded or async actor.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from lib.errors import ValidationFailedError

WINDOW_SECONDS: dict[str, int] = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
MAX_LIMIT = 100_000
# A budget counts image-steps, not requests, and costs memory per request, not per unit.
MAX_BUDGET = 1_000_000_000

_SPEC_PATTERN = re.compile(r"^\s*(\d{1,9})\s*/\s*([a-z]+?)s?\s*$", re.IGNORECASE)


class RateLimitSpec(NamedTuple):
    limit: int
    window_s: int

    def __str__(self) -> str:
        unit = next(name for name, seconds in WINDOW_SECONDS.items() if seconds == self.window_s)
        return f"{self.limit}/{unit}"


def parse_rate_limit(spec: str, *, maximum: int = MAX_LIMIT, what: str = "rate limit") -> RateLimitSpec:
    """Parse ``"N/second|minute|hour|day"`` (a trailing ``s`` and any case are accepted).

    Raises :class:`ValidationFailedError` with a message that says what a valid spec looks like.
    """
    match = _SPEC_PATTERN.match(spec)
    if not match:
        raise ValidationFailedError(
            f"invalid {what} {spec[:40]!r}: expected N/second, N/minute, N/hour or N/day"
        )
    limit, unit = int(match.group(1)), match.group(2).lower()
    if unit not in WINDOW_SECONDS:
        raise ValidationFailedError(
            f"invalid {what} unit {unit[:20]!r}: expected second, minute, hour or day"
        )
    if not 1 <= limit <= maximum:
        raise ValidationFailedError(f"invalid {what} {limit}: must be between 1 and {maximum}")
    return RateLimitSpec(limit, WINDOW_SECONDS[unit])


def parse_budget(spec: str) -> RateLimitSpec:
    """A compute budget, ``"N/second|minute|hour|day"`` in image-steps (up to :data:`MAX_BUDGET`)."""
    return parse_rate_limit(spec, maximum=MAX_BUDGET, what="budget")


def rate_limit_field(value: str | None) -> str | None:
    """A pydantic field validator: a rate limit in canonical form, or None (no limit)."""
    return _field(parse_rate_limit, value)


def budget_field(value: str | None) -> str | None:
    """A pydantic field validator: a budget in canonical form, or None (unlimited)."""
    return _field(parse_budget, value)


def _field(parse: Callable[[str], RateLimitSpec], value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return str(parse(value))
    except ValidationFailedError as exc:
        raise ValueError(exc.message) from None  # pydantic reports a ValueError as a 422 field error


@dataclass(frozen=True)
class RateDecision:
    """The answer to one hit; the fields map onto the ``RateLimit-*`` / ``Retry-After`` headers.

    ``remaining``: hits still allowed now, after this one. ``reset_after_s``: seconds until every hit
    in the window has expired (the quota is whole again). ``retry_after_s``: 0 when allowed, else the
    seconds until the oldest hit expires and one more will be allowed.
    """

    allowed: bool
    limit: int
    remaining: int
    reset_after_s: float
    retry_after_s: float


@dataclass(frozen=True)
class Grant:
    """What :meth:`SlidingWindowLimiter.take` allowed: ``granted`` hits (0: denied), and the decision."""

    granted: int
    decision: RateDecision


class _KeyLog:
    __slots__ = ("entries", "total", "window_s")

    def __init__(self, window_s: float) -> None:
        self.entries: deque[tuple[float, int]] = deque()  # (granted at, units)
        self.total = 0
        self.window_s = window_s

    def expire(self, now: float) -> None:
        cutoff = now - self.window_s
        entries = self.entries
        while entries and entries[0][0] <= cutoff:
            self.total -= entries.popleft()[1]

    def retry_after(self, limit: int, need: int, now: float) -> float:
        """Seconds until ``need`` more units fit within ``limit``: the oldest entries that must
        expire first (more than the oldest one when the limit was lowered, or ``need`` is large);
        infinite when ``need`` exceeds the limit itself."""
        excess = self.total + need - limit
        if excess <= 0:
            return 0.0
        if need > limit:
            return math.inf
        freed = 0
        for at, units in self.entries:
            freed += units
            if freed >= excess:
                return max(0.0, at + self.window_s - now)
        return math.inf  # pragma: no cover - need <= limit always frees within the log


class SlidingWindowLimiter:
    """Exact sliding-log rate limiter keyed by an arbitrary string (e.g. an API key id)."""

    def __init__(
        self,
        *,
        prune_interval_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logs: dict[str, _KeyLog] = {}
        self._lock = threading.Lock()
        self._prune_interval_s = prune_interval_s
        self._next_prune_at: float | None = None
        self._clock = clock

    def hit(self, key: str, limit: int, window_s: float, now: float | None = None) -> RateDecision:
        """Count one request for ``key`` against ``limit`` per ``window_s`` seconds.

        ``now`` is injectable for tests; by default the limiter's own clock is used, which is what a
        shared limiter must do (replicas' clocks are not comparable).
        """
        return self.take(key, limit, window_s, 1, now).decision

    def take(
        self,
        key: str,
        limit: int,
        window_s: float,
        count: int,
        now: float | None = None,
        *,
        minimum: int = 1,
    ) -> Grant:
        """Count up to ``count`` units for ``key`` at once: as many as the window still allows,
        but none unless at least ``minimum`` fit (a request's whole cost, never part of it).

        A lease (``lib/accounts/leases.py``) takes several units in one call and spends them on
        its replica; they count from now, exactly as if the requests had arrived together.
        """
        if limit < 1 or window_s <= 0 or count < 1 or not 1 <= minimum <= count:
            raise ValueError("limit and count must be >= 1, minimum in [1, count], window_s > 0")
        if now is None:
            now = self._clock()
        with self._lock:
            self._maybe_prune(now)
            log = self._logs.get(key)
            if log is None:
                log = self._logs[key] = _KeyLog(window_s)
            # A key's spec can change between hits (the key was edited); the newest one applies.
            log.window_s = window_s
            log.expire(now)
            granted = max(0, min(count, limit - log.total))
            if granted < minimum:
                granted = 0
            if granted:
                log.entries.append((now, granted))
                log.total += granted
            remaining = max(0, limit - log.total)
            reset_after = max(0.0, log.entries[-1][0] + window_s - now) if log.entries else 0.0
            # A request larger than the whole limit never fits; callers refuse it before asking
            # (lib/accounts/compute.py), and the decision stays finite for the headers.
            retry_after = 0.0 if granted else min(log.retry_after(limit, minimum, now), window_s)
            return Grant(granted, RateDecision(granted > 0, limit, remaining, reset_after, retry_after))

    def prune(self, now: float | None = None) -> int:
        """Forget keys with no hit inside their window; returns how many were dropped.

        Public API: ``hit`` prunes on its own every ``prune_interval_s``; a host that goes idle
        for long may call this to free the memory sooner.
        """
        if now is None:
            now = self._clock()
        with self._lock:
            return self._prune_locked(now)

    def __len__(self) -> int:
        with self._lock:
            return len(self._logs)

    def _maybe_prune(self, now: float) -> None:
        if self._next_prune_at is None:
            self._next_prune_at = now + self._prune_interval_s
        elif now >= self._next_prune_at:
            self._prune_locked(now)

    def _prune_locked(self, now: float) -> int:
        idle = []
        for key, log in self._logs.items():
            log.expire(now)
            if not log.entries:
                idle.append(key)
        for key in idle:
            del self._logs[key]
        self._next_prune_at = now + self._prune_interval_s
        return len(idle)
