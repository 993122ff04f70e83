"""Concurrent calls gathered into batches: whatever arrives while earlier batches are out goes next.

:class:`MicroBatcher` is Serve's ``@serve.batch`` without a wait and without a replica: a lone
call runs at once (a batch of one, no added latency), and under load the calls that queue while
``max_in_flight`` batches are running leave together in the next one, up to ``max_batch``. The
ingress uses it to send its classify requests to the classifier in one handle call per batch
(``deployments/model_clients.py``). Plain asyncio: usable, and tested, outside Ray.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class MicroBatcher(Generic[T, R]):
    def __init__(
        self,
        run_batch: Callable[[list[T]], Awaitable[Sequence[R]]],
        *,
        max_batch: int,
        max_in_flight: int,
    ) -> None:
        if max_batch < 1 or max_in_flight < 1:
            raise ValueError("max_batch and max_in_flight must be at least 1")
        self._run_batch = run_batch
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._queue: deque[tuple[T, asyncio.Future[R]]] = deque()
        self._in_flight: set[asyncio.Task[None]] = set()
        self.batches = 0  # batches sent, for health and benchmarks
        self.items = 0

    async def submit(self, item: T) -> R:
        """The result for ``item`` (or the exception its batch raised)."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        self._start_batches()
        return await future

    def _start_batches(self) -> None:
        while self._queue and len(self._in_flight) < self._max_in_flight:
            batch = [self._queue.popleft() for _ in range(min(self._max_batch, len(self._queue)))]
            # A caller that went away (cancelled) is not sent.
            batch = [(item, future) for item, future in batch if not future.done()]
            if not batch:
                continue
            task = asyncio.create_task(self._run(batch))
            self._in_flight.add(task)

    async def _run(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        self.batches += 1
        self.items += len(batch)
        try:
            results = await self._run_batch([item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"a batch of {len(batch)} returned {len(results)} results")
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)
        except Exception as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
        finally:
            self._in_flight.discard(asyncio.current_task())
            self._start_batches()
