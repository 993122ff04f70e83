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
"""

from __future__ import annotations

import logging
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
    """The ingress side: ``await take(...)`` with a timeout, failures as 503.

    A take is not retried: it is not idempotent (a call that timed out may still have counted),
    and a caller told 503 retries on its own. While the limiter is unreachable requests are
    refused rather than let through unlimited.
    """

    def __init__(self, handle: DeploymentHandle, *, timeout_s: float = HIT_TIMEOUT_S) -> None:
        self._handle = handle
        self._timeout_s = timeout_s

    async def take(self, key: str, limit: int, window_s: int, count: int, minimum: int = 1) -> Grant:
        grant: Grant = await self._call(self._handle.take.remote(key, limit, window_s, count, minimum))
        return grant

    async def admit_generation(
        self, subject: str, budget: RateLimitSpec | None, cost: int, max_concurrent: int, ttl_s: float
    ) -> GenerationGrant:
        """A slot and the cost, or neither; not retried (a timed-out call may have taken both:
        the slot then frees itself after ``ttl_s``)."""
        call = self._handle.admit_generation.remote(subject, budget, cost, max_concurrent, ttl_s)
        grant: GenerationGrant = await self._call(call)
        return grant

    async def release(self, subject: str, slot: int) -> None:
        """Give a slot back (idempotent, so a failure is not worse than a slot expiring)."""
        await self._call(self._handle.release.remote(subject, slot))

    async def _call(self, call: Any) -> Any:
        try:
            return await result_within(unary(call), self._timeout_s)
        except TimeoutError:
            log.warning("the rate limiter did not answer within %.1fs", self._timeout_s)
            raise ServiceUnavailableError("the rate limiter is not available; retry") from None
        except Exception as exc:
            log.warning("the rate limiter failed: %s", type(unwrap(exc)).__name__)
            raise ServiceUnavailableError("the rate limiter is not available; retry") from None
