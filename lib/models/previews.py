"""Previews of a generation in progress: the latents turned into small RGB images, without the VAE.

A Stable Diffusion latent has four channels; a fixed linear map of them approximates the colours
the VAE would decode (the approximation preview UIs use for SD 1.x/2.x latents). It costs a few
multiplications per latent pixel instead of a VAE decode, so a preview never slows a generation
down noticeably. A preview is 1/8 of the image's size, scaled up to at most
:data:`PREVIEW_MAX_SIDE` pixels on its longer side by repeating pixels (a smooth resize made
each preview PNG about 15 times larger).
"""

from __future__ import annotations

import math

import torch
from PIL import Image

from lib.models.imaging import encode_png

PREVIEW_MAX_SIDE = 256
# Rows: latent channels; columns: R, G, B.
LATENT_RGB_FACTORS = (
    (0.298, 0.207, 0.208),
    (0.187, 0.286, 0.173),
    (-0.158, 0.189, 0.264),
    (-0.184, -0.271, -0.473),
)


def preview_steps(total_steps: int, count: int) -> frozenset[int]:
    """The (1-based) steps after which a preview is taken: ``count`` evenly spaced, at most one per
    step (fewer than ``count`` when there are fewer steps), never only at the end."""
    if count <= 0 or total_steps <= 0:
        return frozenset()
    return frozenset(min(total_steps, math.ceil((k + 1) * total_steps / (count + 1))) for k in range(count))


def latent_previews(latents: torch.Tensor) -> list[str]:
    """One base64 PNG per image of a ``(images, 4, h, w)`` latent batch."""
    factors = torch.tensor(LATENT_RGB_FACTORS, dtype=torch.float32)
    previews = []
    for latent in latents.detach().to("cpu", torch.float32):
        if latent.shape[0] != len(LATENT_RGB_FACTORS):
            continue  # not an SD latent: no preview rather than a wrong one
        rgb = torch.einsum("chw,cr->hwr", latent, factors)
        pixels = ((rgb + 1.0) / 2.0).clamp(0.0, 1.0).mul(255).round().to(torch.uint8).numpy()
        image = Image.fromarray(pixels)
        scale = PREVIEW_MAX_SIDE / max(image.size)
        if scale > 1:
            size = (round(image.width * scale), round(image.height * scale))
            image = image.resize(size, Image.Resampling.NEAREST)
        previews.append(encode_png(image))
    return previews
