"""TextToImage: Stable Diffusion replicas, multiplexed by model id.

Callable over HTTP through the ingress, or directly from another Ray application:
``handle.options(multiplexed_model_id=req.model_id).generate.remote(req)`` (the option only
improves routing to a replica that already holds the model; ``req.model_id`` decides).
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from ray import serve

from deployments.model_replica import ModelReplica
from lib.models.catalog import require_kind
from lib.models.text_to_image import generate, load_pipeline, resolve_params
from lib.observability import metrics
from lib.schemas import InferRequest, InferResponse, ModelInfo
from lib.settings import AppSettings

MODELS_PER_REPLICA = 2


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
        model = await self.get_model(request.model_id)
        params = resolve_params(
            request,
            default_steps=self._settings.default_inference_steps,
            default_guidance_scale=self._settings.default_guidance_scale,
        )
        async with model.lock:
            return await asyncio.to_thread(generate, model.pipe, params, self._device)
