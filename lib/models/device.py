"""Where models run: CUDA, then Apple MPS, then CPU; half precision only on CUDA.

A replica Ray gave a GPU to (``num_gpus: 0.5`` in ``configs/gpu.yaml``) but that cannot use CUDA
(no driver, no device, a CPU-only torch, or a logical GPU declared with ``ray start --num-gpus``)
still runs, on the next device, and says so: :attr:`Device.warning` is the line ``/health``
shows and the replica logs once (docs/configuration.md, "Fractional GPUs").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GpuAssignment:
    """The GPUs Ray reserved for this process, as plain values (``lib`` imports no Ray).

    ``ids``: ``ray.get_gpu_ids()``; ``share``: the ``num_gpus`` the replica holds (0.5 is half of
    one GPU); ``cuda_visible_devices``: what Ray put in the environment for it.
    """

    ids: tuple[str, ...] = ()
    share: float | None = None
    cuda_visible_devices: str | None = None

    @classmethod
    def of(
        cls, ids: Sequence[int | str], share: float | None = None, cuda_visible_devices: str | None = None
    ) -> GpuAssignment:
        return cls(tuple(str(i) for i in ids), share, cuda_visible_devices)


@dataclass(frozen=True)
class Device:
    kind: str  # "cuda" | "mps" | "cpu"
    dtype: torch.dtype
    # Set when Ray assigned a GPU that this process cannot use: why it runs here instead.
    warning: str | None = None

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.kind)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def detect_device(assigned: GpuAssignment | None = None) -> Device:
    """Pick the best accelerator this process can see.

    Under Ray, a replica with ``num_gpus: 0.5`` sees its GPU through CUDA_VISIBLE_DEVICES, so
    ``cuda`` here is the (fraction of the) GPU Ray assigned. fp16 halves memory and is the norm
    for diffusion on CUDA; MPS and CPU stay in fp32 because fp16 kernels there are slow or absent.
    ``assigned`` is what Ray reserved for this replica: when it names a GPU and CUDA is not
    available, the device carries a :attr:`Device.warning` saying so.
    """
    if torch.cuda.is_available():
        return Device("cuda", torch.float16)
    mps = getattr(torch.backends, "mps", None)
    device = Device("mps" if mps is not None and mps.is_available() else "cpu", torch.float32)
    if assigned is None or not assigned.ids:
        return device
    return Device(device.kind, device.dtype, gpu_fallback_warning(assigned, device))


def gpu_fallback_warning(assigned: GpuAssignment, device: Device) -> str:
    """One line: the GPU Ray assigned, why CUDA cannot use it, and where the model runs instead.

    e.g. ``0.5 GPU assigned by Ray (GPU 0, CUDA_VISIBLE_DEVICES=0) but CUDA is not available
    (this torch build has no CUDA): running on CPU (float32)``.
    """
    share = f"{assigned.share:g} GPU" if assigned.share else "a GPU"
    ids = ",".join(assigned.ids)
    visible = assigned.cuda_visible_devices
    where = f"GPU {ids}, CUDA_VISIBLE_DEVICES={visible if visible is not None else '(unset)'}"
    why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device or driver"
    return (
        f"{share} assigned by Ray ({where}) but CUDA is not available ({why}): "
        f"running on {device.kind.upper()} ({device.dtype_name})"
    )
