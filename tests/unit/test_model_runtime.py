"""Model runtime: generation parameters and seeds, then the real tiny demo models on this device.

The demo models are built once per session (``demo_models_dir`` in tests/conftest.py) and loaded
once per module here; each generation is a 256x256, 2-step run of a tiny random-weight model.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from lib.errors import ModelUnavailableError
from lib.models import device as device_module
from lib.models.classification import Classifier, classify, load_classifier
from lib.models.demo import CLASSIFIER_DIR_NAME, CLASSIFIER_LABELS, SD_DIR_NAME
from lib.models.device import Device, detect_device
from lib.models.text_to_image import GenerationParams, generate, image_seeds, load_pipeline, resolve_params
from lib.schemas import MAX_SEED, InferRequest, InferResponse

DEFAULTS: dict[str, Any] = {"default_steps": 13, "default_guidance_scale": 4.5}


def request(**overrides: Any) -> InferRequest:
    values: dict[str, Any] = {"id": "req-1", "model_id": "tiny-sd", "prompt": "a red cube on a table"}
    values.update(overrides)
    return InferRequest(**values)


# --- parameters and seeds --------------------------------------------------------------------------


def test_defaults_come_from_the_deployment() -> None:
    params = resolve_params(request(seed=1), **DEFAULTS)
    assert (params.num_inference_steps, params.guidance_scale) == (13, 4.5)
    params = resolve_params(request(seed=1), default_steps=40, default_guidance_scale=9.0)
    assert (params.num_inference_steps, params.guidance_scale) == (40, 9.0)


@pytest.mark.parametrize(
    ("steps", "guidance", "seed"), [(1, 1.0, 0), (150, 20.0, MAX_SEED), (2, 7.5, 12345)]
)
def test_explicit_values_are_kept(steps: int, guidance: float, seed: int) -> None:
    req = request(num_inference_steps=steps, guidance_scale=guidance, seed=seed)
    params = resolve_params(req, **DEFAULTS)
    assert params == GenerationParams(req, steps, guidance, seed)


def test_random_seed_is_in_range_and_varies() -> None:
    seeds = [resolve_params(request(), **DEFAULTS).seed for _ in range(50)]
    assert all(0 <= s <= MAX_SEED for s in seeds)
    assert len(set(seeds)) > 1


def test_random_seed_draws_from_the_full_range(monkeypatch: pytest.MonkeyPatch) -> None:
    bounds: list[int] = []

    def fake_randbelow(bound: int) -> int:
        bounds.append(bound)
        return bound - 1

    monkeypatch.setattr("lib.models.text_to_image.secrets.randbelow", fake_randbelow)
    assert resolve_params(request(), **DEFAULTS).seed == MAX_SEED
    assert bounds == [MAX_SEED + 1]


@pytest.mark.parametrize(
    ("first", "count", "expected"),
    [
        (0, 1, [0]),
        (7, 4, [7, 8, 9, 10]),
        (MAX_SEED, 1, [MAX_SEED]),
        (MAX_SEED - 1, 4, [MAX_SEED - 1, MAX_SEED, 0, 1]),
        (2**32 - 1, 2, [2**32 - 1, 0]),
    ],
)
def test_image_seeds_are_consecutive_and_wrap_at_2_32(first: int, count: int, expected: list[int]) -> None:
    assert image_seeds(first, count) == expected


# --- device -------------------------------------------------------------------------------------------


def test_detect_device_here() -> None:
    device = detect_device()
    if torch.cuda.is_available():
        assert (device.kind, device.dtype) == ("cuda", torch.float16)
    else:
        assert (device.kind, device.dtype) == ("cpu", torch.float32)
        assert device.torch_device == torch.device("cpu")
        assert device.dtype_name == "float32"


def test_detect_device_prefers_cuda_in_half_precision(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device_module.torch.cuda, "is_available", lambda: True)
    device = detect_device()
    assert (device.kind, device.dtype, device.dtype_name) == ("cuda", torch.float16, "float16")


def test_detect_device_mps_stays_in_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device_module.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device_module.torch.backends.mps, "is_available", lambda: True)
    assert detect_device() == Device("mps", torch.float32)


# --- text to image with the demo pipeline ----------------------------------------------------------------


@pytest.fixture(scope="module")
def cpu() -> Device:
    return detect_device()


@pytest.fixture(scope="module")
def pipeline(demo_models_dir: Path, cpu: Device) -> Any:
    return load_pipeline(demo_models_dir / SD_DIR_NAME, cpu)


def run(pipe: Any, device: Device, **overrides: Any) -> InferResponse:
    values: dict[str, Any] = {"width": 256, "height": 256, "num_inference_steps": 2, "seed": 1234}
    values.update(overrides)
    return generate(pipe, resolve_params(request(**values), **DEFAULTS), device)


def pixels(b64: str) -> tuple[np.ndarray, Image.Image]:
    raw = base64.b64decode(b64, validate=True)
    assert raw.startswith(b"\x89PNG\r\n\x1a\n")
    image = Image.open(io.BytesIO(raw))
    assert image.format == "PNG"
    return np.asarray(image.convert("RGB")).astype(np.int16), image


@pytest.fixture(scope="module")
def two_images(pipeline: Any, cpu: Device) -> InferResponse:
    return run(pipeline, cpu, num_images=2, negative_prompt="blurry")


def test_generate_returns_png_images_of_the_requested_size(two_images: InferResponse) -> None:
    assert len(two_images.images) == 2
    for generated in two_images.images:
        array, image = pixels(generated.base64)
        assert image.size == (256, 256) == (generated.width, generated.height)
        assert image.mode == "RGB"
        assert array.std() > 0  # a picture, not a blank


def test_generate_echoes_the_request(two_images: InferResponse) -> None:
    assert two_images.id == "req-1"
    assert two_images.model_id == "tiny-sd"
    assert two_images.prompt == "a red cube on a table"
    assert two_images.negative_prompt == "blurry"
    assert (two_images.num_inference_steps, two_images.guidance_scale) == (2, 4.5)
    assert two_images.processing_time >= 0


def test_generate_seeds_are_consecutive(two_images: InferResponse) -> None:
    assert [image.seed for image in two_images.images] == [1234, 1235]
    assert two_images.images[0].base64 != two_images.images[1].base64


def test_same_params_give_identical_bytes(pipeline: Any, cpu: Device, two_images: InferResponse) -> None:
    again = run(pipeline, cpu, num_images=2, negative_prompt="blurry")
    assert [i.base64 for i in again.images] == [i.base64 for i in two_images.images]


def test_other_seed_gives_other_bytes(pipeline: Any, cpu: Device, two_images: InferResponse) -> None:
    other = run(pipeline, cpu, num_images=1, seed=99, negative_prompt="blurry")
    assert other.images[0].base64 not in {i.base64 for i in two_images.images}


def test_each_image_seed_alone_regenerates_its_picture(
    pipeline: Any, cpu: Device, two_images: InferResponse
) -> None:
    second, _ = pixels(two_images.images[1].base64)
    alone, _ = pixels(run(pipeline, cpu, num_images=1, seed=1235, negative_prompt="blurry").images[0].base64)
    # Batched and single forward passes may round differently by one level; a different seed
    # gives a different picture altogether.
    assert np.abs(second - alone).max() <= 2
    first, _ = pixels(two_images.images[0].base64)
    assert np.abs(first - alone).mean() > 10


def test_generate_honours_non_square_sizes(pipeline: Any, cpu: Device) -> None:
    response = run(pipeline, cpu, width=320, height=256, seed=MAX_SEED)
    [generated] = response.images
    _, image = pixels(generated.base64)
    assert image.size == (320, 256)
    assert (generated.width, generated.height, generated.seed) == (320, 256, MAX_SEED)


def test_load_pipeline_from_a_broken_dir(tmp_path: Path, cpu: Device) -> None:
    broken = tmp_path / "broken-sd"
    broken.mkdir()
    (broken / "model_index.json").write_text(
        json.dumps({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]})
    )
    with pytest.raises(ModelUnavailableError, match="broken-sd") as caught:
        load_pipeline(broken, cpu)
    assert caught.value.status_code == 503


def test_load_pipeline_with_missing_weights(tmp_path: Path, demo_models_dir: Path, cpu: Device) -> None:
    copy = tmp_path / "no-unet-weights"
    shutil.copytree(demo_models_dir / SD_DIR_NAME, copy)
    for weights in (copy / "unet").glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(ModelUnavailableError, match="no-unet-weights"):
        load_pipeline(copy, cpu)


def test_load_pipeline_from_a_garbage_checkpoint_file(tmp_path: Path, cpu: Device) -> None:
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header....")
    with pytest.raises(ModelUnavailableError, match=r"garbage\.safetensors"):
        load_pipeline(path, cpu)


# --- classification with the demo classifier ----------------------------------------------------------


@pytest.fixture(scope="module")
def classifier(demo_models_dir: Path, cpu: Device) -> Classifier:
    return load_classifier(demo_models_dir / CLASSIFIER_DIR_NAME, cpu)


def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8))
    return [Image.new("RGB", (64, 64), (250, 10, 10)), noise, Image.new("RGB", (100, 30), (0, 0, 255))]


def test_load_classifier_reads_labels(classifier: Classifier) -> None:
    assert classifier.num_labels == len(CLASSIFIER_LABELS)
    assert [classifier.labels[i] for i in range(classifier.num_labels)] == list(CLASSIFIER_LABELS)


@pytest.mark.parametrize("top_k", [1, 3, 10])
def test_classify_top_k_sorted_and_named(classifier: Classifier, top_k: int) -> None:
    [predictions] = classify(classifier, images()[:1], [top_k])
    assert len(predictions) == top_k
    confidences = [p.confidence for p in predictions]
    assert confidences == sorted(confidences, reverse=True)
    assert all(0.0 <= c <= 1.0 for c in confidences)
    assert sum(confidences) <= 1.0 + 1e-6
    labels = [p.label for p in predictions]
    assert set(labels) <= set(CLASSIFIER_LABELS)
    assert len(set(labels)) == top_k


def test_classify_all_labels_sum_to_one(classifier: Classifier) -> None:
    [predictions] = classify(classifier, images()[1:2], [len(CLASSIFIER_LABELS)])
    assert sum(p.confidence for p in predictions) == pytest.approx(1.0, abs=1e-5)
    assert {p.label for p in predictions} == set(CLASSIFIER_LABELS)


def test_classify_caps_k_at_the_number_of_labels(classifier: Classifier) -> None:
    [predictions] = classify(classifier, images()[:1], [50])
    assert len(predictions) == len(CLASSIFIER_LABELS)


def test_classify_batch_with_different_top_k(classifier: Classifier) -> None:
    batch = images()
    results = classify(classifier, batch, [1, 4, 20])
    assert [len(r) for r in results] == [1, 4, len(CLASSIFIER_LABELS)]
    # Each row belongs to its own image: the batch answers as one image at a time would.
    for image, k, batched in zip(batch, [1, 4, 20], results, strict=True):
        [alone] = classify(classifier, [image], [k])
        assert [p.label for p in batched] == [p.label for p in alone]
        assert [p.confidence for p in batched] == pytest.approx([p.confidence for p in alone], abs=1e-4)
    # Different images, different distributions (the rows are not copies of one another).
    full = classify(classifier, batch, [len(CLASSIFIER_LABELS)] * 3)
    distributions = [{p.label: round(p.confidence, 6) for p in row} for row in full]
    assert distributions[0] != distributions[1] != distributions[2] != distributions[0]


def test_classify_is_deterministic(classifier: Classifier) -> None:
    first = classify(classifier, images(), [3, 3, 3])
    assert classify(classifier, images(), [3, 3, 3]) == first


def test_load_classifier_from_a_broken_dir(tmp_path: Path, demo_models_dir: Path, cpu: Device) -> None:
    broken = tmp_path / "broken-classifier"
    shutil.copytree(demo_models_dir / CLASSIFIER_DIR_NAME, broken)
    for weights in broken.glob("*.safetensors"):
        weights.write_bytes(b"truncated")
    with pytest.raises(ModelUnavailableError, match="broken-classifier"):
        load_classifier(broken, cpu)


def test_load_classifier_from_an_empty_dir(tmp_path: Path, cpu: Device) -> None:
    with pytest.raises(ModelUnavailableError):
        load_classifier(tmp_path, cpu)
