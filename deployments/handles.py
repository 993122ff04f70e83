"""Deployment handles: awaiting a call under a timeout, and configured handles made once.

Every ``handle.options(...)`` builds a new handle, so a handle configured per model id is built
the first time the id is seen and reused afterwards; the ids come from requests (any key holder
can send any string), so the cache is bounded.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from typing import Any, TypeVar, cast

from ray.serve.handle import DeploymentHandle, DeploymentResponse

T = TypeVar("T")

# Far more models than a catalog serves; beyond it the least recently used handle is rebuilt
# when its id comes back, which costs one ``options()`` call.
MAX_CONFIGURED_HANDLES = 64


async def result_within(response: DeploymentResponse[T], timeout_s: float) -> T:
    """The result of a handle call; after ``timeout_s`` the call is cancelled and TimeoutError raised,
    and when the awaiting task is cancelled, the call is cancelled with it.

    Ray's own errors (``RayTaskError`` wrapping what the replica raised, ``RayActorError``,
    ``BackPressureError``) propagate unchanged: each caller maps them to its own answer.
    """
    try:
        return await asyncio.wait_for(_result(response), timeout_s)
    except (TimeoutError, asyncio.CancelledError):
        # A cancelled caller (its client hung up) cancels the call too: the model replica stops
        # the work instead of finishing it for no one.
        response.cancel()
        raise


async def _result(response: DeploymentResponse[T]) -> T:
    # A DeploymentResponse is awaitable but not a coroutine: wait_for gets one that awaits it.
    return await response


def unary(response: object) -> DeploymentResponse[Any]:
    """``handle.method.remote(...)`` of a non-streaming method, typed as what it returns."""
    return cast("DeploymentResponse[Any]", response)


class MultiplexedHandles:
    """A deployment's handle and, per multiplexed model id, its configured handle (made once)."""

    def __init__(self, handle: DeploymentHandle, *, max_entries: int = MAX_CONFIGURED_HANDLES) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.base = handle
        self._max_entries = max_entries
        self._configured: OrderedDict[str, DeploymentHandle] = OrderedDict()

    def __len__(self) -> int:
        return len(self._configured)

    def for_model(self, model_id: str) -> DeploymentHandle:
        """The handle that routes to a replica already holding ``model_id``, when there is one."""
        handle = self._configured.get(model_id)
        if handle is not None:
            self._configured.move_to_end(model_id)
            return handle
        handle = self.base.options(multiplexed_model_id=model_id)
        self._configured[model_id] = handle
        if len(self._configured) > self._max_entries:
            self._configured.popitem(last=False)
        return handle
