"""Stable Diffusion with diffusers: loading a pipeline and generating reproducible images."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lib.errors import ModelUnavailableError
from lib.models.device import Device
from lib.models.files import has_safetensors
from lib.models.generation import GenerationControl
from lib.models.imaging import encode_png
from lib.models.previews import latent_previews
from lib.schemas import MAX_SEED, GeneratedImage, GenerationStep, InferRequest, InferResponse


@dataclass(frozen=True)
class GenerationParams:
    """An InferRequest with every default resolved and the seed chosen."""

    request: InferRequest
    num_inference_steps: int
    guidance_scale: float
    seed: int


def resolve_params(
    request: InferRequest, *, default_steps: int, default_guidance_scale: float
) -> GenerationParams:
    """The request with the deployment's defaults filled in and a seed chosen if it has none."""
    steps = request.num_inference_steps or default_steps
    guidance = request.guidance_scale if request.guidance_scale is not None else default_guidance_scale
    seed = request.seed if request.seed is not None else secrets.randbelow(MAX_SEED + 1)
    return GenerationParams(request, steps, guidance, seed)


def image_seeds(first: int, count: int) -> list[int]:
    """Seed of each image: consecutive, so each one alone regenerates its image."""
    return [(first + i) % (MAX_SEED + 1) for i in range(count)]


def load_pipeline(path: Path, device: Device) -> Any:
    """Load a text-to-image pipeline from a diffusers directory or a single checkpoint file.

    Everything is local (``local_files_only``): model sources are configuration, and a replica
    must never reach out to a hub. Where safetensors weights exist they are the only ones read
    (``use_safetensors=True``): a pickle beside them is never opened.
    """
    from diffusers import AutoPipelineForText2Image, StableDiffusionPipeline

    try:
        if path.is_dir():
            pipe = AutoPipelineForText2Image.from_pretrained(
                path, dtype=device.dtype, local_files_only=True,
                use_safetensors=True if has_safetensors(path) else None,
            )
        else:
            pipe = StableDiffusionPipeline.from_single_file(
                str(path), dtype=device.dtype, local_files_only=True
            )
    except Exception as exc:
        raise ModelUnavailableError(
            f"text-to-image model {path.name} could not be loaded ({type(exc).__name__}: {exc})"
        ) from None
    pipe = pipe.to(device.torch_device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(
    pipe: Any,
    params: GenerationParams,
    device: Device,
    control: GenerationControl | None = None,
    on_step: Callable[[GenerationStep], None] | None = None,
    preview_at: frozenset[int] = frozenset(),
) -> InferResponse:
    """Run the pipeline; the same seed gives the same image bytes on the same device and weights.

    Each image gets its own CPU generator (seed, seed+1, ...): CPU generators make the noise
    independent of the accelerator, and one generator per image makes each image reproducible
    on its own.

    After each denoising step (diffusers' ``callback_on_step_end``) ``control`` is checked, which
    raises to stop the generation there, and ``on_step`` is told, with previews of the images
    after the (1-based) steps in ``preview_at``.
    """
    control = control or GenerationControl()
    request = params.request
    seeds = image_seeds(params.seed, request.num_images)
    generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
    total = params.num_inference_steps

    def step_end(_pipe: Any, index: int, _timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        control.steps_done = index + 1
        control.check()
        if on_step is not None:
            previews = latent_previews(tensors["latents"]) if index + 1 in preview_at else None
            on_step(GenerationStep(
                step=index + 1, total_steps=total, num_images=request.num_images, previews=previews
            ))
        return {}

    control.check()
    started = time.perf_counter()
    with torch.inference_mode():
        output = pipe(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            num_inference_steps=params.num_inference_steps,
            guidance_scale=params.guidance_scale,
            width=request.width,
            height=request.height,
            num_images_per_prompt=request.num_images,
            generator=generators,
            output_type="pil",
            callback_on_step_end=step_end,
            callback_on_step_end_tensor_inputs=["latents"],
        )
    images = [
        GeneratedImage(base64=encode_png(image), seed=seed, width=image.width, height=image.height)
        for image, seed in zip(output.images, seeds, strict=True)
    ]
    return InferResponse(
        id=request.id,
        model_id=request.model_id,
        images=images,
        processing_time=round(time.perf_counter() - started, 4),
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        num_inference_steps=params.num_inference_steps,
        guidance_scale=params.guidance_scale,
    )
