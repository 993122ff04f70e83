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
from lib.errors import BadRequestError, SealserveError
from lib.models.catalog_view import CatalogView
from lib.models.classification import Classifier, classify, load_classifier
from lib.models.imaging import decode_image
from lib.observability import metrics
from lib.schemas import ClassifyRequest, ClassifyResponse, Prediction
from lib.settings import AppSettings

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

    def __init__(self, settings: AppSettings) -> None:
        super().__init__(settings)
        self._catalog = CatalogView(self._loader.models)

    @serve.multiplexed(max_num_models_per_replica=MODELS_PER_REPLICA)
    @metrics.track_model_ready("ImageClassifier")
    async def get_model(self, model_id: str) -> Classifier:
        info = await self._loader.ensure(model_id)
        assert info.path is not None
        classifier = await asyncio.to_thread(load_classifier, Path(info.path), self._device)
        self._loaded[model_id] = classifier
        return classifier

    @metrics.track_classification
    async def classify(self, request: ClassifyRequest) -> ClassifyResponse:
        """One image (the handle API); concurrent calls are batched into one forward pass."""
        info = await self._catalog.resolve(request.model_id or self._settings.default_classifier, KIND)
        image = await asyncio.to_thread(
            decode_image, request.image, max_pixels=self._settings.max_image_pixels
        )
        await self.get_model(info.id)  # load errors belong to this request, not to a batch
        predictions = await self._classify_batch(_Item(info.id, image, request.top_k))
        return ClassifyResponse(predictions=predictions, model=info.id)

    @metrics.track_classification
    async def classify_many(
        self, requests: list[ClassifyRequest]
    ) -> list[ClassifyResponse | SealserveError]:
        """Several images of one model in one forward pass (the ingress batches its requests).

        Every request names the same model. An image that does not decode is that request's
        error; the others are still classified. A model that cannot be loaded fails them all.
        """
        model_ids = {request.model_id or self._settings.default_classifier for request in requests}
        if len(model_ids) != 1:
            raise BadRequestError("classify_many takes requests for one model")
        info = await self._catalog.resolve(model_ids.pop(), KIND)
        classifier = await self.get_model(info.id)
        decoded = await asyncio.to_thread(self._decode_all, requests)
        images = [item for item in decoded if isinstance(item, Image.Image)]
        top_ks = [r.top_k for r, item in zip(requests, decoded, strict=True) if isinstance(item, Image.Image)]
        predictions = iter(
            await asyncio.to_thread(classify, classifier, images, top_ks) if images else []
        )
        return [
            item if isinstance(item, SealserveError)
            else ClassifyResponse(predictions=next(predictions), model=info.id)
            for item in decoded
        ]

    def _decode_all(self, requests: list[ClassifyRequest]) -> list[Image.Image | SealserveError]:
        decoded: list[Image.Image | SealserveError] = []
        for request in requests:
            try:
                decoded.append(decode_image(request.image, max_pixels=self._settings.max_image_pixels))
            except SealserveError as exc:
                decoded.append(exc)
        return decoded

    # No wait for a fuller batch: one client pays nothing, and under load a batch is what queued
    # while the previous one ran (the 10 ms wait it had cost every lone request 10 ms).
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)
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
