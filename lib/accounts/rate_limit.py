"""Rate limit specs ("60/minute") and an exact sliding-window limiter.

Algorithm: a sliding **log**. For each key the limiter keeps the timestamps of the hits it allowed
during the last ``window_s`` seconds; a hit is allowed when fewer than ``limit`` of them remain.
This is exact: at no instant do more than ``limit`` allowed hits fall inside any window of
``window_s`` seconds, unlike fixed windows (2x bursts at a boundary) or the weighted two-counter
approximation. The price is memory:

* per key, at most ``limit`` timestamps (denied hits are not recorded), about 32 bytes each (a
  boxed float and its ``deque`` slot) plus ~700 bytes of per-key overhead: 1,000 active keys at
  60/minute is roughly 3 MB; one busy 10,000/day key costs ~320 KB;
* keys with no hit inside their window hold nothing and are dropped by :meth:`prune`, which ``hit``
  runs on its own at most every ``prune_interval_s``, so idle keys cost nothing for long.

Very large limits (say 1,000,000/day) make the log expensive; such a limit is better expressed as
a smaller window (700/minute), and :data:`MAX_LIMIT` refuses the extreme ones.

The class is plain Python so it can be hosted in one Ray actor per application (the limit then holds
across all ingress replicas); a lock makes it safe for a threaded or async actor.
"""

from __future__ import annotations

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

_SPEC_PATTERN = re.compile(r"^\s*(\d{1,9})\s*/\s*([a-z]+?)s?\s*$", re.IGNORECASE)


class RateLimitSpec(NamedTuple):
    limit: int
    window_s: int

    def __str__(self) -> str:
        unit = next(name for name, seconds in WINDOW_SECONDS.items() if seconds == self.window_s)
        return f"{self.limit}/{unit}"


def parse_rate_limit(spec: str) -> RateLimitSpec:
    """Parse ``"N/second|minute|hour|day"`` (a trailing ``s`` and any case are accepted).

    Raises :class:`ValidationFailedError` with a message that says what a valid spec looks like.
    """
    match = _SPEC_PATTERN.match(spec)
    if not match:
        raise ValidationFailedError(
            f"invalid rate limit {spec[:40]!r}: expected N/second, N/minute, N/hour or N/day"
        )
    limit, unit = int(match.group(1)), match.group(2).lower()
    if unit not in WINDOW_SECONDS:
        raise ValidationFailedError(
            f"invalid rate limit unit {unit[:20]!r}: expected second, minute, hour or day"
        )
    if not 1 <= limit <= MAX_LIMIT:
        raise ValidationFailedError(f"invalid rate limit {limit}: must be between 1 and {MAX_LIMIT}")
    return RateLimitSpec(limit, WINDOW_SECONDS[unit])


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
    __slots__ = ("hits", "window_s")

    def __init__(self, window_s: float) -> None:
        self.hits: deque[float] = deque()
        self.window_s = window_s

    def expire(self, now: float) -> None:
        cutoff = now - self.window_s
        hits = self.hits
        while hits and hits[0] <= cutoff:
            hits.popleft()


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
        self, key: str, limit: int, window_s: float, count: int, now: float | None = None
    ) -> Grant:
        """Count up to ``count`` requests for ``key`` at once: as many as the window still allows.

        A lease (``lib/accounts/leases.py``) takes several hits in one call and spends them on its
        replica; they count from now, exactly as if the requests had arrived together.
        """
        if limit < 1 or window_s <= 0 or count < 1:
            raise ValueError("limit and count must be >= 1 and window_s > 0")
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
            hits = log.hits
            granted = max(0, min(count, limit - len(hits)))
            hits.extend([now] * granted)
            remaining = max(0, limit - len(hits))
            reset_after = max(0.0, hits[-1] + window_s - now) if hits else 0.0
            # When denied, the hit that must expire before a slot frees is the one at index
            # len-limit: the oldest, unless the limit was lowered while the log held more.
            retry_after = 0.0 if granted else max(0.0, hits[len(hits) - limit] + window_s - now)
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
            if not log.hits:
                idle.append(key)
        for key in idle:
            del self._logs[key]
        self._next_prune_at = now + self._prune_interval_s
        return len(idle)
