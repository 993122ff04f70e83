"""Image classification with transformers: loading a classifier and softmax top-k."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from lib.errors import ModelUnavailableError
from lib.models.device import Device
from lib.models.files import has_safetensors
from lib.schemas import Prediction


@dataclass
class Classifier:
    model: Any
    processor: Any
    labels: dict[int, str]
    device: Device

    @property
    def num_labels(self) -> int:
        return len(self.labels)


def load_classifier(path: Path, device: Device) -> Classifier:
    """Load a transformers image classifier directory (config.json + weights + preprocessor).

    ``weights_only`` stays at its safe default, so a pickle-based ``pytorch_model.bin`` cannot run
    code; where safetensors weights exist they are the only ones read (``use_safetensors=True``),
    so a pickle beside them is never opened.
    """
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    try:
        model = AutoModelForImageClassification.from_pretrained(
            path, local_files_only=True, dtype=device.dtype,
            use_safetensors=True if has_safetensors(path) else None,
        )
        processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise ModelUnavailableError(
            f"classifier {path.name} could not be loaded ({type(exc).__name__}: {exc})"
        ) from None
    model.to(device.torch_device).eval()
    labels = {int(i): str(label) for i, label in model.config.id2label.items()}
    return Classifier(model, processor, labels, device)


def classify(
    classifier: Classifier, images: Sequence[Image.Image], top_ks: Sequence[int]
) -> list[list[Prediction]]:
    """Classify a batch of images in one forward pass; ``top_ks[i]`` labels for image ``i``."""
    # BatchFeature.to casts only the floating-point tensors to the dtype.
    inputs = classifier.processor(images=list(images), return_tensors="pt").to(
        classifier.device.torch_device, dtype=classifier.device.dtype
    )
    with torch.inference_mode():
        logits = classifier.model(**inputs).logits.float()
    probabilities = logits.softmax(dim=-1).cpu()
    results = []
    for row, k in zip(probabilities, top_ks, strict=True):
        values, indices = row.topk(min(k, row.numel()))
        results.append(
            [
                Prediction(label=classifier.labels.get(int(i), str(int(i))), confidence=float(v))
                for v, i in zip(values, indices, strict=True)
            ]
        )
    return results
