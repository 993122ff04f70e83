"""ImageClassifier: transformers classifiers, multiplexed by model id, with dynamic batching.

Concurrent requests for the same model are gathered by ``@serve.batch`` into one forward pass.
Callable from another Ray application: ``handle.classify.remote(ClassifyRequest(...))``.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from ray import serve

from deployments.model_replica import ModelReplica
from lib.models.classification import Classifier, classify, load_classifier
from lib.models.imaging import decode_image
from lib.schemas import ClassifyRequest, ClassifyResponse, Prediction

MODELS_PER_REPLICA = 2
KIND = "image-classification"


@dataclass(frozen=True)
class _Item:
    model_id: str
    image: Image.Image
    top_k: int


@serve.deployment
class ImageClassifier(ModelReplica):
    deployment_name = "ImageClassifier"

    @serve.multiplexed(max_num_models_per_replica=MODELS_PER_REPLICA)
    async def get_model(self, model_id: str) -> Classifier:
        info = await self._loader.ensure(model_id)
        assert info.path is not None
        classifier = await asyncio.to_thread(load_classifier, Path(info.path), self._device)
        self._loaded[model_id] = classifier
        return classifier

    async def classify(self, request: ClassifyRequest) -> ClassifyResponse:
        info = await self._loader.resolve(
            request.model_id or self._settings.default_classifier, KIND
        )
        image = await asyncio.to_thread(
            decode_image, request.image, max_pixels=self._settings.max_image_pixels
        )
        await self.get_model(info.id)  # load errors belong to this request, not to a batch
        predictions = await self._classify_batch(_Item(info.id, image, request.top_k))
        return ClassifyResponse(predictions=predictions, model=info.id)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _classify_batch(self, items: list[_Item]) -> list[list[Prediction]]:
        by_model: dict[str, list[int]] = defaultdict(list)
        for index, item in enumerate(items):
            by_model[item.model_id].append(index)
        results: list[list[Prediction]] = [[] for _ in items]
        for model_id, indices in by_model.items():
            classifier = await self.get_model(model_id)
            batch = await asyncio.to_thread(
                classify,
                classifier,
                [items[i].image for i in indices],
                [items[i].top_k for i in indices],
            )
            for i, predictions in zip(indices, batch, strict=True):
                results[i] = predictions
        return results
