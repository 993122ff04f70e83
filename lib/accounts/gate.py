"""The gate every authenticated request passes: authenticate -> rate limit -> scope, then account for it.

:meth:`RequestGate.admit` turns the ``Authorization`` header into an :class:`Admission` (or a 401)
and counts the request against the caller's rate limit in the application's one shared limiter
(reached through the :class:`RateLimiter` protocol; in Serve it is a one-replica deployment).
:meth:`Admission.require` then enforces the outcome: 429 when over the limit, 403 without the
scope. The admission stays attached to the request so that *every* response after authentication
(errors included) carries the ``X-RateLimit-*`` headers (:meth:`Admission.headers`), and so that
the request is recorded as usage once it is answered (:func:`usage_record`).

The rate limit is counted before the scope is checked: a request refused for its scope still
costs quota, so probing for scopes is limited like any other traffic, and the 403 can carry
accurate rate-limit headers.

Compute (``lib/accounts/compute.py``) is charged later, by the route, once the body says what the
request costs: :meth:`Admission.charge_generation` / :meth:`Admission.charge` (429 over the budget
or the concurrency cap; ``X-Cost`` and ``X-Budget-Remaining`` on the response; the cost in the
usage record). :meth:`Admission.release` gives a held concurrency slot back when the request ends.

Plain Python: no Ray, no FastAPI. The ASGI side is :mod:`lib.http.gate`.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from lib.accounts.auth import Authenticator, Principal, require_scope
from lib.accounts.compute import Charge, ComputeGate, generation_cost, refusal_message
from lib.accounts.rate_limit import RateDecision
from lib.accounts.records import Scope, UsageRecord
from lib.clock import utc_now
from lib.errors import RateLimitedError
from lib.observability import metrics
from lib.ttl_cache import CacheMiss, memory_only

RATE_LIMIT_HEADERS = (
    "X-RateLimit-Limit",
    "X-RateLimit-Remaining",
    "X-RateLimit-Reset",
    "Retry-After",
    "X-Cost",
    "X-Budget-Remaining",
)
# Column widths of usage_records (lib.accounts.tables): longer values are cut, never refused, so
# that one odd request cannot make a whole usage batch fail.
_KEY_ID_CHARS = 32
_ENDPOINT_CHARS = 200
_MODEL_ID_CHARS = 200


class RateLimiter(Protocol):
    """The application's shared limiter (``lib.accounts.rate_limit.SlidingWindowLimiter.hit``, awaitable)."""

    async def hit(self, key: str, limit: int, window_s: int) -> RateDecision: ...


@dataclass
class Admission:
    """An authenticated request: who, the rate-limit decision (None: unlimited), what it used.

    Routes fill in ``model_id`` and ``image_count`` for the usage record, and charge the
    request's compute (:meth:`charge_generation`, :meth:`charge`) once its body is parsed.
    """

    principal: Principal
    decision: RateDecision | None
    model_id: str | None = None
    image_count: int = 0
    # Milliseconds per stage of the request (auth, limit, model), sent back as Server-Timing.
    timings: dict[str, float] = field(default_factory=dict)
    compute: ComputeGate | None = field(default=None, repr=False)
    charged: Charge | None = None

    @property
    def cost(self) -> int:
        """Image-steps charged to this request (0: none, or refused)."""
        return self.charged.cost if self.charged is not None else 0

    async def charge_generation(self, *, width: int, height: int, steps: int | None, images: int) -> int:
        """Charge a generation (``steps`` None: the configured default) and take a concurrency
        slot; 429 over the budget or the cap, 422 over the whole budget. Returns the cost.

        Every route that runs a generation calls this once, after parsing its body and before
        starting the work; the slot is held until the request ends (its stream included).
        """
        default_steps = self.compute.default_steps if self.compute is not None else 1
        cost = generation_cost(width=width, height=height, steps=steps or default_steps, images=images)
        await self.charge(cost, generation=True)
        return cost

    async def charge(self, cost: int, *, generation: bool = False) -> None:
        """Charge ``cost`` image-steps against the budget (e.g. ``compute.CLASSIFY_COST``)."""
        if self.charged is not None:
            raise RuntimeError("a request is charged once")
        if self.compute is None:  # no compute gate wired (a test): only the cost is reported
            self.charged = Charge(cost)
            return
        self.charged = await self.compute.charge(self.principal, cost, generation=generation)
        if self.charged.refused is not None:
            metrics.over_budget()
            raise RateLimitedError(refusal_message(self.charged, cost, self.principal))

    def release(self) -> None:
        """Give a held concurrency slot back (in the background; idempotent)."""
        if self.compute is not None and self.charged is not None:
            self.compute.release(self.principal, self.charged)

    def server_timing(self, app_ms: float) -> str:
        """The ``Server-Timing`` header value (W3C): each stage, then ``app``, the whole request."""
        stages = [*self.timings.items(), ("app", app_ms)]
        return ", ".join(f"{name};dur={ms:.2f}" for name, ms in stages)

    def require(self, scope: Scope | str | None) -> None:
        """429 when over the rate limit, then 403 without ``scope`` (None: any scope will do)."""
        if self.decision is not None and not self.decision.allowed:
            metrics.rate_limited()
            raise RateLimitedError(
                f"rate limit of {self.decision.limit} requests exceeded; retry after "
                f"{retry_after_seconds(self.decision)}s"
            )
        if scope is not None:
            require_scope(self.principal, scope)

    def headers(self) -> dict[str, str]:
        """``X-RateLimit-*`` (and ``Retry-After`` when refused); none for an unlimited caller.

        ``X-RateLimit-Reset`` is in seconds from now (like ``Retry-After``), not an epoch time:
        the client's clock need not agree with ours.
        """
        decision = self.decision
        charged = self.charged.headers() if self.charged is not None else {}
        if decision is None:
            return charged
        headers = {
            "X-RateLimit-Limit": str(decision.limit),
            "X-RateLimit-Remaining": str(decision.remaining),
            "X-RateLimit-Reset": str(math.ceil(decision.reset_after_s)),
        }
        if not decision.allowed:
            headers["Retry-After"] = str(retry_after_seconds(decision))
        return {**charged, **headers}


def retry_after_seconds(decision: RateDecision) -> int:
    # Rounded up, and at least 1: a client that retries exactly then must find a free slot.
    return max(1, math.ceil(decision.retry_after_s))


class RequestGate:
    def __init__(
        self, *, authenticator: Authenticator, limiter: RateLimiter, compute: ComputeGate | None = None
    ) -> None:
        self._authenticator = authenticator
        self._limiter = limiter
        self._compute = compute

    async def authenticate(self, authorization: str | None) -> Principal:
        """The caller (401 on failure): from the key caches on the event loop; only a cache miss
        (a blocking database lookup) goes to a thread."""
        try:
            with memory_only():
                return self._authenticator.authenticate(authorization)
        except CacheMiss:
            return await asyncio.to_thread(self._authenticator.authenticate, authorization)

    async def admit(self, authorization: str | None, principal: Principal | None = None) -> Admission:
        """Authenticate (401 on failure) and count the request against the caller's limit.

        ``principal``: the caller, when already authenticated from the same header (before the
        body was read: ``lib/http/gate.py``). The limiter's own errors (e.g. 503 when it cannot
        be reached) propagate. The time of each stage is kept in ``Admission.timings``.
        """
        started = time.perf_counter()
        if principal is None:
            principal = await self.authenticate(authorization)
        authenticated = time.perf_counter()
        spec = principal.rate_limit
        decision = None
        if spec is not None:
            decision = await self._limiter.hit(principal.subject, spec.limit, spec.window_s)
        admission = Admission(principal, decision, compute=self._compute)
        admission.timings["auth"] = (authenticated - started) * 1000
        admission.timings["limit"] = (time.perf_counter() - authenticated) * 1000
        return admission


def usage_record(
    admission: Admission,
    *,
    endpoint: str,
    status_code: int,
    latency_ms: float,
    timestamp: datetime | None = None,
) -> UsageRecord:
    """The usage record of an answered request."""
    model_id = admission.model_id[:_MODEL_ID_CHARS] if admission.model_id else None
    return UsageRecord(
        key_id=admission.principal.subject[:_KEY_ID_CHARS],
        endpoint=endpoint[:_ENDPOINT_CHARS],
        status_code=status_code,
        latency_ms=max(0.0, latency_ms),
        model_id=model_id,
        image_count=max(0, admission.image_count),
        timestamp=timestamp or utc_now(),
        cost=admission.cost,
    )
