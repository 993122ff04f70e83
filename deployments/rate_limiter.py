"""The application's one rate limiter, and the ingress's client of it.

Rate limits must hold across every ingress replica, so the counters live in exactly one place: a
Serve deployment with a single replica hosting :class:`lib.accounts.rate_limit.SlidingWindowLimiter`,
bound into the graph by ``build_app`` and handed to the Ingress as a handle. Ingress replicas take
hits in leases (``lib/accounts/leases.py``), so most admitted requests cost no call here at all.

Its counters are in memory: if the replica restarts, every window starts afresh (the limit is
briefly more generous, never stricter). More than one replica would split the counters and
multiply every limit, so the deployment refuses to start as one of several.
"""

from __future__ import annotations

import logging

from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.handles import result_within, unary
from deployments.ray_errors import unwrap
from lib.accounts.rate_limit import Grant, SlidingWindowLimiter
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

    async def take(self, key: str, limit: int, window_s: int, count: int) -> Grant:
        # Runs on the replica's event loop, one call at a time: no thread contends for the lock.
        return self._limiter.take(key, limit, window_s, count)


class RateLimiterClient:
    """The ingress side: ``await take(...)`` with a timeout, failures as 503.

    A take is not retried: it is not idempotent (a call that timed out may still have counted),
    and a caller told 503 retries on its own. While the limiter is unreachable requests are
    refused rather than let through unlimited.
    """

    def __init__(self, handle: DeploymentHandle, *, timeout_s: float = HIT_TIMEOUT_S) -> None:
        self._handle = handle
        self._timeout_s = timeout_s

    async def take(self, key: str, limit: int, window_s: int, count: int) -> Grant:
        response = unary(self._handle.take.remote(key, limit, window_s, count))
        try:
            grant: Grant = await result_within(response, self._timeout_s)
        except TimeoutError:
            log.warning("the rate limiter did not answer within %.1fs", self._timeout_s)
            raise ServiceUnavailableError("the rate limiter is not available; retry") from None
        except Exception as exc:
            log.warning("the rate limiter failed: %s", type(unwrap(exc)).__name__)
            raise ServiceUnavailableError("the rate limiter is not available; retry") from None
        return grant
