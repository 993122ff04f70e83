"""The demo models: they load with the stock diffusers/transformers APIs, run, and build reproducibly."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification, CLIPTokenizer

import lib.models.demo as demo_models
from lib.cli import main as cli_main
from lib.models.demo import (
    CLASSIFIER_DIR_NAME,
    CLASSIFIER_LABELS,
    SD_DIR_NAME,
    build_demo_models,
    build_tiny_classifier,
    build_tiny_sd_pipeline,
    has_models,
)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("ai-models")
    paths = build_demo_models(target)
    assert paths == [target / SD_DIR_NAME, target / CLASSIFIER_DIR_NAME]
    return target


@pytest.fixture(scope="module")
def pipeline(models_dir: Path) -> Any:
    pipe = StableDiffusionPipeline.from_pretrained(models_dir / SD_DIR_NAME)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe: Any, seed: int, size: int = 256) -> np.ndarray:
    result = pipe(
        "a photo of the cat",
        height=size,
        width=size,
        num_inference_steps=2,
        guidance_scale=7.5,
        generator=torch.Generator().manual_seed(seed),
    )
    return np.asarray(result.images[0])


def _file_digests(root: Path) -> dict[str, str]:
    return {
        str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(root.rglob("*"))
        if f.is_file()
    }


# --- Stable Diffusion pipeline ---


def test_sd_directory_has_the_diffusers_layout_with_safetensors_only(models_dir: Path) -> None:
    sd = models_dir / SD_DIR_NAME
    index = json.loads((sd / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["requires_safety_checker"] is False
    assert index["safety_checker"] == [None, None]
    assert {"unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= {p.name for p in sd.iterdir()}
    weights = [f for f in sd.rglob("*") if f.suffix in {".safetensors", ".bin", ".ckpt", ".pt", ".pth"}]
    assert sorted(f.parent.name for f in weights) == ["text_encoder", "unet", "vae"]
    assert all(f.suffix == ".safetensors" for f in weights)
    assert demo_models.directory_size(sd) < 10_000_000


def test_pipeline_generates_the_requested_size_and_is_seed_deterministic(pipeline: Any) -> None:
    first = _generate(pipeline, seed=7)
    again = _generate(pipeline, seed=7)
    other = _generate(pipeline, seed=8)
    assert first.shape == (256, 256, 3)
    assert first.dtype == np.uint8
    np.testing.assert_array_equal(first, again)
    assert (first != other).mean() > 0.5
    # Random weights still have to produce a picture, not a constant (or NaN-black) frame.
    assert first.std() > 1.0


def test_pipeline_honours_non_square_sizes(pipeline: Any) -> None:
    image = pipeline(
        "x", height=256, width=320, num_inference_steps=1, generator=torch.Generator().manual_seed(0)
    ).images[0]
    assert image.size == (320, 256)


def test_vae_downscales_by_8(pipeline: Any) -> None:
    assert pipeline.vae_scale_factor == 8
    with torch.no_grad():
        latents = pipeline.vae.encode(torch.zeros(1, 3, 64, 48)).latent_dist.mean
    assert tuple(latents.shape) == (1, 4, 8, 6)


def test_tokenizer_matches_the_text_encoder(pipeline: Any) -> None:
    tokenizer = pipeline.tokenizer
    config = pipeline.text_encoder.config
    assert tokenizer.model_max_length == config.max_position_embeddings == 77
    assert len(tokenizer) == config.vocab_size
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (config.bos_token_id, config.eos_token_id)

    ids = tokenizer("A photo of the Cat!", padding="max_length", truncation=True).input_ids
    assert len(ids) == 77
    assert ids[0] == tokenizer.bos_token_id
    tokens = tokenizer.convert_ids_to_tokens(ids)
    # Merges from merges.txt are applied: "the" and "of" are one token each.
    assert "the</w>" in tokens
    assert "of</w>" in tokens
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a photo of the cat !"
    assert tokenizer.unk_token_id not in ids[: ids.index(tokenizer.eos_token_id)]


def test_tokenizer_files_are_the_sd1_layout_and_load_on_their_own(models_dir: Path) -> None:
    tokenizer_dir = models_dir / SD_DIR_NAME / "tokenizer"
    assert sorted(p.name for p in tokenizer_dir.iterdir()) == [
        "merges.txt",
        "special_tokens_map.json",
        "tokenizer_config.json",
        "vocab.json",
    ]
    assert (tokenizer_dir / "merges.txt").read_text().startswith("#version: 0.2\n")
    vocab = json.loads((tokenizer_dir / "vocab.json").read_text())
    assert len(vocab) == len(set(vocab.values())) == max(vocab.values()) + 1
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    # Any byte sequence has tokens: no prompt maps to the unknown token.
    ids = tokenizer("naïve café 🙂 ÆØÅ").input_ids
    assert tokenizer.unk_token_id not in ids[1:-1]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "naïve café 🙂 æøå"


# --- image classifier ---


def test_classifier_loads_and_classifies_with_named_labels(models_dir: Path) -> None:
    path = models_dir / CLASSIFIER_DIR_NAME
    files = {p.name for p in path.iterdir()}
    assert files == {"config.json", "model.safetensors", "preprocessor_config.json"}
    model = AutoModelForImageClassification.from_pretrained(path).eval()
    processor = AutoImageProcessor.from_pretrained(path)
    image = Image.new("RGB", (200, 120), (200, 30, 60))

    inputs = processor(images=image, return_tensors="pt")
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 64, 64)
    with torch.no_grad():
        logits = model(**inputs).logits

    assert tuple(logits.shape) == (1, len(CLASSIFIER_LABELS)) == (1, 10)
    assert torch.isfinite(logits).all()
    assert [model.config.id2label[i] for i in range(10)] == list(CLASSIFIER_LABELS)
    assert model.config.label2id == {label: i for i, label in enumerate(CLASSIFIER_LABELS)}
    assert model.config.id2label[int(logits.argmax())] in CLASSIFIER_LABELS


# --- reproducibility and atomic writes ---


def test_two_builds_write_identical_files(models_dir: Path, tmp_path: Path) -> None:
    # Reverse order and a disturbed global RNG: each builder must seed for itself, not rely on
    # whatever ran before it in the process.
    for name, build in ((CLASSIFIER_DIR_NAME, build_tiny_classifier), (SD_DIR_NAME, build_tiny_sd_pipeline)):
        torch.manual_seed(12345)
        torch.rand(1000)
        again = build(tmp_path / name)
        assert again == (tmp_path / name).absolute()
        first, second = _file_digests(models_dir / name), _file_digests(again)
        assert any(f.endswith(".safetensors") for f in first)
        assert first == second, name


def test_build_leaves_the_callers_rng_state_alone(tmp_path: Path) -> None:
    torch.manual_seed(4321)
    state = torch.get_rng_state()
    build_tiny_classifier(tmp_path / "clf")
    assert torch.equal(torch.get_rng_state(), state)


def test_build_leaves_no_staging_directory(models_dir: Path) -> None:
    assert sorted(p.name for p in models_dir.iterdir()) == sorted([SD_DIR_NAME, CLASSIFIER_DIR_NAME])


def test_failed_build_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def half_write(out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(demo_models, "_write_tiny_classifier", half_write)
    with pytest.raises(RuntimeError, match="disk full"):
        build_tiny_classifier(tmp_path / "clf")
    assert list(tmp_path.iterdir()) == []


def test_rebuild_replaces_the_existing_directory(tmp_path: Path) -> None:
    path = tmp_path / "clf"
    path.mkdir()
    (path / "stale.bin").write_bytes(b"old")
    build_tiny_classifier(path)
    assert not (path / "stale.bin").exists()
    assert (path / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clf"]


# --- has_models ---


def test_has_models_false_for_missing_empty_or_unrelated_content(tmp_path: Path) -> None:
    assert not has_models(tmp_path / "missing")
    assert not has_models(tmp_path)
    (tmp_path / "README.md").write_text("models go here")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    # A build in progress (hidden staging directory) is not a model yet.
    (tmp_path / ".tiny-sd.building-x").mkdir()
    (tmp_path / ".tiny-sd.building-x" / "model_index.json").write_text("{}")
    assert not has_models(tmp_path)


@pytest.mark.parametrize("name", ["w.safetensors", "w.ckpt", "w.pt", "w.pth", "w.bin", "W.SAFETENSORS"])
def test_has_models_true_for_a_weights_file(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_bytes(b"\0")
    assert has_models(tmp_path)


@pytest.mark.parametrize("marker", ["model_index.json", "config.json"])
def test_has_models_true_for_a_model_directory(tmp_path: Path, marker: str) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / marker).write_text("{}")
    assert has_models(tmp_path)


def test_has_models_true_after_a_build(models_dir: Path) -> None:
    assert has_models(models_dir)


# --- CLI ---


def test_cli_builds_skips_and_forces(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "ai-models"

    assert cli_main(["demo-models", "--dir", str(target)]) == 0
    out = capsys.readouterr().out
    assert f"built {SD_DIR_NAME} at {target / SD_DIR_NAME}" in out
    assert f"built {CLASSIFIER_DIR_NAME} at {target / CLASSIFIER_DIR_NAME}" in out
    index = StableDiffusionPipeline.load_config(target / SD_DIR_NAME)
    assert index["_class_name"] == "StableDiffusionPipeline"
    weights = target / CLASSIFIER_DIR_NAME / "model.safetensors"
    before = weights.stat().st_mtime_ns

    assert cli_main(["demo-models", "--dir", str(target), "--if-missing"]) == 0
    assert "nothing to build" in capsys.readouterr().out

    assert cli_main(["demo-models", "--dir", str(target)]) == 0
    out = capsys.readouterr().out
    assert f"skipped {SD_DIR_NAME}" in out
    assert f"skipped {CLASSIFIER_DIR_NAME}" in out
    assert weights.stat().st_mtime_ns == before

    (target / CLASSIFIER_DIR_NAME / "stale.txt").write_text("x")
    assert cli_main(["demo-models", "--dir", str(target), "--force"]) == 0
    assert f"built {CLASSIFIER_DIR_NAME}" in capsys.readouterr().out
    assert not (target / CLASSIFIER_DIR_NAME / "stale.txt").exists()


def test_cli_if_missing_builds_into_an_empty_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[Path] = []

    def fake_build(target: Path, *, force: bool = False, report: Any = print) -> list[Path]:
        built.append(target)
        return []

    monkeypatch.setattr("lib.cli.demo.build_demo_models", fake_build)
    assert cli_main(["demo-models", "--dir", str(tmp_path), "--if-missing"]) == 0
    assert built == [tmp_path]
