"""Tiny demo models with random weights, built offline in seconds.

The service, its tests and ``make serve`` need real model directories of both kinds the catalog
knows (text-to-image, image-classification) without a download from a model hub. These models
have the exact on-disk layout of the real ones (a diffusers Stable Diffusion directory, a
transformers image classifier directory, all weights as safetensors), so every code path that
loads, seals, hashes or serves a model runs against them; only the pictures and the labels they
produce are meaningless.

Each build seeds torch first, so the same versions of torch/diffusers/transformers write
byte-identical files every time: the catalog id (a sha256) of a demo model is stable.

The heavy libraries are imported inside the builders: ``has_models`` runs from the Makefile and
must answer in milliseconds.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lib.models.tokenizer import END_OF_TEXT, START_OF_TEXT, write_clip_tokenizer

logger = logging.getLogger(__name__)

SD_DIR_NAME = "tiny-sd"
CLASSIFIER_DIR_NAME = "tiny-classifier"
SEED = 0

# SD 1.x pads every prompt to 77 tokens; keeping it means request validation and prompt
# truncation behave here exactly as with a real checkpoint.
TEXT_MAX_LENGTH = 77
CLIP_HIDDEN_SIZE = 32

CLASSIFIER_LABELS: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
CLASSIFIER_IMAGE_SIZE = 64

MODEL_FILE_SUFFIXES = frozenset({".safetensors", ".ckpt", ".pt", ".pth", ".bin"})
MODEL_DIR_MARKERS = ("model_index.json", "config.json")


def has_models(target_dir: Path) -> bool:
    """Whether ``target_dir`` already holds a model file or a model directory (top level only).

    Hidden entries are ignored: they are other builds' temporary directories, not models.
    """
    if not target_dir.is_dir():
        return False
    for entry in target_dir.iterdir():
        if entry.name.startswith("."):
            continue
        if entry.is_file() and entry.suffix.lower() in MODEL_FILE_SUFFIXES:
            return True
        if entry.is_dir() and any((entry / marker).is_file() for marker in MODEL_DIR_MARKERS):
            return True
    return False


def build_demo_models(
    target_dir: Path,
    *,
    force: bool = False,
    report: Callable[[str], None] = logger.info,
) -> list[Path]:
    """Build both demo models under ``target_dir``; return their (absolute) directories.

    A model whose directory already exists is kept (and ``report`` says so) unless ``force``.
    """
    target_dir.mkdir(parents=True, exist_ok=True)
    builders: tuple[tuple[str, Callable[[Path], Path]], ...] = (
        (SD_DIR_NAME, build_tiny_sd_pipeline),
        (CLASSIFIER_DIR_NAME, build_tiny_classifier),
    )
    built: list[Path] = []
    for name, builder in builders:
        path = (target_dir / name).absolute()
        if path.exists() and not force:
            report(f"skipped {name}: {path} already exists (use --force to rebuild)")
        else:
            builder(path)
            report(f"built {name} at {path} ({directory_size(path) / 1e6:.1f} MB)")
        built.append(path)
    return built


def build_tiny_sd_pipeline(path: Path) -> Path:
    """Write a tiny random-weight Stable Diffusion pipeline (diffusers format) at ``path``.

    ``path`` is replaced if it exists; readers never see a half-written directory.
    """
    return _build_atomically(path, _write_tiny_sd_pipeline)


def build_tiny_classifier(path: Path) -> Path:
    """Write a tiny random-weight ResNet image classifier (transformers format) at ``path``.

    ``path`` is replaced if it exists; readers never see a half-written directory.
    """
    return _build_atomically(path, _write_tiny_classifier)


def directory_size(path: Path) -> int:
    """Total size in bytes of the files under ``path``."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _write_tiny_sd_pipeline(out: Path) -> None:
    import transformers
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    # From its own module: the package root re-exports a dummy placeholder class under the same
    # name for installs without torch, and type checkers resolve that one.
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline

    vocab = write_clip_tokenizer(out / "tokenizer", model_max_length=TEXT_MAX_LENGTH)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(out / "tokenizer")

    text_config = transformers.CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=CLIP_HIDDEN_SIZE,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=TEXT_MAX_LENGTH,
        projection_dim=CLIP_HIDDEN_SIZE,
        # The pooled output is read at the first EOS; with ids other than the legacy 2 the
        # encoder looks the EOS id up instead of taking the argmax of the ids.
        bos_token_id=vocab[START_OF_TEXT],
        eos_token_id=vocab[END_OF_TEXT],
        pad_token_id=vocab[END_OF_TEXT],
    )
    with _seeded():
        text_encoder = transformers.CLIPTextModel(text_config)

    with _seeded():
        unet = UNet2DConditionModel(
            # 64 latents x 8 = a 512x512 default image, as with SD 1.x.
            sample_size=64,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=CLIP_HIDDEN_SIZE,
            attention_head_dim=8,
            norm_num_groups=8,
        )

    with _seeded():
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            # Four blocks = three downsamples = the 8x spatial factor every SD client assumes.
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 32, 32),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=512,
            # Mid-block self-attention is quadratic in latent pixels (16k tokens at 1024x1024) and
            # teaches a random model nothing.
            mid_block_add_attention=False,
        )

    scheduler = DDIMScheduler(
        # The SD 1.x noise schedule, so step counts and guidance behave as with a real model.
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )

    # Typed as Any: diffusers annotates these parameters too narrowly (a scheduler enum, no
    # Optional for the safety checker) for the documented way of building a pipeline.
    components: dict[str, Any] = {
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "unet": unet,
        "scheduler": scheduler,
        "safety_checker": None,
        "feature_extractor": None,
    }
    pipeline = StableDiffusionPipeline(**components, requires_safety_checker=False)
    pipeline.save_pretrained(out, safe_serialization=True)
    # save_pretrained re-serialises the tokenizer as tokenizer.json plus a config carrying load-time
    # state; put back the files this module writes itself, the SD 1.x layout, as the one source.
    shutil.rmtree(out / "tokenizer")
    write_clip_tokenizer(out / "tokenizer", model_max_length=TEXT_MAX_LENGTH)


def _write_tiny_classifier(out: Path) -> None:
    import transformers

    config = transformers.ResNetConfig(
        num_channels=3,
        embedding_size=16,
        hidden_sizes=[16, 32, 64, 128],
        depths=[1, 1, 1, 1],
        layer_type="basic",
        hidden_act="relu",
        id2label=dict(enumerate(CLASSIFIER_LABELS)),
        label2id={label: index for index, label in enumerate(CLASSIFIER_LABELS)},
    )
    with _seeded():
        model = transformers.ResNetForImageClassification(config)
    model.save_pretrained(out)

    # ConvNext's processor is the one the Hub's ResNets ship with (resize to size/crop_pct, centre
    # crop). The PIL backend writes the same file the torchvision one would, and loading picks
    # whichever backend is installed.
    processor = transformers.ConvNextImageProcessorPil(
        size={"shortest_edge": CLASSIFIER_IMAGE_SIZE},
        crop_pct=0.875,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )
    processor.save_pretrained(out)


@contextmanager
def _seeded() -> Iterator[None]:
    """Seed torch for the weights created inside, then give the caller its RNG state back.

    Forked so that a build in a long-lived process (a test session, the server) neither depends
    on nor disturbs anyone else's random numbers.
    """
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        yield


def _build_atomically(path: Path, write: Callable[[Path], None]) -> Path:
    """Run ``write`` into a hidden sibling of ``path``, then move the result into place.

    A catalog scanner may be watching the parent: it must see either no model or a whole one. A
    rename within one directory is atomic; replacing an existing model takes two renames, so for a
    moment neither exists, which a scanner reads as "no model yet", never as a broken one.
    """
    path = path.absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.building-", dir=path.parent))
    try:
        write(staging)
        _make_readable(staging)
        if path.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, retired / path.name)
            try:
                os.replace(staging, path)
            except BaseException:
                # Keep the model that was there rather than leave nothing.
                os.replace(retired / path.name, path)
                raise
            finally:
                shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def _make_readable(root: Path) -> None:
    # mkdtemp makes a 0700 directory and safetensors writes 0600 files, but a demo model holds no
    # secret and is read by serving processes that may run as another user.
    root.chmod(0o755)
    for entry in root.rglob("*"):
        entry.chmod(0o755 if entry.is_dir() else 0o644)
