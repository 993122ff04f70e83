"""TextToImage: Stable Diffusion replicas, multiplexed by model id.

Callable over HTTP through the ingress, or directly from another Ray application:
``handle.options(multiplexed_model_id=req.model_id).generate.remote(req)`` (the option only
improves routing to a replica that already holds the model; ``req.model_id`` decides).
"""

from __future__ import annotations

import asyncio
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray import serve

from deployments.model_loader import NodeLoader
from lib.catalog import require_kind
from lib.device import detect_device
from lib.schemas import DeploymentHealth, InferRequest, InferResponse, ModelInfo
from lib.settings import AppSettings
from lib.text_to_image import generate, load_pipeline, resolve_params

MODELS_PER_REPLICA = 2


@dataclass
class LoadedPipeline:
    info: ModelInfo
    pipe: Any
    # diffusers pipelines keep per-call state in the scheduler: one generation at a time each.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=4)
class TextToImage:
    def __init__(self, settings: AppSettings) -> None:
        self._settings = settings
        self._device = detect_device()
        self._loader = NodeLoader.for_this_replica(settings)
        # Weak: an entry disappears when multiplexing evicts the model.
        self._loaded: weakref.WeakValueDictionary[str, LoadedPipeline] = weakref.WeakValueDictionary()

    @serve.multiplexed(max_num_models_per_replica=MODELS_PER_REPLICA)
    async def get_model(self, model_id: str) -> LoadedPipeline:
        info = require_kind(await self._loader.ensure(model_id), "text-to-image")
        assert info.path is not None
        pipe = await asyncio.to_thread(load_pipeline, Path(info.path), self._device)
        loaded = LoadedPipeline(info, pipe)
        self._loaded[model_id] = loaded
        return loaded

    async def generate(self, request: InferRequest) -> InferResponse:
        model = await self.get_model(request.model_id)
        params = resolve_params(request, self._settings)
        async with model.lock:
            return await asyncio.to_thread(generate, model.pipe, params, self._device)

    async def __del__(self) -> None:
        """Serve's graceful-shutdown hook: let the node's loader know this replica is gone."""
        loader: NodeLoader | None = getattr(self, "_loader", None)  # __init__ may have failed
        if loader is not None:
            await loader.close()

    def health(self) -> DeploymentHealth:
        return DeploymentHealth(
            deployment="TextToImage",
            device=self._device.kind,
            dtype=self._device.dtype_name,
            loaded_models=sorted(self._loaded.keys()),
        )
