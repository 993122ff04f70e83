"""Stopping a generation (lib/models/generation.py, lib/models/text_to_image.py): the cancel flag
checked after each denoising step, the caller that waits for the worker thread, progress and
previews; on the real tiny demo pipeline where it matters.
"""

from __future__ import annotations

import asyncio
import base64
import io
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from lib.errors import GatewayTimeoutError
from lib.models.demo import SD_DIR_NAME
from lib.models.device import Device, detect_device
from lib.models.generation import Finished, GenerationCancelled, GenerationControl, Generations
from lib.models.previews import latent_previews, preview_steps
from lib.models.text_to_image import generate, load_pipeline, resolve_params
from lib.schemas import GenerationStep, InferRequest, InferResponse


def busy_until_stopped(
    started: threading.Event, ended: threading.Event
) -> Callable[[GenerationControl], str]:
    """A stand-in for a pipeline: 'denoising steps' of 10 ms, the control checked after each."""

    def work(control: GenerationControl) -> str:
        started.set()
        try:
            for step in range(10_000):
                threading.Event().wait(0.01)
                control.steps_done = step + 1
                control.check()
            return "finished"
        finally:
            ended.set()

    return work


def test_a_cancelled_caller_stops_the_thread_and_holds_the_lock_until_it_ended() -> None:
    async def scenario() -> tuple[bool, int, int, bool]:
        generations = Generations()
        lock = asyncio.Lock()
        started, ended = threading.Event(), threading.Event()
        work = busy_until_stopped(started, ended)

        async def first() -> str:
            async with lock:
                return await generations.run(work, GenerationControl())

        task = asyncio.create_task(first())
        await asyncio.to_thread(started.wait, 10)
        assert generations.running == 1
        task.cancel()
        # The next user of the pipeline gets the lock only once the thread has ended.
        async with lock:
            ended_before_lock = ended.is_set()
        with pytest.raises(asyncio.CancelledError):
            await task
        return ended_before_lock, generations.running, generations.cancelled, task.cancelled()

    ended_before_lock, running, cancelled, was_cancelled = asyncio.run(scenario())
    assert ended_before_lock
    assert (running, cancelled, was_cancelled) == (0, 1, True)


def test_a_second_cancel_does_not_release_the_caller_early() -> None:
    async def scenario() -> bool:
        started, ended = threading.Event(), threading.Event()
        task = asyncio.create_task(Generations().run(busy_until_stopped(started, ended), GenerationControl()))
        await asyncio.to_thread(started.wait, 10)
        task.cancel()
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return ended.is_set()

    assert asyncio.run(scenario())


def test_the_deadline_stops_a_generation_with_504() -> None:
    now = [0.0]
    control = GenerationControl(30.0, clock=lambda: now[0])
    control.check()
    now[0] = 30.5
    with pytest.raises(GatewayTimeoutError, match="30s"):
        control.check()


def test_a_generation_past_its_deadline_counts_as_stopped_early() -> None:
    now = [0.0]
    control = GenerationControl(1.0, clock=lambda: now[0])

    def work(control: GenerationControl) -> str:
        now[0] = 2.0
        control.check()
        return "finished"

    generations = Generations()
    with pytest.raises(GatewayTimeoutError):
        asyncio.run(generations.run(work, control))
    assert (generations.running, generations.cancelled) == (0, 1)


def test_a_finished_run_counts_nothing_as_cancelled() -> None:
    generations = Generations()
    assert asyncio.run(generations.run(lambda control: 7, GenerationControl())) == 7
    assert (generations.running, generations.cancelled) == (0, 0)


def test_stream_reports_progress_in_order_then_the_result() -> None:
    def work(control: GenerationControl, report: Callable[[int], None]) -> str:
        for step in range(1, 6):
            report(step)
        return "done"

    async def collect() -> list[Any]:
        return [item async for item in Generations().stream(work, GenerationControl())]

    assert asyncio.run(collect()) == [1, 2, 3, 4, 5, Finished("done")]


def test_closing_a_stream_cancels_the_work_and_waits_for_its_thread() -> None:
    started, ended = threading.Event(), threading.Event()
    busy = busy_until_stopped(started, ended)

    def work(control: GenerationControl, report: Callable[[int], None]) -> str:
        report(0)
        return busy(control)

    async def scenario() -> tuple[bool, int]:
        generations = Generations()
        stream = generations.stream(work, GenerationControl())
        assert await anext(stream) == 0
        await asyncio.to_thread(started.wait, 10)
        await stream.aclose()  # type: ignore[attr-defined]
        return ended.is_set(), generations.running

    assert asyncio.run(scenario()) == (True, 0)


@pytest.mark.parametrize(
    ("total", "count", "expected"),
    [(6, 2, {2, 4}), (10, 3, {3, 5, 8}), (2, 2, {1, 2}), (1, 3, {1}), (30, 0, set()), (0, 2, set())],
)
def test_preview_steps_are_evenly_spaced_and_at_most_one_per_step(
    total: int, count: int, expected: set[int]
) -> None:
    assert preview_steps(total, count) == expected


def test_latent_previews_are_small_pngs_per_image() -> None:
    previews = latent_previews(torch.randn(2, 4, 32, 40))
    assert len(previews) == 2
    image = Image.open(io.BytesIO(base64.b64decode(previews[0])))
    assert image.format == "PNG" and image.size == (256, 205)
    assert latent_previews(torch.randn(1, 16, 8, 8)) == []  # not an SD latent: no wrong preview


# --- the real tiny pipeline ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def cpu() -> Device:
    return detect_device()


@pytest.fixture(scope="module")
def pipeline(demo_models_dir: Path, cpu: Device) -> Any:
    return load_pipeline(demo_models_dir / SD_DIR_NAME, cpu)


def params(**overrides: Any) -> Any:
    values: dict[str, Any] = {
        "id": "r", "model_id": "tiny-sd", "prompt": "a red cube", "width": 256, "height": 256,
        "num_inference_steps": 6, "seed": 7, "num_images": 2,
    }
    values.update(overrides)
    return resolve_params(InferRequest(**values), default_steps=6, default_guidance_scale=5.0)


def test_a_cancelled_pipeline_stops_after_the_step_it_is_in(pipeline: Any, cpu: Device) -> None:
    control = GenerationControl()
    seen: list[int] = []

    def on_step(step: GenerationStep) -> None:
        seen.append(step.step)
        if step.step == 2:
            control.cancel()  # as the event loop does when the caller is cancelled

    with pytest.raises(GenerationCancelled):
        generate(pipeline, params(num_inference_steps=50), cpu, control, on_step)
    assert seen == [1, 2]
    assert control.steps_done == 3  # the step that was running when the flag was set, no more


def test_progress_and_previews_do_not_change_the_images(pipeline: Any, cpu: Device) -> None:
    steps: list[GenerationStep] = []
    watched = generate(pipeline, params(), cpu, GenerationControl(), steps.append, preview_steps(6, 2))
    plain = generate(pipeline, params(), cpu)
    assert [i.base64 for i in watched.images] == [i.base64 for i in plain.images]
    assert [s.step for s in steps] == [1, 2, 3, 4, 5, 6]
    assert {s.total_steps for s in steps} == {6}
    with_previews = [s.step for s in steps if s.previews]
    assert with_previews == [2, 4]
    assert all(len(s.previews or []) == 2 for s in steps if s.previews)
    assert isinstance(watched, InferResponse)
