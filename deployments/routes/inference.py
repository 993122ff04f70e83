"""Inference: ``POST /v1/infer`` (alias ``/infer``, text to image) and ``POST /v1/classify``."""

from __future__ import annotations

from fastapi import APIRouter

from deployments.routes.deps import AdmittedClassify, AdmittedInfer, Models
from lib.accounts.compute import CLASSIFY_COST
from lib.schemas import ClassifyRequest, ClassifyResponse, InferRequest, InferResponse

router = APIRouter()


@router.post("/v1/infer", response_model=InferResponse)
@router.post("/infer", response_model=InferResponse)
async def infer(body: InferRequest, admission: AdmittedInfer, models: Models) -> InferResponse:
    await admission.charge_generation(
        width=body.width, height=body.height, steps=body.num_inference_steps, images=body.num_images
    )
    return await models.generate(body, admission)


@router.post("/v1/classify", response_model=ClassifyResponse)
async def classify(body: ClassifyRequest, admission: AdmittedClassify, models: Models) -> ClassifyResponse:
    await admission.charge(CLASSIFY_COST)
    return await models.classify(body, admission)
