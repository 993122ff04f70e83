"""Request and response models of the HTTP API and of the Python handle API.

The same pydantic models travel over HTTP (FastAPI validates them) and through Ray deployment
handles (other Ray applications pass them directly), so both paths validate identically.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

ModelKind = Literal["text-to-image", "image-classification"]
ModelStatus = Literal["available", "sealed", "error"]
ModelSource = Literal["local", "sealed"]

MAX_PROMPT_CHARS = 1000
MAX_SEED = 2**32 - 1


class _Request(BaseModel):
    # Unknown fields are an error: a misspelt parameter must not be silently ignored.
    model_config = ConfigDict(extra="forbid", frozen=True)


def _multiple_of_8(value: int) -> int:
    if value % 8:
        raise ValueError("must be a multiple of 8")
    return value


class InferRequest(_Request):
    """Text-to-image request (`POST /v1/infer`)."""

    id: str = Field(min_length=1, max_length=128, description="Client's unique id of the request.")
    model_id: str = Field(
        min_length=1, max_length=128, description="Id (SHA-256) of a text-to-image model."
    )
    prompt: str = Field(
        min_length=1, max_length=MAX_PROMPT_CHARS, description="What to generate (max 1000 chars)."
    )
    negative_prompt: str | None = Field(
        None, max_length=MAX_PROMPT_CHARS, description="What to steer away from."
    )
    num_inference_steps: int | None = Field(
        None, ge=1, le=150, description="Denoising steps, 1-150 (default DEFAULT_INFERENCE_STEPS=30)."
    )
    guidance_scale: float | None = Field(
        None, ge=1.0, le=20.0, description="Classifier-free guidance, 1.0-20.0 (default 7.5)."
    )
    width: int = Field(512, ge=256, le=1024, description="Image width, 256-1024, multiple of 8.")
    height: int = Field(512, ge=256, le=1024, description="Image height, 256-1024, multiple of 8.")
    seed: int | None = Field(
        None, ge=0, le=MAX_SEED, description="Seed of the first image (random when absent)."
    )
    num_images: int = Field(1, ge=1, le=4, description="Images to generate, 1-4.")

    _dims = field_validator("width", "height")(_multiple_of_8)


class GeneratedImage(BaseModel):
    base64: str = Field(description="PNG image, base64-encoded.")
    seed: int = Field(
        description="Seed of this image's noise: the same request gives the same bytes, and this "
        "seed with num_images=1 gives the same picture."
    )
    width: int
    height: int


class InferResponse(BaseModel):
    id: str
    model_id: str
    images: list[GeneratedImage]
    processing_time: float = Field(description="Seconds spent generating.")
    prompt: str
    negative_prompt: str | None
    num_inference_steps: int
    guidance_scale: float


class GenerationStep(BaseModel):
    """One finished denoising step of a generation (the streaming handle API's progress item)."""

    step: int = Field(description="Steps done, 1 to total_steps.")
    total_steps: int
    num_images: int = Field(description="Images the step advanced (all of the request's at once).")
    previews: list[str] | None = Field(
        None, description="A small PNG (base64) of each image so far, on the steps that have one."
    )


class ProgressEvent(BaseModel):
    """The data of a ``progress`` event of ``POST /v1/infer`` streamed as ``text/event-stream``."""

    step: int = Field(description="Steps done, 1 to total_steps.")
    total_steps: int
    image_index: int = Field(description="Which image of the request, from 0.")
    preview: str | None = Field(None, description="A small PNG (base64) of the image so far.")


class ClassifyRequest(_Request):
    """Image classification request (`POST /v1/classify`)."""

    image: str = Field(
        min_length=1, description="The image: base64, or a data URL (data:image/png;base64,...)."
    )
    filename: str | None = Field(None, max_length=255, description="Original file name, if any.")
    top_k: int = Field(5, ge=1, le=20, description="How many labels to return, 1-20.")
    model_id: str | None = Field(
        None, max_length=128, description="Id or name of an image-classification model."
    )


class Prediction(BaseModel):
    label: str
    confidence: float = Field(ge=0.0, le=1.0)


class ClassifyResponse(BaseModel):
    predictions: list[Prediction]
    model: str = Field(description="Id of the model that classified the image.")


class ModelInfo(BaseModel):
    """One catalog entry."""

    id: str = Field(description="SHA-256 of the model file (a digest over the files of a directory).")
    name: str
    size: int = Field(description="Bytes on disk (plaintext size for sealed models).")
    path: str | None = Field(
        None, description="Always null over HTTP: where a model lies on a node is not shown to callers."
    )
    source: ModelSource = "local"
    extension: str = Field(description="File extension, or '' for a model directory.")
    kind: ModelKind | None = Field(None, description="None when the file could not be recognised.")
    status: ModelStatus
    error: str | None = Field(None, description="Why the model cannot be used (status 'error').")
    num_labels: int | None = Field(None, description="Number of labels of a classifier.")


class ModelObject(BaseModel):
    """A model as OpenAI's ``GET /v1/models`` lists it (``openai.types.Model``), plus name and kind."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(0, description="Not tracked by the catalog: always 0.")
    owned_by: str = Field(description="Where the model comes from: 'local' or 'sealed'.")
    name: str
    kind: ModelKind | None = None


class ModelList(BaseModel):
    """The catalog: ``models`` and ``count``, and the same models as OpenAI's list shape."""

    models: list[ModelInfo]
    count: int
    object: Literal["list"] = "list"
    data: list[ModelObject] = Field(default_factory=list)

    @classmethod
    def of(cls, models: list[ModelInfo]) -> ModelList:
        data = [ModelObject(id=m.id, owned_by=m.source, name=m.name, kind=m.kind) for m in models]
        return cls(models=models, count=len(models), data=data)


class ErrorDetail(BaseModel):
    code: str
    message: str
    request_id: str


class ErrorBody(BaseModel):
    """The body of every error response."""

    error: ErrorDetail


class DeploymentHealth(BaseModel):
    """What a model deployment replica reports about itself."""

    deployment: str
    device: str
    dtype: str
    loaded_models: list[str]
    warning: str | None = Field(
        default=None,
        description="Why the replica runs where it does when that is not what was asked for, e.g. "
        "a GPU assigned by Ray while CUDA is not available (it then runs on CPU).",
    )
    replica: str | None = Field(None, description="Which replica answered (Serve's replica id).")
    running_generations: int | None = Field(
        None, description="Text-to-image: generations whose worker thread is running on the replica."
    )
    cancelled_generations: int | None = Field(
        None,
        description="Text-to-image: generations the replica stopped early (cancelled or timed out) "
        "since it started.",
    )


class Health(BaseModel):
    """Liveness and readiness. The details (null for a caller without an admin credential) name
    deployments, devices and upstream errors, which are internals."""

    status: Literal["ok", "degraded"]
    ready: bool
    version: str
    device: str | None = None
    deployments: list[DeploymentHealth] | None = None
    models: int | None = Field(None, description="Models in the catalog.")
    errors: list[str] | None = None

    def public(self) -> Health:
        """What anyone may see: whether the service is up and ready, nothing about its internals."""
        return Health(status=self.status, ready=self.ready, version=self.version)


class TokenResponse(BaseModel):
    """A token response shaped like OAuth 2.0's: the ingress's ``POST /v1/auth/token`` and the
    resource API's ``POST /login`` (whose ``scope`` is the user's role)."""

    access_token: str = Field(repr=False, description="A JWT; send it as `Authorization: Bearer`.")
    token_type: Literal["bearer"] = "bearer"  # noqa: S105 - the OAuth token type, not a secret
    expires_in: int = Field(description="Seconds until the token expires.")
    scope: str = Field(description="The token's scopes, space-separated.")
