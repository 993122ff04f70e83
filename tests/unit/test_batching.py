"""MicroBatcher (lib/batching.py): a lone call goes at once; concurrent calls leave together."""

from __future__ import annotations

import asyncio

import pytest

from lib.batching import MicroBatcher


class Recorder:
    def __init__(self, delay_s: float = 0.01, fail_on: int | None = None) -> None:
        self.batches: list[list[int]] = []
        self.delay_s = delay_s
        self.fail_on = fail_on
        self.running = 0
        self.most_running = 0

    async def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(items)
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            await asyncio.sleep(self.delay_s)
            if self.fail_on is not None and self.fail_on in items:
                raise RuntimeError("batch failed")
            return [item * 10 for item in items]
        finally:
            self.running -= 1


def test_a_lone_call_is_a_batch_of_one() -> None:
    recorder = Recorder()
    batcher = MicroBatcher(recorder, max_batch=8, max_in_flight=1)
    assert asyncio.run(batcher.submit(3)) == 30
    assert recorder.batches == [[3]]


def test_concurrent_calls_share_batches_bounded_by_size_and_in_flight() -> None:
    recorder = Recorder()
    batcher = MicroBatcher(recorder, max_batch=4, max_in_flight=2)

    async def burst() -> list[int]:
        return await asyncio.gather(*(batcher.submit(i) for i in range(10)))

    assert asyncio.run(burst()) == [i * 10 for i in range(10)]
    assert sorted(i for batch in recorder.batches for i in batch) == list(range(10))
    assert max(len(batch) for batch in recorder.batches) <= 4
    assert len(recorder.batches) < 10 and recorder.most_running <= 2
    assert (batcher.batches, batcher.items) == (len(recorder.batches), 10)


def test_a_failed_batch_fails_its_own_calls_only() -> None:
    recorder = Recorder(fail_on=0)
    batcher = MicroBatcher(recorder, max_batch=1, max_in_flight=1)

    async def both() -> list[object]:
        return await asyncio.gather(batcher.submit(0), batcher.submit(1), return_exceptions=True)

    failed, ok = asyncio.run(both())
    assert isinstance(failed, RuntimeError) and ok == 10


def test_a_cancelled_caller_is_not_sent() -> None:
    recorder = Recorder(delay_s=0.05)
    batcher = MicroBatcher(recorder, max_batch=8, max_in_flight=1)

    async def scenario() -> int:
        first = asyncio.create_task(batcher.submit(1))
        await asyncio.sleep(0)  # the first batch is out
        gone = asyncio.create_task(batcher.submit(2))
        await asyncio.sleep(0)
        gone.cancel()
        return await first

    assert asyncio.run(scenario()) == 10
    assert recorder.batches == [[1]]


@pytest.mark.parametrize(("size", "in_flight"), [(0, 1), (1, 0)])
def test_invalid_configuration_is_refused(size: int, in_flight: int) -> None:
    with pytest.raises(ValueError):
        MicroBatcher(Recorder(), max_batch=size, max_in_flight=in_flight)
