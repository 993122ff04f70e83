"""A replica's snapshot of its node's model catalog, so resolving a model costs no round trip.

The ingress resolves each request's ``model_id`` (an id, a name, or none for the default model)
against this snapshot before it calls a model deployment: an unknown or wrong-kind model is
answered (404 / 422) without reaching a model replica, and the call is routed by the resolved id,
which is what the model replicas multiplex on.

The snapshot is refreshed in the background when it is older than ``max_age_s`` (requests keep
using the old one meanwhile) and at once when a model is not found, at most every
``min_refresh_interval_s``: a flood of unknown ids costs one catalog call per interval, not one
per request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from lib.errors import ModelNotFoundError
from lib.models.catalog import resolve_model
from lib.schemas import ModelInfo

log = logging.getLogger(__name__)

# Models copied into MODEL_DIRS appear after the loader's next scan (MODEL_SCAN_INTERVAL, 30 s by
# default) anyway; two seconds more is not noticed, and it keeps the loader's load negligible.
MAX_AGE_S = 2.0
MIN_REFRESH_INTERVAL_S = 1.0


class CatalogView:
    def __init__(
        self,
        fetch: Callable[[], Awaitable[Sequence[ModelInfo]]],
        *,
        max_age_s: float = MAX_AGE_S,
        min_refresh_interval_s: float = MIN_REFRESH_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch = fetch
        self._max_age_s = max_age_s
        self._min_refresh_interval_s = min_refresh_interval_s
        self._clock = clock
        self._entries: Sequence[ModelInfo] | None = None
        self._fetched_at = float("-inf")
        self._lock = asyncio.Lock()
        self._background: asyncio.Task[None] | None = None

    async def resolve(self, id_or_name: str | None, kind: str) -> ModelInfo:
        """The catalog entry for ``id_or_name`` (None: the first usable model of ``kind``)."""
        entries = await self._current()
        try:
            return resolve_model(entries, id_or_name, kind)
        except ModelNotFoundError:
            if self._clock() - self._fetched_at < self._min_refresh_interval_s:
                raise
        return resolve_model(await self._refresh(), id_or_name, kind)

    async def _current(self) -> Sequence[ModelInfo]:
        if self._entries is None:
            return await self._refresh()
        stale = self._clock() - self._fetched_at > self._max_age_s
        if stale and (self._background is None or self._background.done()):
            self._background = asyncio.create_task(self._refresh_quietly())
        return self._entries

    async def _refresh(self) -> Sequence[ModelInfo]:
        requested = self._clock()
        async with self._lock:
            # Another request refreshed while this one waited: use what it fetched.
            if self._entries is None or self._fetched_at < requested:
                self._entries = list(await self._fetch())
                self._fetched_at = self._clock()
            return self._entries

    async def _refresh_quietly(self) -> None:
        # A failed background refresh keeps the last snapshot; the next stale request tries again.
        try:
            await self._refresh()
        except Exception as exc:
            log.warning("catalog refresh failed (%s); serving the last snapshot", type(exc).__name__)
