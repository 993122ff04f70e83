"""The application's one rate limiter, and the ingress's client of it.

Rate limits must hold across every ingress replica, so the counters live in exactly one place: a
Serve deployment with a single replica hosting :class:`lib.accounts.rate_limit.SlidingWindowLimiter`,
bound into the graph by ``build_app`` and handed to the Ingress as a handle. Each admitted request
costs one handle call (about a millisecond on one node).

Its counters are in memory: if the replica restarts, every window starts afresh (the limit is
briefly more generous, never stricter). More than one replica would split the counters and
multiply every limit, so the deployment refuses to start as one of several.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from deployments.ray_errors import unwrap
from lib.accounts.rate_limit import RateDecision, SlidingWindowLimiter
from lib.errors import ConfigurationError, ServiceUnavailableError

log = logging.getLogger("ray.serve")

# A hit is a dictionary update; a limiter that takes longer than this is overloaded or gone.
HIT_TIMEOUT_S = 2.0


@serve.deployment(
    num_replicas=1,
    max_ongoing_requests=2000,
    ray_actor_options={"num_cpus": 0.1},
)
class RateLimiter:
    def __init__(self) -> None:
        world_size = serve.get_replica_context().world_size
        if world_size > 1:
            raise ConfigurationError(
                f"the RateLimiter deployment must have exactly one replica, not {world_size}: "
                "each replica would keep its own counters"
            )
        self._limiter = SlidingWindowLimiter()

    async def hit(self, key: str, limit: int, window_s: int) -> RateDecision:
        # Runs on the replica's event loop, one call at a time: no thread contends for the lock.
        return self._limiter.hit(key, limit, window_s)


class RateLimiterClient:
    """The ingress side: ``await hit(...)`` with a timeout, failures as 503.

    A hit is not retried: it is not idempotent (a call that timed out may still have counted),
    and a caller told 503 retries on its own. While the limiter is unreachable requests are
    refused rather than let through unlimited.
    """

    def __init__(self, handle: DeploymentHandle, *, timeout_s: float = HIT_TIMEOUT_S) -> None:
        self._handle = handle
        self._timeout_s = timeout_s

    async def hit(self, key: str, limit: int, window_s: int) -> RateDecision:
        response: DeploymentResponse[Any] = self._handle.hit.remote(key, limit, window_s)  # type: ignore[assignment]
        try:
            decision: RateDecision = await asyncio.wait_for(_result(response), self._timeout_s)
        except TimeoutError:
            response.cancel()
            log.warning("the rate limiter did not answer within %.1fs", self._timeout_s)
            raise ServiceUnavailableError("the rate limiter is not available; retry") from None
        except Exception as exc:
            log.warning("the rate limiter failed: %s", type(unwrap(exc)).__name__)
            raise ServiceUnavailableError("the rate limiter is not available; retry") from None
        return decision


async def _result(response: DeploymentResponse[Any]) -> RateDecision:
    decision: RateDecision = await response
    return decision
