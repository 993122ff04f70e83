"""ModelCatalog and model recognition on small model fixtures built in tmp_path.

Recognition reads metadata only, so a "diffusers directory" here is a folder with a
``model_index.json`` and a few files; the checkpoints are real safetensors / torch files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lib.digest import sha256_file
from lib.errors import ModelNotFoundError, ModelUnavailableError, WrongModelKindError
from lib.models.catalog import DigestCache, ModelCatalog
from lib.models.files import Recognition, recognise
from lib.schemas import ModelInfo

T2I, CLS = "text-to-image", "image-classification"


# --- fixture builders ----------------------------------------------------------------------------


def make_diffusers_dir(path: Path, *, unet_bytes: bytes = b"unet-weights") -> Path:
    path.mkdir(parents=True)
    (path / "model_index.json").write_text(
        json.dumps({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]})
    )
    (path / "unet").mkdir()
    (path / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(unet_bytes)
    (path / "unet" / "config.json").write_text("{}")
    return path


def make_classifier_dir(path: Path, labels: tuple[str, ...] = ("cat", "dog", "bird")) -> Path:
    path.mkdir(parents=True)
    config = {
        "architectures": ["ResNetForImageClassification"],
        "id2label": {str(i): label for i, label in enumerate(labels)},
    }
    (path / "config.json").write_text(json.dumps(config))
    (path / "model.safetensors").write_bytes(b"classifier-weights")
    return path


def make_sd_safetensors(path: Path, value: float = 1.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"model.diffusion_model.x": torch.full((2, 2), value)}, str(path))
    return path


def make_other_safetensors(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"encoder.weight": torch.zeros(3)}, str(path))
    return path


class PayloadThatTouches:
    """Unpickling this calls ``open(marker, "w")``: the file appearing proves code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.marker, "w"))


def make_malicious_pickle(path: Path, marker: Path) -> Path:
    torch.save({"model.diffusion_model.w": PayloadThatTouches(marker)}, path)
    return path


def by_name(catalog: ModelCatalog) -> dict[str, ModelInfo]:
    return {m.name: m for m in catalog.entries()}


# --- recognition ----------------------------------------------------------------------------------


def test_diffusers_dir_is_text_to_image(tmp_path: Path) -> None:
    assert recognise(make_diffusers_dir(tmp_path / "sd")) == Recognition(kind=T2I)


def test_diffusers_transformer_pipeline_is_text_to_image(tmp_path: Path) -> None:
    path = tmp_path / "dit"
    path.mkdir()
    index = {"transformer": ["diffusers", "SD3Transformer2DModel"]}
    (path / "model_index.json").write_text(json.dumps(index))
    assert recognise(path).kind == T2I


def test_diffusers_dir_without_unet_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "audio"
    path.mkdir()
    (path / "model_index.json").write_text(json.dumps({"_class_name": "AudioLDMPipeline", "vocoder": []}))
    recognition = recognise(path)
    assert recognition.kind is None
    assert recognition.error is not None and "AudioLDMPipeline" in recognition.error


def test_classifier_dir_counts_labels(tmp_path: Path) -> None:
    recognition = recognise(make_classifier_dir(tmp_path / "cls", labels=("a", "b", "c", "d", "e")))
    assert recognition == Recognition(kind=CLS, num_labels=5)


def test_transformers_non_classifier_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "bert"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"]}))
    recognition = recognise(path)
    assert recognition.kind is None
    assert recognition.error is not None and "BertForMaskedLM" in recognition.error


@pytest.mark.parametrize("marker", ["model_index.json", "config.json"])
@pytest.mark.parametrize("content", ["{not json", "[1, 2]"])
def test_bad_json_marker_is_an_error(tmp_path: Path, marker: str, content: str) -> None:
    path = tmp_path / "broken"
    path.mkdir()
    (path / marker).write_text(content)
    recognition = recognise(path)
    assert recognition.kind is None
    assert recognition.error is not None and marker in recognition.error


def test_sd_safetensors_is_text_to_image(tmp_path: Path) -> None:
    assert recognise(make_sd_safetensors(tmp_path / "sd.safetensors")) == Recognition(kind=T2I)


def test_other_safetensors_is_an_error(tmp_path: Path) -> None:
    recognition = recognise(make_other_safetensors(tmp_path / "enc.safetensors"))
    assert recognition.kind is None
    assert recognition.error is not None and "not a Stable Diffusion checkpoint" in recognition.error


@pytest.mark.parametrize(
    ("keep", "expected"),
    [(0, "truncated"), (5, "truncated"), (8, "not valid JSON"), (20, "not valid JSON")],
    ids=["empty", "half-length-prefix", "no-header", "half-header"],
)
def test_truncated_safetensors_is_an_error(tmp_path: Path, keep: int, expected: str) -> None:
    whole = make_sd_safetensors(tmp_path / "whole.safetensors").read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(whole[:keep])
    recognition = recognise(path)
    assert recognition.kind is None
    assert recognition.error is not None and expected in recognition.error


def test_safetensors_truncated_inside_its_data_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "cut.safetensors"
    save_file({"model.diffusion_model.x": torch.ones(64, 64)}, str(path))
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) - 1024])
    recognition = recognise(path)
    assert recognition.error is not None


def test_safetensors_with_implausible_header_length_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "huge.safetensors"
    path.write_bytes((2**40).to_bytes(8, "little") + b"{}")
    recognition = recognise(path)
    assert recognition.error is not None and "implausibly large" in recognition.error


def test_safetensors_header_not_an_object_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "list.safetensors"
    header = b"[1, 2, 3]"
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    recognition = recognise(path)
    assert recognition.error is not None and "not a JSON object" in recognition.error


def test_plain_pt_state_dict_is_not_stable_diffusion(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save({"a": torch.ones(2)}, path)
    recognition = recognise(path, allow_pickle=True)
    assert recognition.kind is None
    assert recognition.error is not None and "not a Stable Diffusion checkpoint" in recognition.error


@pytest.mark.parametrize("suffix", [".ckpt", ".pth", ".bin"])
def test_checkpoint_with_state_dict_is_text_to_image(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"sd{suffix}"
    torch.save({"state_dict": {"model.diffusion_model.w": torch.ones(1)}, "global_step": 3}, path)
    assert recognise(path, allow_pickle=True) == Recognition(kind=T2I)


def test_checkpoint_that_is_not_a_dict_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "tensor.pt"
    torch.save(torch.ones(3), path)
    recognition = recognise(path, allow_pickle=True)
    assert recognition.error is not None and "state dict" in recognition.error


def test_malicious_pickle_is_reported_and_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = make_malicious_pickle(tmp_path / "evil.ckpt", marker)

    recognition = recognise(path, allow_pickle=True)
    assert recognition.kind is None
    assert recognition.error is not None and "weights_only" in recognition.error
    catalog = ModelCatalog([tmp_path], allow_pickle=True)
    [info] = catalog.scan()
    assert info.status == "error" and info.error is not None and "weights_only" in info.error
    assert not marker.exists()

    # The control: the payload really does run when unpickled unsafely, so the check above means
    # something. (Only in this test, on a file it wrote itself.)
    control_marker = tmp_path / "control"
    control = make_malicious_pickle(tmp_path / "control.bin", control_marker)
    loaded = torch.load(control, weights_only=False)
    assert control_marker.exists()
    loaded["model.diffusion_model.w"].close()  # the payload's open() handle


def test_corrupt_pickle_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"this is neither a zip archive nor a pickle")
    recognition = recognise(path, allow_pickle=True)
    assert recognition.kind is None and recognition.error is not None


@pytest.mark.parametrize("suffix", [".ckpt", ".pth", ".pt", ".bin"])
def test_pickle_checkpoints_are_refused_without_the_opt_in_and_never_opened(
    tmp_path: Path, suffix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / f"sd{suffix}"
    torch.save({"state_dict": {"model.diffusion_model.w": torch.ones(1)}}, path)
    opened: list[object] = []
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: opened.append(args))

    [info] = ModelCatalog([tmp_path]).scan()

    assert (info.kind, info.status) == (None, "error")
    assert info.error is not None and "ALLOW_PICKLE_MODELS" in info.error
    assert opened == []  # refused before any unpickling, weights_only or not


def test_a_model_dir_with_only_pickle_weights_is_refused_and_one_with_safetensors_is_not(
    tmp_path: Path,
) -> None:
    only_pickle = make_classifier_dir(tmp_path / "only-pickle")
    (only_pickle / "model.safetensors").unlink()
    torch.save({"w": torch.ones(1)}, only_pickle / "pytorch_model.bin")
    both = make_classifier_dir(tmp_path / "both")
    torch.save({"w": torch.ones(1)}, both / "pytorch_model.bin")  # ignored: use_safetensors=True

    models = {m.name: m for m in ModelCatalog([tmp_path]).scan()}
    assert models["only-pickle"].status == "error"
    assert "ALLOW_PICKLE_MODELS" in str(models["only-pickle"].error)
    assert (models["both"].kind, models["both"].status) == (CLS, "available")
    allowed = {m.name: m for m in ModelCatalog([tmp_path], allow_pickle=True).scan()}
    assert allowed["only-pickle"].status == "available"


def test_allow_pickle_models_comes_from_the_environment() -> None:
    from lib.settings import AppSettings

    assert AppSettings.from_args({}, env={}).allow_pickle_models is False
    assert AppSettings.from_args({}, env={"ALLOW_PICKLE_MODELS": "1"}).allow_pickle_models is True


def test_unsupported_file_type_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"x")
    recognition = recognise(path)
    assert recognition.error is not None and ".onnx" in recognition.error


# --- scanning --------------------------------------------------------------------------------------


def test_scan_lists_each_kind_with_its_metadata(tmp_path: Path) -> None:
    sd_dir = make_diffusers_dir(tmp_path / "sd-dir")
    cls_dir = make_classifier_dir(tmp_path / "classifier", labels=("x", "y"))
    sd_file = make_sd_safetensors(tmp_path / "single.safetensors")
    make_other_safetensors(tmp_path / "vae.safetensors")
    (tmp_path / "notes.txt").write_text("not a model")

    entries = ModelCatalog([tmp_path]).scan()
    names = ["sd-dir", "classifier", "single.safetensors", "vae.safetensors"]
    assert [m.name for m in entries] == sorted(names)
    models = {m.name: m for m in entries}

    sd = models["sd-dir"]
    assert (sd.kind, sd.status, sd.extension, sd.source) == (T2I, "available", "", "local")
    assert sd.path == str(sd_dir)
    assert sd.size == sum(f.stat().st_size for f in sd_dir.rglob("*") if f.is_file())

    cls = models["classifier"]
    assert (cls.kind, cls.status, cls.num_labels, cls.path) == (CLS, "available", 2, str(cls_dir))

    single = models["single.safetensors"]
    assert (single.kind, single.status, single.extension) == (T2I, "available", ".safetensors")
    assert single.size == sd_file.stat().st_size
    assert single.id == hashlib.sha256(sd_file.read_bytes()).hexdigest()

    vae = models["vae.safetensors"]
    assert (vae.kind, vae.status) == (None, "error")
    assert vae.error is not None and "Stable Diffusion" in vae.error


def test_links_out_of_model_dirs_are_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "passwd"
    secret.write_bytes(b"root:x:0:0:root:/root:/bin/bash\n")
    make_sd_safetensors(outside / "elsewhere.safetensors")
    make_classifier_dir(outside / "linked-classifier")
    root = tmp_path / "models"
    root.mkdir()
    (root / "passwd.bin").symlink_to(secret)
    (root / "elsewhere.safetensors").symlink_to(outside / "elsewhere.safetensors")
    (root / "linked-dir").symlink_to(outside)
    (root / "classifier").symlink_to(outside / "linked-classifier")
    leaky = make_classifier_dir(root / "leaky")
    (leaky / "extra.safetensors").symlink_to(secret)
    # Links that stay inside the MODEL_DIRS entry (a Hugging Face cache's snapshots) are fine.
    blob = make_sd_safetensors(root / "blobs" / "abc123.bin.safetensors")
    (root / "snapshot.safetensors").symlink_to(blob)

    entries = ModelCatalog([root], allow_pickle=True).scan()

    assert sorted(m.name for m in entries) == ["abc123.bin.safetensors"]
    assert not any(hashlib.sha256(secret.read_bytes()).hexdigest() == m.id for m in entries)


def test_model_dirs_are_not_descended_into(tmp_path: Path) -> None:
    make_diffusers_dir(tmp_path / "sd", unet_bytes=b"x")
    # The unet's weights file is part of the directory model, not a model of its own.
    assert [m.name for m in ModelCatalog([tmp_path]).scan()] == ["sd"]


@pytest.mark.parametrize(
    "make_entry",
    [
        pytest.param(lambda root: make_sd_safetensors(root / ".hidden.safetensors"), id="hidden-file"),
        pytest.param(lambda root: make_diffusers_dir(root / ".building-sd"), id="hidden-dir"),
        pytest.param(
            lambda root: make_sd_safetensors(root / ".cache" / "sd.safetensors"), id="in-hidden-dir"
        ),
        pytest.param(lambda root: make_diffusers_dir(root / "sd.tmp"), id="tmp-dir"),
        pytest.param(lambda root: make_classifier_dir(root / "cls.part"), id="part-dir"),
        pytest.param(lambda root: make_diffusers_dir(root / "sd.partial"), id="partial-dir"),
        pytest.param(lambda root: make_diffusers_dir(root / "sd.incomplete"), id="incomplete-dir"),
        pytest.param(lambda root: make_sd_safetensors(root / "sd.safetensors.tmp"), id="tmp-file"),
        pytest.param(lambda root: make_sd_safetensors(root / "sd.txt"), id="other-extension"),
    ],
)
def test_hidden_and_in_progress_entries_are_skipped(
    tmp_path: Path, make_entry: Callable[[Path], Path]
) -> None:
    make_entry(tmp_path)
    make_sd_safetensors(tmp_path / "visible.safetensors", value=7.0)
    assert [m.name for m in ModelCatalog([tmp_path]).scan()] == ["visible.safetensors"]


def test_hidden_files_inside_a_model_dir_do_not_change_its_id(tmp_path: Path) -> None:
    path = make_classifier_dir(tmp_path / "cls")
    before = DigestCache().digest(path)
    (path / ".DS_Store").write_bytes(b"finder junk")
    (path / ".git").mkdir()
    (path / ".git" / "HEAD").write_text("ref")
    assert DigestCache().digest(path) == before


def _nest(root: Path, depth: int) -> Path:
    for level in range(depth):
        root = root / f"level{level}"
    return root


@pytest.mark.parametrize("max_depth", [0, 1, 2, 4])
def test_nested_dirs_are_scanned_up_to_max_depth(tmp_path: Path, max_depth: int) -> None:
    for depth in range(6):
        make_sd_safetensors(_nest(tmp_path, depth) / f"file-at-{depth}.safetensors", value=float(depth))
        make_classifier_dir(_nest(tmp_path, depth) / f"dir-at-{depth}")
    # Each directory model differs in content from the others only by where it is; make them
    # distinct so that none is dropped as a duplicate.
    for depth in range(6):
        (_nest(tmp_path, depth) / f"dir-at-{depth}" / "extra").write_text(str(depth))

    names = {m.name for m in ModelCatalog([tmp_path], max_depth=max_depth).scan()}
    # Files directly in a directory at nesting `max_depth` are found; model directories are
    # recognised as entries of such a directory too.
    expected = {f"file-at-{d}.safetensors" for d in range(max_depth + 1)} | {
        f"dir-at-{d}" for d in range(max_depth + 1)
    }
    assert names == expected


def test_missing_model_dir_is_ignored(tmp_path: Path) -> None:
    make_sd_safetensors(tmp_path / "present" / "a.safetensors")
    catalog = ModelCatalog([tmp_path / "absent", tmp_path / "present"])
    assert [m.name for m in catalog.scan()] == ["a.safetensors"]


def test_duplicate_content_in_two_dirs_is_listed_once(tmp_path: Path) -> None:
    first = make_sd_safetensors(tmp_path / "one" / "model.safetensors")
    second = tmp_path / "two" / "copy.safetensors"
    second.parent.mkdir()
    shutil.copyfile(first, second)
    make_classifier_dir(tmp_path / "one" / "cls")
    shutil.copytree(tmp_path / "one" / "cls", tmp_path / "two" / "cls")

    entries = ModelCatalog([tmp_path / "one", tmp_path / "two"]).scan()
    assert len(entries) == 2
    assert len({m.id for m in entries}) == 2
    paths = {m.path for m in entries}
    assert paths == {str(first), str(tmp_path / "one" / "cls")}


def test_rescan_adds_and_drops_models(tmp_path: Path) -> None:
    make_sd_safetensors(tmp_path / "keep.safetensors")
    gone = make_classifier_dir(tmp_path / "gone")
    catalog = ModelCatalog([tmp_path])
    first = {m.name: m.id for m in catalog.scan()}
    assert set(first) == {"keep.safetensors", "gone"}

    shutil.rmtree(gone)
    make_diffusers_dir(tmp_path / "new-sd")
    second = {m.name: m.id for m in catalog.scan()}
    assert set(second) == {"keep.safetensors", "new-sd"}
    assert second["keep.safetensors"] == first["keep.safetensors"]
    with pytest.raises(ModelNotFoundError):
        catalog.get(first["gone"])
    assert catalog.get(second["new-sd"]).name == "new-sd"


def test_rescan_after_content_change_gives_a_new_id(tmp_path: Path) -> None:
    path = make_sd_safetensors(tmp_path / "m.safetensors", value=1.0)
    catalog = ModelCatalog([tmp_path])
    [before] = catalog.scan()
    make_sd_safetensors(path, value=2.0)
    os.utime(path, ns=(before_ns := path.stat().st_mtime_ns, before_ns + 1_000_000_000))
    [after] = catalog.scan()
    assert after.id == sha256_file(path) != before.id
    with pytest.raises(ModelNotFoundError):
        catalog.get(before.id)


def test_recognition_is_cached_by_id(tmp_path: Path) -> None:
    make_sd_safetensors(tmp_path / "a.safetensors")
    calls: list[Path] = []

    def counting(path: Path) -> Recognition:
        calls.append(path)
        return recognise(path)

    catalog = ModelCatalog([tmp_path], recognise_model=counting)
    catalog.scan()
    catalog.scan()
    assert calls == [tmp_path / "a.safetensors"]


# --- ids and the digest cache ------------------------------------------------------------------------


def test_file_id_is_the_sha256_of_its_bytes(tmp_path: Path) -> None:
    path = make_sd_safetensors(tmp_path / "m.safetensors")
    data = path.read_bytes()
    assert DigestCache().digest(path) == (hashlib.sha256(data).hexdigest(), len(data))
    [info] = ModelCatalog([tmp_path]).scan()
    assert info.id == hashlib.sha256(data).hexdigest()


def test_dir_id_follows_the_documented_formula(tmp_path: Path) -> None:
    path = make_diffusers_dir(tmp_path / "sd")
    files = sorted(f for f in path.rglob("*") if f.is_file())
    lines = "".join(
        f"{f.relative_to(path).as_posix()}\0{hashlib.sha256(f.read_bytes()).hexdigest()}\n" for f in files
    )
    expected = hashlib.sha256(lines.encode()).hexdigest()
    assert DigestCache().digest(path) == (expected, sum(f.stat().st_size for f in files))


def _write_files(root: Path, files: dict[str, bytes]) -> Path:
    root.mkdir()
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


DIR_FILES = {"config.json": b"{}", "weights/a.bin": b"AAAA", "weights/b.bin": b"BBBB"}


def test_dir_id_does_not_depend_on_creation_order(tmp_path: Path) -> None:
    forward = _write_files(tmp_path / "forward", DIR_FILES)
    backward = _write_files(tmp_path / "backward", dict(reversed(list(DIR_FILES.items()))))
    cache = DigestCache()
    assert cache.digest(forward) == cache.digest(backward)
    assert DigestCache().digest(forward) == cache.digest(forward)  # deterministic across caches


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({**DIR_FILES, "weights/a.bin": b"AAAB"}, id="content"),
        pytest.param(
            {"config.json": b"{}", "weights/a2.bin": b"AAAA", "weights/b.bin": b"BBBB"}, id="rename"
        ),
        pytest.param({"config.json": b"{}", "a.bin": b"AAAA", "weights/b.bin": b"BBBB"}, id="move"),
        pytest.param({**DIR_FILES, "weights/c.bin": b""}, id="added-empty-file"),
        pytest.param({"config.json": b"{}", "weights/a.bin": b"BBBB", "weights/b.bin": b"AAAA"}, id="swap"),
    ],
)
def test_dir_id_changes_with_content_or_names(tmp_path: Path, change: dict[str, bytes]) -> None:
    original = _write_files(tmp_path / "original", DIR_FILES)
    changed = _write_files(tmp_path / "changed", change)
    assert DigestCache().digest(original)[0] != DigestCache().digest(changed)[0]


class CountingHash:
    def __init__(self) -> None:
        self.paths: list[Path] = []

    def __call__(self, path: Path) -> str:
        self.paths.append(path)
        return sha256_file(path)


def test_digest_cache_does_not_rehash_unchanged_files(tmp_path: Path) -> None:
    make_sd_safetensors(tmp_path / "a.safetensors")
    make_diffusers_dir(tmp_path / "sd")
    hashing = CountingHash()
    cache = DigestCache(hash_file=hashing)
    catalog = ModelCatalog([tmp_path], digests=cache)
    first = catalog.scan()
    hashed_once = len(hashing.paths)
    assert hashed_once == 4  # the file, and model_index.json + two unet files
    assert cache.files_hashed == hashed_once
    assert catalog.scan() == first
    assert catalog.verify(first[0].id) == first[0]
    assert len(hashing.paths) == hashed_once
    assert cache.files_hashed == hashed_once


@pytest.mark.parametrize("same_size", [False, True], ids=["size-change", "same-size-new-mtime"])
def test_digest_cache_rehashes_after_a_change(tmp_path: Path, same_size: bool) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"old-bytes")
    hashing = CountingHash()
    cache = DigestCache(hash_file=hashing)
    old_digest, _ = cache.digest(path)
    old_mtime = path.stat().st_mtime_ns

    path.write_bytes(b"new-bytes" if same_size else b"new-longer-bytes")
    # Set the mtime explicitly: a rewrite within the filesystem's timestamp granularity could
    # otherwise keep it, and this test is about the cache noticing a new stamp.
    os.utime(path, ns=(old_mtime, old_mtime + 1_000_000_000))
    new_digest, size = cache.digest(path)
    assert new_digest == hashlib.sha256(path.read_bytes()).hexdigest() != old_digest
    assert size == path.stat().st_size
    assert hashing.paths == [path, path]


def test_digest_cache_forgets_missing_files(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    path.write_bytes(b"x")
    hashing = CountingHash()
    cache = DigestCache(hash_file=hashing)
    stamp = path.stat()
    cache.digest(path)
    path.unlink()
    cache.forget_missing()
    # Same bytes and stamp again: a forgotten entry is hashed anew.
    path.write_bytes(b"x")
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    cache.digest(path)
    assert hashing.paths == [path, path]


# --- lookups -------------------------------------------------------------------------------------------


@pytest.fixture
def catalog(tmp_path: Path) -> ModelCatalog:
    make_sd_safetensors(tmp_path / "b-sd.safetensors", value=1.0)
    make_sd_safetensors(tmp_path / "a-sd.safetensors", value=2.0)
    make_classifier_dir(tmp_path / "z-classifier")
    make_other_safetensors(tmp_path / "0-broken.safetensors")
    catalog = ModelCatalog([tmp_path])
    catalog.scan()
    return catalog


def test_entries_are_sorted_by_name(catalog: ModelCatalog) -> None:
    assert [m.name for m in catalog.entries()] == [
        "0-broken.safetensors", "a-sd.safetensors", "b-sd.safetensors", "z-classifier",
    ]


def test_get_by_id(catalog: ModelCatalog) -> None:
    for info in catalog.entries():
        assert catalog.get(info.id) == info


@pytest.mark.parametrize("model_id", ["0" * 64, "a-sd.safetensors", ""])
def test_get_unknown_is_not_found(catalog: ModelCatalog, model_id: str) -> None:
    # get() takes ids only; names are resolve()'s business.
    with pytest.raises(ModelNotFoundError) as caught:
        catalog.get(model_id)
    assert caught.value.status_code == 404


def test_resolve_by_id_and_by_name(catalog: ModelCatalog) -> None:
    sd = by_name(catalog)["b-sd.safetensors"]
    assert catalog.resolve(sd.id, T2I) == sd
    assert catalog.resolve("b-sd.safetensors", T2I) == sd
    cls = by_name(catalog)["z-classifier"]
    assert catalog.resolve("z-classifier", CLS) == cls


def test_resolve_default_is_first_available_of_kind_by_name(catalog: ModelCatalog) -> None:
    # "0-broken" sorts first but is an error; "a-sd" is the first usable text-to-image model.
    assert catalog.resolve(None, T2I).name == "a-sd.safetensors"
    assert catalog.resolve(None, CLS).name == "z-classifier"


@pytest.mark.parametrize(
    ("name", "kind"),
    [("b-sd.safetensors", CLS), ("z-classifier", T2I)],
)
def test_resolve_wrong_kind(catalog: ModelCatalog, name: str, kind: str) -> None:
    with pytest.raises(WrongModelKindError, match=kind) as caught:
        catalog.resolve(name, kind)
    assert caught.value.status_code == 422


@pytest.mark.parametrize("kind", [T2I, CLS])
def test_resolve_unusable_model_is_unavailable_not_wrong_kind(catalog: ModelCatalog, kind: str) -> None:
    # The request is fine; the model is not: 503 naming why, not a 422 blaming the client.
    broken = by_name(catalog)["0-broken.safetensors"]
    with pytest.raises(ModelUnavailableError) as caught:
        catalog.resolve("0-broken.safetensors", kind)
    assert caught.value.status_code == 503
    assert broken.error is not None and broken.error in caught.value.message


def test_resolve_unknown_is_not_found(catalog: ModelCatalog) -> None:
    with pytest.raises(ModelNotFoundError):
        catalog.resolve("no-such-model", T2I)
    with pytest.raises(ModelNotFoundError):
        catalog.resolve("f" * 64, T2I)


def test_resolve_default_without_a_model_of_the_kind(tmp_path: Path) -> None:
    make_sd_safetensors(tmp_path / "sd.safetensors")
    catalog = ModelCatalog([tmp_path])
    catalog.scan()
    with pytest.raises(ModelNotFoundError, match=CLS):
        catalog.resolve(None, CLS)


# --- verify ----------------------------------------------------------------------------------------------


def test_verify_passes_for_unchanged_models(catalog: ModelCatalog) -> None:
    for info in catalog.entries():
        assert catalog.verify(info.id) == info


def test_verify_after_file_changes(tmp_path: Path) -> None:
    path = make_sd_safetensors(tmp_path / "m.safetensors")
    catalog = ModelCatalog([tmp_path])
    [info] = catalog.scan()
    with path.open("ab") as handle:
        handle.write(b"appended")
    with pytest.raises(ModelUnavailableError, match="changed on disk") as caught:
        catalog.verify(info.id)
    assert caught.value.status_code == 503


def test_verify_after_a_file_in_a_model_dir_changes(tmp_path: Path) -> None:
    path = make_classifier_dir(tmp_path / "cls")
    catalog = ModelCatalog([tmp_path])
    [info] = catalog.scan()
    (path / "model.safetensors").write_bytes(b"other weights, other size")
    with pytest.raises(ModelUnavailableError, match="changed on disk"):
        catalog.verify(info.id)


def test_verify_after_file_removed(tmp_path: Path) -> None:
    path = make_sd_safetensors(tmp_path / "m.safetensors")
    catalog = ModelCatalog([tmp_path])
    [info] = catalog.scan()
    path.unlink()
    with pytest.raises(ModelUnavailableError, match="cannot be read"):
        catalog.verify(info.id)


def test_verify_unknown_is_not_found(catalog: ModelCatalog) -> None:
    with pytest.raises(ModelNotFoundError):
        catalog.verify("0" * 64)
