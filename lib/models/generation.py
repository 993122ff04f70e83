"""A generation on its worker thread: a cancel flag it checks between denoising steps, and the
caller's side that waits for the thread to end before the pipeline may be used again.

A diffusers pipeline runs in a worker thread (it would block the replica's event loop); an
asyncio task that is cancelled (the client hung up, the ingress's timeout ran out, the handle
caller cancelled) cannot stop that thread, so the thread is told: :class:`GenerationControl` is
checked from ``callback_on_step_end`` after every denoising step and raises there. Until the
thread has really ended the caller keeps waiting (:meth:`Generations.run`), so the pipeline's lock
is held exactly as long as the pipeline is in use, and cancelled generations never pile up on it.

Progress of the steps travels from the thread to the event loop through a queue
(:meth:`Generations.stream`).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from lib.errors import GatewayTimeoutError

T = TypeVar("T")
P = TypeVar("P")


class GenerationCancelled(Exception):
    """Raised on the worker thread, between two denoising steps, when its caller is gone."""


class GenerationControl:
    """The cancel flag (and the deadline) one generation checks after each denoising step."""

    def __init__(
        self, timeout_s: float | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._cancelled = threading.Event()
        self._clock = clock
        self._timeout_s = timeout_s
        self._deadline = clock() + timeout_s if timeout_s is not None else None
        self.steps_done = 0

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def check(self) -> None:
        """Raise if the generation must stop: cancelled, or past its deadline (504)."""
        if self._cancelled.is_set():
            raise GenerationCancelled(f"cancelled after {self.steps_done} steps")
        if self._deadline is not None and self._clock() > self._deadline:
            raise GatewayTimeoutError(f"the generation did not finish within {self._timeout_s:g}s")


@dataclass(frozen=True)
class Finished(Generic[T]):
    """The last item of :meth:`Generations.stream`: what the work returned."""

    result: T


class Generations:
    """The generations of one replica: each on its own worker thread, counted while it runs, and
    counted in ``cancelled`` when it stopped early (cancelled, or past its deadline)."""

    def __init__(self) -> None:
        self.running = 0
        self.cancelled = 0

    async def run(self, work: Callable[[GenerationControl], T], control: GenerationControl) -> T:
        """``work(control)`` on a worker thread. A cancelled caller sets the flag and still waits
        until the thread has ended, then raises ``CancelledError``."""
        self.running += 1
        future = asyncio.ensure_future(asyncio.to_thread(work, control))
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            control.cancel()
            await _until_done(future)
            if isinstance(future.exception(), GenerationCancelled | GatewayTimeoutError):
                self.cancelled += 1
            raise
        except GatewayTimeoutError:
            self.cancelled += 1
            raise
        finally:
            self.running -= 1

    async def stream(
        self,
        work: Callable[[GenerationControl, Callable[[P], None]], T],
        control: GenerationControl,
    ) -> AsyncIterator[P | Finished[T]]:
        """Each progress item ``work`` reports (through the callable it gets), then its result.

        Closing or cancelling the iteration cancels the work and waits for its thread to end.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[P] = asyncio.Queue()

        def report(item: P) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        task = asyncio.ensure_future(self.run(lambda c: work(c, report), control))
        try:
            while not task.done():
                getter = asyncio.ensure_future(queue.get())
                try:
                    await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    if not getter.done():
                        getter.cancel()
                if getter.done() and not getter.cancelled():
                    yield getter.result()
            # The thread's last reports were queued before the task could finish.
            await asyncio.sleep(0)
            while not queue.empty():
                yield queue.get_nowait()
            yield Finished(task.result())
        finally:
            if not task.done():
                control.cancel()
                task.cancel()
                await _until_done(task)


async def _until_done(future: asyncio.Future[T]) -> None:
    """Wait for ``future`` whatever happens to the waiting task (a second cancel included)."""
    while not future.done():
        try:
            await asyncio.wait({future})
        except asyncio.CancelledError:
            continue
    if not future.cancelled():
        future.exception()  # retrieved: its outcome is reported by the caller
