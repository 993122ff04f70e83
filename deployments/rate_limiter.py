"""The application's one rate limiter, and the ingress's client of it.

Rate limits must hold across every ingress replica, so the counters live in exactly one place: a
Serve deployment with a single replica hosting :class:`lib.accounts.rate_limit.SlidingWindowLimiter`,
bound into the graph by ``build_app`` and handed to the Ingress as a handle. Ingress replicas take
hits in leases (``lib/accounts/leases.py``), so most admitted requests cost no call here at all.
The same replica counts the keys' compute budgets (in the same limiter) and their concurrency
slots (:class:`lib.accounts.concurrency.SharedCompute`; ``lib/accounts/compute.py``).

Its counters are in memory: if the replica restarts, every window starts afresh (the limit is
briefly more generous, never stricter). More than one replica would split the counters and
multiply every limit, so the deployment refuses to start as one of several.

While the limiter does not answer (its replica died or is restarting), :class:`RateLimiterClient`
does not fail every request: for ``FALLBACK_S`` after each failure, it counts on its own replica
with a conservative share of every limit — the limit divided by the number of ingress replicas
(at least 1), the same for budgets and concurrency caps — and asks the limiter again after that.
The switch is logged both ways and shown in ``/health`` (status ``degraded``, still ready).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.handles import result_within, unary
from deployments.ray_errors import unwrap
from lib.accounts.concurrency import ConcurrencySlots, GenerationGrant, SharedCompute
from lib.accounts.rate_limit import Grant, RateLimitSpec, SlidingWindowLimiter
from lib.errors import ConfigurationError, ServiceUnavailableError

log = logging.getLogger("ray.serve")

# A hit is a dictionary update; a limiter that takes longer than this is overloaded or gone.
HIT_TIMEOUT_S = 2.0
# After a failed call, how long a replica counts on its own before asking the limiter again: Serve
# replaces a dead replica in a few seconds, and one failed call per period is all it costs.
FALLBACK_S = 5.0
DEGRADED_MESSAGE = "RateLimiter: not answering; limits are a per-replica share"


# num_replicas=1 is part of what the deployment is, not a default (see the module docstring); its
# other options are defaults owned by deployments/app.py.
@serve.deployment(num_replicas=1)
class RateLimiter:
    def __init__(self) -> None:
        world_size = serve.get_replica_context().world_size
        if world_size > 1:
            raise ConfigurationError(
                f"the RateLimiter deployment must have exactly one replica, not {world_size}: "
                "each replica would keep its own counters"
            )
        self._limiter = SlidingWindowLimiter()
        self._compute = SharedCompute(self._limiter, ConcurrencySlots())

    # Each runs on the replica's event loop, one call at a time: no thread contends for a lock.
    async def take(self, key: str, limit: int, window_s: int, count: int, minimum: int = 1) -> Grant:
        return self._limiter.take(key, limit, window_s, count, minimum=minimum)

    async def admit_generation(
        self, subject: str, budget: RateLimitSpec | None, cost: int, max_concurrent: int, ttl_s: float
    ) -> GenerationGrant:
        return self._compute.admit_generation(subject, budget, cost, max_concurrent, ttl_s)

    async def release(self, subject: str, slot: int) -> bool:
        return self._compute.release(subject, slot)


class RateLimiterClient:
    """The ingress side: ``await take(...)`` with a timeout; a per-replica share while it fails.

    A take is not retried: it is not idempotent (a call that timed out may still have counted).
    While the limiter is unreachable the replica applies ``1/replicas()`` of each limit itself
    (see the module docstring): stricter than the shared limit, never unlimited.
    """

    def __init__(
        self,
        handle: DeploymentHandle,
        *,
        timeout_s: float = HIT_TIMEOUT_S,
        replicas: Callable[[], int] | None = None,
        fallback_s: float = FALLBACK_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._handle = handle
        self._timeout_s = timeout_s
        self._replicas = replicas or _ingress_replicas
        self._fallback_s = fallback_s
        self._clock = clock
        self._local = SlidingWindowLimiter()
        self._local_compute = SharedCompute(self._local, ConcurrencySlots())
        self._fallback_until = 0.0

    @property
    def degraded(self) -> bool:
        return self._clock() < self._fallback_until

    def health_errors(self) -> list[str]:
        return [DEGRADED_MESSAGE] if self.degraded else []

    async def take(self, key: str, limit: int, window_s: int, count: int, minimum: int = 1) -> Grant:
        if not self.degraded:
            try:
                call = self._handle.take.remote(key, limit, window_s, count, minimum)
                grant: Grant = await self._call(call)
                return grant
            except ServiceUnavailableError:
                self._fall_back()
        # All or nothing as ever: a cost above the share is refused, never half charged.
        share = self._share(limit)
        return self._local.take(key, share, window_s, max(minimum, min(count, share)), minimum=minimum)

    async def admit_generation(
        self, subject: str, budget: RateLimitSpec | None, cost: int, max_concurrent: int, ttl_s: float
    ) -> GenerationGrant:
        """A slot and the cost, or neither; not retried (a timed-out call may have taken both:
        the slot then frees itself after ``ttl_s``). A local slot has a negative id."""
        if not self.degraded:
            try:
                call = self._handle.admit_generation.remote(subject, budget, cost, max_concurrent, ttl_s)
                grant: GenerationGrant = await self._call(call)
                return grant
            except ServiceUnavailableError:
                self._fall_back()
        local_budget = RateLimitSpec(self._share(budget.limit), budget.window_s) if budget else None
        local = self._local_compute.admit_generation(
            subject, local_budget, cost, self._share(max_concurrent), ttl_s
        )
        return dataclasses.replace(local, slot=-local.slot) if local.slot is not None else local

    async def release(self, subject: str, slot: int) -> None:
        """Give a slot back (idempotent, so a failure is not worse than a slot expiring)."""
        if slot < 0:
            self._local_compute.release(subject, -slot)
            return
        await self._call(self._handle.release.remote(subject, slot))

    def _share(self, limit: int) -> int:
        return max(1, limit // max(1, self._replicas()))

    def _fall_back(self) -> None:
        if not self.degraded:
            log.warning(
                "the rate limiter is not answering: limits are now 1/%d of each (this replica's "
                "share) for %.0fs, then it is asked again", max(1, self._replicas()), self._fallback_s,
            )
        self._fallback_until = self._clock() + self._fallback_s

    async def _call(self, call: Any) -> Any:
        try:
            result = await result_within(unary(call), self._timeout_s)
        except TimeoutError:
            log.warning("the rate limiter did not answer within %.1fs", self._timeout_s)
            raise ServiceUnavailableError("the rate limiter is not available; retry") from None
        except Exception as exc:
            log.warning("the rate limiter failed: %s", type(unwrap(exc)).__name__)
            raise ServiceUnavailableError("the rate limiter is not available; retry") from None
        if self._fallback_until:
            self._fallback_until = 0.0
            log.warning("the rate limiter answers again: shared limits restored")
        return result


def _ingress_replicas() -> int:
    """Replicas of the calling deployment (the ingress), as Serve tells its replica; 1 elsewhere."""
    try:
        return max(1, int(serve.get_replica_context().world_size))
    except Exception:  # not in a replica (tests, a driver)
        return 1
