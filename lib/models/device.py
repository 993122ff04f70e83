"""Where models run: CUDA, then Apple MPS, then CPU; half precision only on CUDA."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Device:
    kind: str  # "cuda" | "mps" | "cpu"
    dtype: torch.dtype

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.kind)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def detect_device() -> Device:
    """Pick the best accelerator this process can see.

    Under Ray, a replica with ``num_gpus: 0.5`` sees its GPU through CUDA_VISIBLE_DEVICES, so
    ``cuda`` here is the (fraction of the) GPU Ray assigned. fp16 halves memory and is the norm
    for diffusion on CUDA; MPS and CPU stay in fp32 because fp16 kernels there are slow or absent.
    """
    if torch.cuda.is_available():
        return Device("cuda", torch.float16)
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return Device("mps", torch.float32)
    return Device("cpu", torch.float32)
