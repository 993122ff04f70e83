"""Compute budgets and concurrency caps per key: what a request costs, and charging it.

A key's **budget** is a number of *image-steps* per window (``20000/hour``). An image-step is one
denoising step of one 512x512 image, so a generation costs
``ceil(width * height / 512² * steps * images)`` (at least 1), and a classification costs
:data:`CLASSIFY_COST`. A key's **max_concurrent** caps its generations running at once, across the
whole application. Over either: 429 with ``Retry-After``. Both are per key (``sealserve keys create
--budget 20000/hour --max-concurrent 2``; ``PATCH /v1/admin/keys/{id}``); None means unlimited.

Where the counts live. Budgets are counted in the application's one limiter (the ``RateLimiter``
deployment), reached through the same leases as the rate limit (``lib/accounts/leases.py``): a
classify request costs no round trip to it most of the time. A generation of a key with a cap
costs one round trip, which takes a slot and charges the budget at once
(:class:`lib.accounts.concurrency.SharedCompute`), and one more after it ends, to give the slot
back (not awaited by the response). A generation takes seconds; the request-path gate of classify
is unchanged.

Routes charge after the body is parsed (the cost depends on it) through the request's
:class:`lib.accounts.gate.Admission`: ``await admission.charge_generation(width=..., height=...,
steps=..., images=...)`` for a generation, ``await admission.charge(CLASSIFY_COST)`` for a
classification. The slot is given back when the request ends (``lib/http/gate.py``), a streamed
response included.

Plain asyncio, no Ray: the shared side is any :class:`SharedCompute` client.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass
from typing import Protocol

from lib.accounts.auth import Principal
from lib.accounts.concurrency import GenerationGrant, Refusal, budget_key
from lib.accounts.leases import LeasedLimiter, SharedLimiter
from lib.accounts.rate_limit import RateDecision, RateLimitSpec
from lib.errors import ValidationFailedError

log = logging.getLogger(__name__)

# One image-step: one denoising step of one image of this many pixels (512x512).
IMAGE_STEP_PIXELS = 512 * 512
# A classification is one forward pass of a small network on one image: far less than a
# denoising step of a UNet at 512x512 (on the development machine, ~5 ms against ~150 ms), so it
# costs the smallest unit. Reasoned, not measured per model.
CLASSIFY_COST = 1


def generation_cost(*, width: int, height: int, steps: int, images: int) -> int:
    """``ceil(width * height / 512² * steps * images)``, at least 1 (exact integer arithmetic)."""
    if min(width, height, steps, images) < 1:
        raise ValueError("width, height, steps and images must be >= 1")
    return max(1, -(-(width * height * steps * images) // IMAGE_STEP_PIXELS))


class SharedCompute(SharedLimiter, Protocol):
    """The application's one limiter as the ingress reaches it (``RateLimiterClient``)."""

    async def admit_generation(
        self, subject: str, budget: RateLimitSpec | None, cost: int, max_concurrent: int, ttl_s: float
    ) -> GenerationGrant: ...

    async def release(self, subject: str, slot: int) -> None: ...


@dataclass
class Charge:
    """What a request was charged: ``cost`` image-steps (0 when refused), the budget decision
    (None: no budget), the concurrency slot it holds (None: none), and a refusal, if any."""

    cost: int
    budget: RateDecision | None = None
    slot: int | None = None
    refused: Refusal | None = None
    retry_after_s: float = 0.0

    def headers(self) -> dict[str, str]:
        headers = {"X-Cost": str(self.cost)}
        if self.budget is not None:
            headers["X-Budget-Remaining"] = str(self.budget.remaining)
        if self.refused is not None:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after_s)))
        return headers


class ComputeGate:
    """One ingress replica's side of budgets and caps (built by ``lib/accounts/wiring.py``)."""

    def __init__(self, shared: SharedCompute, *, default_steps: int, slot_ttl_s: float) -> None:
        self._shared = shared
        self._budgets = LeasedLimiter(shared)
        self.default_steps = default_steps
        self._slot_ttl_s = slot_ttl_s
        self._releases: set[asyncio.Task[None]] = set()

    async def charge(self, principal: Principal, cost: int, *, generation: bool) -> Charge:
        """Charge ``cost``; a refused charge is returned with ``refused`` set (nothing is taken).

        422 when the cost exceeds the key's whole budget: no wait would let it through.
        """
        budget = principal.budget
        if budget is not None and cost > budget.limit:
            raise ValidationFailedError(
                f"this request costs {cost} image-steps, more than this key's whole budget of "
                f"{budget}; ask for fewer or smaller images or fewer steps"
            )
        if generation and principal.max_concurrent is not None:
            grant = await self._shared.admit_generation(
                principal.subject, budget, cost, principal.max_concurrent, self._slot_ttl_s
            )
            charged = 0 if grant.refused else cost
            return Charge(charged, grant.budget, grant.slot, grant.refused, grant.retry_after_s)
        if budget is None:
            return Charge(cost)
        decision = await self._budgets.hit(budget_key(principal.subject), budget.limit, budget.window_s, cost)
        if not decision.allowed:
            return Charge(0, decision, refused="budget", retry_after_s=decision.retry_after_s)
        return Charge(cost, decision)

    def release(self, principal: Principal, charge: Charge) -> None:
        """Give the charge's slot back, in the background (idempotent: the slot is cleared)."""
        slot, charge.slot = charge.slot, None
        if slot is None:
            return
        task = asyncio.get_running_loop().create_task(self._release(principal.subject, slot))
        self._releases.add(task)  # held until done: the loop keeps only weak references
        task.add_done_callback(self._releases.discard)

    async def _release(self, subject: str, slot: int) -> None:
        try:
            await self._shared.release(subject, slot)
        except Exception as exc:  # the slot expires on its own (slot_ttl_s)
            log.warning("could not give a concurrency slot back: %s", type(exc).__name__)


def refusal_message(charge: Charge, cost: int, principal: Principal) -> str:
    wait = max(1, math.ceil(charge.retry_after_s))
    if charge.refused == "concurrency":
        return (
            f"this key already runs its maximum of {principal.max_concurrent} concurrent "
            f"generations; retry after {wait}s"
        )
    remaining = charge.budget.remaining if charge.budget is not None else 0
    return (
        f"compute budget of {principal.budget} image-steps exceeded: this request costs {cost}, "
        f"{remaining} remain; retry after {wait}s"
    )
