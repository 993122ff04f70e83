"""Request and response of ``POST /v1/images/generations``, shaped as the ``openai`` client sends
and parses them, and their translation to sealserve's :class:`~lib.schemas.InferRequest`.

Accepted and ignored (they describe hosted models' options): ``quality``, ``style``,
``background``, ``moderation``, ``output_compression``, ``user``, ``safety_identifier``.
``output_format`` must be ``png`` and ``response_format`` ``b64_json`` (there are no stored
results to link to). sealserve's own parameters travel in the client's ``extra_body``:
``negative_prompt``, ``seed``, ``num_inference_steps``, ``guidance_scale``.
"""

from __future__ import annotations

import re
import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from lib.errors import BadRequestError
from lib.schemas import MAX_PROMPT_CHARS, MAX_SEED, InferRequest, InferResponse

_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")
MIN_SIDE, MAX_SIDE = 256, 1024
MAX_PARTIAL_IMAGES = 3


class ImageGenerationRequest(BaseModel):
    """The body the ``openai`` client's ``images.generate`` sends (plus sealserve's extensions)."""

    # A misspelt parameter is an error, as on the native API; the client's other known
    # parameters are listed (and ignored) so that it works unchanged.
    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    model: str | None = Field(
        None, min_length=1, max_length=128,
        description="Catalog id or name of a text-to-image model (default: the first one).",
    )
    n: int | None = Field(1, ge=1, le=4, description="Images to generate, 1-4.")
    size: str | None = Field(
        "auto", max_length=16,
        description="'WIDTHxHEIGHT', each 256-1024 and a multiple of 8; 'auto': 512x512.",
    )
    response_format: Literal["b64_json", "url"] | None = None
    output_format: str | None = Field(None, max_length=16, description="Only 'png'.")
    stream: bool | None = False
    partial_images: int | None = Field(None, ge=0, le=MAX_PARTIAL_IMAGES)
    user: str | None = Field(None, max_length=256)
    safety_identifier: str | None = Field(None, max_length=256)
    quality: str | None = Field(None, max_length=32, description="Accepted and ignored.")
    style: str | None = Field(None, max_length=32, description="Accepted and ignored.")
    background: str | None = Field(None, max_length=32, description="Accepted and ignored.")
    moderation: str | None = Field(None, max_length=32, description="Accepted and ignored.")
    output_compression: int | None = Field(None, ge=0, le=100, description="Accepted and ignored.")
    # sealserve's extensions (the client's extra_body).
    negative_prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    num_inference_steps: int | None = Field(None, ge=1, le=150)
    guidance_scale: float | None = Field(None, ge=1.0, le=20.0)

    @field_validator("size")
    @classmethod
    def _size(cls, value: str | None) -> str | None:
        if value is None or value == "auto":
            return value
        dims = parse_size(value)
        if dims is None:
            raise ValueError(
                f"must be 'auto' or 'WIDTHxHEIGHT' with each side {MIN_SIDE}-{MAX_SIDE} "
                "and a multiple of 8, e.g. '512x512'"
            )
        return value

    def to_infer_request(self, request_id: str, model_id: str) -> InferRequest:
        """The native request for the resolved model; 400 for what sealserve cannot answer."""
        if self.response_format == "url":
            raise BadRequestError(
                "response_format 'url' is not supported: sealserve keeps no generated images; "
                "use 'b64_json' (the default)"
            )
        if self.output_format not in (None, "png"):
            raise BadRequestError(f"output_format {self.output_format!r} is not supported; use 'png'")
        dims = parse_size(self.size) if self.size not in (None, "auto") else None
        size = {"width": dims[0], "height": dims[1]} if dims else {}
        return InferRequest(
            id=request_id,
            model_id=model_id,
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            seed=self.seed,
            num_images=self.n or 1,
            **size,
        )


def parse_size(value: str | None) -> tuple[int, int] | None:
    match = _SIZE.match(value or "")
    if not match:
        return None
    width, height = int(match.group(1)), int(match.group(2))
    if all(MIN_SIDE <= side <= MAX_SIDE and side % 8 == 0 for side in (width, height)):
        return width, height
    return None


class ImageData(BaseModel):
    b64_json: str
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    """What ``images.generate`` returns (``openai.types.ImagesResponse``)."""

    created: int
    data: list[ImageData]
    output_format: Literal["png"] = "png"
    size: str
    # sealserve's own: the seed of each image and the request as resolved.
    seeds: list[int]
    model: str
    num_inference_steps: int
    guidance_scale: float


def size_of(response: InferResponse) -> str:
    first = response.images[0] if response.images else None
    return f"{first.width}x{first.height}" if first else "auto"


def images_response(response: InferResponse, created: int | None = None) -> ImagesResponse:
    return ImagesResponse(
        created=created if created is not None else int(time.time()),
        data=[ImageData(b64_json=image.base64) for image in response.images],
        size=size_of(response),
        seeds=[image.seed for image in response.images],
        model=response.model_id,
        num_inference_steps=response.num_inference_steps,
        guidance_scale=response.guidance_scale,
    )
