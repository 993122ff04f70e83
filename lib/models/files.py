"""What a model on disk is: its kind, whether it can be loaded safely, and its label count.

Recognition reads metadata only (JSON configs, the safetensors header). Pickle-based checkpoints
(``.bin``, ``.pt``, ``.pth``, ``.ckpt``, and model directories whose only weights are such files)
are refused unless the operator opts in (``ALLOW_PICKLE_MODELS=1``): ``weights_only=True`` has had
bypasses (CVE-2025-32434, CVE-2026-24747). With the opt-in they are opened with
``torch.load(weights_only=True)`` — never with a fallback to full unpickling — so a malicious
pickle is reported as an error instead of being executed.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODEL_FILE_EXTENSIONS = frozenset({".safetensors", ".ckpt", ".pt", ".pth", ".bin"})
PICKLE_EXTENSIONS = frozenset({".ckpt", ".pt", ".pth", ".bin"})
DIFFUSERS_MARKER = "model_index.json"
TRANSFORMERS_MARKER = "config.json"
# Keys of an original (single-file) Stable Diffusion checkpoint.
SD_CHECKPOINT_PREFIX = "model.diffusion_model."
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class Recognition:
    kind: str | None
    error: str | None = None
    num_labels: int | None = None


PICKLE_REFUSED = (
    "pickle-format weights are refused (weights_only=True has had bypasses); convert them to "
    "safetensors, or set ALLOW_PICKLE_MODELS=1 to load them with weights_only=True"
)


def is_model_dir(path: Path) -> bool:
    return (path / DIFFUSERS_MARKER).is_file() or (path / TRANSFORMERS_MARKER).is_file()


def has_safetensors(path: Path) -> bool:
    """Whether the model directory ``path`` holds safetensors weights (then loaders use only those)."""
    return any(path.rglob("*.safetensors"))


def _only_pickle_weights(path: Path) -> bool:
    return not has_safetensors(path) and any(
        f.suffix in PICKLE_EXTENSIONS for f in path.rglob("*") if f.is_file()
    )


def recognise(path: Path, *, allow_pickle: bool = False) -> Recognition:
    """Tell what the model file or directory at ``path`` is; never raises for bad content."""
    try:
        if path.is_dir():
            if not allow_pickle and _only_pickle_weights(path):
                return Recognition(kind=None, error=PICKLE_REFUSED)
            return _recognise_dir(path)
        if path.suffix == ".safetensors":
            return _from_keys(_safetensors_keys(path))
        if path.suffix in PICKLE_EXTENSIONS:
            if not allow_pickle:
                return Recognition(kind=None, error=PICKLE_REFUSED)
            return _from_keys(_pickle_keys(path))
    except UnsafeOrCorrupt as exc:
        return Recognition(kind=None, error=str(exc))
    return Recognition(kind=None, error=f"unsupported model file type {path.suffix!r}")


class UnsafeOrCorrupt(Exception):
    """A model file that cannot be read safely."""


def _recognise_dir(path: Path) -> Recognition:
    if (path / DIFFUSERS_MARKER).is_file():
        index = _read_json(path / DIFFUSERS_MARKER)
        if "unet" in index or "transformer" in index:
            return Recognition(kind="text-to-image")
        pipeline = index.get("_class_name")
        return Recognition(kind=None, error=f"diffusers pipeline {pipeline} is not text-to-image")
    config = _read_json(path / TRANSFORMERS_MARKER)
    architectures = config.get("architectures") or []
    if any(str(a).endswith("ForImageClassification") for a in architectures):
        labels = config.get("id2label") or {}
        return Recognition(kind="image-classification", num_labels=len(labels) or None)
    return Recognition(
        kind=None, error=f"transformers architecture {architectures} is not an image classifier"
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UnsafeOrCorrupt(f"{path.name} is not valid JSON") from exc
    if not isinstance(data, dict):
        raise UnsafeOrCorrupt(f"{path.name} is not a JSON object")
    return data


def _safetensors_keys(path: Path) -> list[str]:
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) != 8:
            raise UnsafeOrCorrupt("safetensors file is truncated")
        (length,) = struct.unpack("<Q", prefix)
        if length > _MAX_SAFETENSORS_HEADER:
            raise UnsafeOrCorrupt("safetensors header is implausibly large")
        try:
            header = json.loads(handle.read(length))
        except ValueError as exc:
            raise UnsafeOrCorrupt("safetensors header is not valid JSON") from exc
    if not isinstance(header, dict):
        raise UnsafeOrCorrupt("safetensors header is not a JSON object")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    try:
        data_end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        raise UnsafeOrCorrupt("safetensors header has malformed data offsets") from None
    if 8 + length + data_end != path.stat().st_size:
        raise UnsafeOrCorrupt("safetensors file is truncated or has trailing bytes")
    return list(tensors)


def _pickle_keys(path: Path) -> list[str]:
    import torch  # imported here: catalog scans of non-pickle models need no torch start-up

    try:
        # mmap keeps a multi-GB checkpoint out of RAM; weights_only refuses arbitrary objects.
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise UnsafeOrCorrupt(
                f"cannot be loaded safely with weights_only=True ({type(exc).__name__})"
            ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UnsafeOrCorrupt("checkpoint does not hold a state dict")
    return [str(k) for k in state]


def _from_keys(keys: list[str]) -> Recognition:
    if any(k.startswith(SD_CHECKPOINT_PREFIX) for k in keys):
        return Recognition(kind="text-to-image")
    return Recognition(kind=None, error="weights are not a Stable Diffusion checkpoint or a model directory")
