"""TextToImage: Stable Diffusion replicas, multiplexed by model id.

Callable over HTTP through the ingress, or directly from another Ray application:
``handle.options(multiplexed_model_id=req.model_id).generate.remote(req)`` (the option only
improves routing to a replica that already holds the model; ``req.model_id`` decides), or with
progress: ``handle.options(multiplexed_model_id=..., stream=True).generate_stream.remote(req, 2)``
yields a :class:`~lib.schemas.GenerationStep` per denoising step (with previews on 2 evenly
spaced steps) and then the :class:`~lib.schemas.InferResponse`.

A generation runs on a worker thread and checks a cancel flag after every denoising step: a
cancelled call (the client hung up, the ingress's timeout ran out, the caller cancelled) stops
within one step, and the pipeline stays locked until the thread has ended
(``lib/models/generation.py``). A generation also stops at the request timeout on its own.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from ray import serve
from ray.serve.exceptions import RayServeException

from deployments.model_replica import ModelReplica
from lib.models.catalog import require_kind
from lib.models.generation import Finished, GenerationControl, Generations
from lib.models.previews import preview_steps
from lib.models.text_to_image import generate, load_pipeline, resolve_params
from lib.observability import metrics
from lib.schemas import DeploymentHealth, GenerationStep, InferRequest, InferResponse, ModelInfo
from lib.settings import AppSettings

MODELS_PER_REPLICA = 2
MAX_PREVIEWS = 10


@dataclass
class LoadedPipeline:
    info: ModelInfo
    pipe: Any
    # diffusers pipelines keep per-call state in the scheduler: one generation at a time each.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@serve.deployment
class TextToImage(ModelReplica):
    deployment_name = "TextToImage"

    def __init__(self, settings: AppSettings) -> None:
        super().__init__(settings)
        # One generation at a time per pipeline, so its denoising steps may use every core:
        # bench/request_path.py measured a 1-thread replica (Ray's default for num_cpus=1) at
        # ~1.5x the time of a direct diffusers call on 2 threads; with both it is ~1.0x.
        threads = settings.generation_threads or os.cpu_count() or 1
        torch.set_num_threads(threads)
        self._generations = Generations()

    @serve.multiplexed(max_num_models_per_replica=MODELS_PER_REPLICA)
    @metrics.track_model_ready("TextToImage")
    async def get_model(self, model_id: str) -> LoadedPipeline:
        info = require_kind(await self._loader.ensure(model_id), "text-to-image")
        assert info.path is not None
        pipe = await asyncio.to_thread(load_pipeline, Path(info.path), self._device)
        loaded = LoadedPipeline(info, pipe)
        self._loaded[model_id] = loaded
        return loaded

    @metrics.track_generation
    async def generate(self, request: InferRequest) -> InferResponse:
        model, work = await self._prepare(request, 0)
        async with model.lock:
            return await self._generations.run(partial(work, None), self._control())

    async def generate_stream(
        self, request: InferRequest, previews: int = 0
    ) -> AsyncIterator[GenerationStep | InferResponse]:
        """A :class:`GenerationStep` after each denoising step, then the response."""
        model, work = await self._prepare(request, min(max(previews, 0), MAX_PREVIEWS))
        async with model.lock:
            async for item in self._generations.stream(lambda c, report: work(report, c), self._control()):
                yield item.result if isinstance(item, Finished) else item

    def health(self) -> DeploymentHealth:
        return super().health().model_copy(
            update={
                "replica": _replica_id(),
                "running_generations": self._generations.running,
                "cancelled_generations": self._generations.cancelled,
            }
        )

    async def _prepare(
        self, request: InferRequest, previews: int
    ) -> tuple[LoadedPipeline, Callable[..., InferResponse]]:
        model = await self.get_model(request.model_id)
        params = resolve_params(
            request,
            default_steps=self._settings.default_inference_steps,
            default_guidance_scale=self._settings.default_guidance_scale,
        )
        at = preview_steps(params.num_inference_steps, previews)

        def work(
            report: Callable[[GenerationStep], None] | None, control: GenerationControl
        ) -> InferResponse:
            return generate(model.pipe, params, self._device, control, report, at)

        return model, work

    def _control(self) -> GenerationControl:
        # The request timeout bounds a generation here too, for handle callers without one.
        return GenerationControl(self._settings.request_timeout_s)


def _replica_id() -> str | None:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except RayServeException:  # called outside a replica (tests, a plain instance)
        return None
