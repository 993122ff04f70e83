"""lib.sealed.publish with small fakes for the two stores: tar, kind detection, idempotency, order."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import struct
import tarfile
from pathlib import Path
from typing import Any

import pytest

import lib.cli
import lib.sealed.publish
from lib.cli import main
from lib.cli.publish import detect_kind
from lib.errors import NotFoundError, PublishError, UpstreamError
from lib.sealed.archive import pack_directory
from lib.sealed.format import JoinedReader, open_stream, sealed_size, split_point
from lib.sealed.publish import publish_model
from lib.sealed.wire import ResourceManifest, UploadResponse


class FakeResources:
    """The resource API as a dict; records every call in ``calls`` (which may be shared).

    Manifests are stored as the JSON the real client would send, so tests compare plain dicts.
    """

    def __init__(self, calls: list[str] | None = None) -> None:
        self.stored: dict[tuple[str, str], tuple[dict[str, Any], bytes, bytes]] = {}
        self.calls: list[str] = [] if calls is None else calls

    def list(self, folder: str) -> list[ResourceManifest]:
        self.calls.append("resources.list")
        stored = [m for (f, _), (m, _, _) in self.stored.items() if f == folder]
        return [ResourceManifest.model_validate(m) for m in stored]

    def upload(self, folder: str, name: str, small: bytes, manifest: ResourceManifest, dek: bytes
               ) -> UploadResponse:
        self.calls.append("resources.upload")
        status = "replaced" if (folder, name) in self.stored else "created"
        self.stored[(folder, name)] = (manifest.model_dump(mode="json"), small, dek)
        return UploadResponse(folder=folder, name=name, id=manifest.id, status=status)


class FakeCdn:
    """The bucket as a dict; ``fail_upload`` makes the next upload fail like a dead S3."""

    bucket = "sealed"

    def __init__(self, calls: list[str] | None = None) -> None:
        self.objects: dict[str, bytes] = {}
        self.calls: list[str] = [] if calls is None else calls
        self.fail_upload = False

    def ensure_bucket(self) -> None:
        self.calls.append("cdn.ensure_bucket")

    def object_size(self, key: str) -> int:
        self.calls.append("cdn.object_size")
        if key not in self.objects:
            raise NotFoundError(f"s3://sealed/{key} does not exist")
        return len(self.objects[key])

    def upload_file(self, path: Path, key: str) -> None:
        self.calls.append("cdn.upload_file")
        if self.fail_upload:
            raise UpstreamError("S3 PUT failed")
        self.objects[key] = path.read_bytes()


def write_tree(root: Path, files: dict[str, bytes], *, reverse: bool = False, mtime: int = 0,
               mode: int = 0o644) -> Path:
    for rel in sorted(files, reverse=reverse):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(files[rel])
        path.chmod(mode)
        os.utime(path, (mtime, mtime))
    return root


TREE = {
    "model_index.json": b'{"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet"]}',
    "unet/config.json": b"{}",
    "unet/diffusion_pytorch_model.safetensors": os.urandom(3000),
    "vae/config.json": b'{"a": 1}',
    "z-last.txt": b"",
}


def test_the_same_tree_packs_to_identical_bytes_whatever_order_times_and_modes(tmp_path: Path) -> None:
    a = write_tree(tmp_path / "a", TREE, mtime=1_000_000, mode=0o600)
    b = write_tree(tmp_path / "b", TREE, reverse=True, mtime=1_700_000_000, mode=0o664)
    os.utime(a / "unet", (5, 5))
    id_a, size_a = pack_directory(a, tmp_path / "a.tar")
    id_b, size_b = pack_directory(b, tmp_path / "b.tar")
    id_a2, _ = pack_directory(a, tmp_path / "a2.tar")
    data = (tmp_path / "a.tar").read_bytes()
    assert data == (tmp_path / "b.tar").read_bytes() == (tmp_path / "a2.tar").read_bytes()
    assert id_a == id_b == id_a2 == hashlib.sha256(data).hexdigest()
    assert size_a == size_b == len(data)

    (b / "vae" / "config.json").write_bytes(b'{"a": 2}')
    assert pack_directory(b, tmp_path / "b2.tar")[0] != id_a, "other content, other id"


def test_tar_entries_are_normalised_and_extract_to_the_same_tree(tmp_path: Path) -> None:
    src = write_tree(tmp_path / "src", TREE, mode=0o600)
    (src / "run.sh").write_bytes(b"#!/bin/sh\n")
    (src / "run.sh").chmod(0o700)
    (src / ".cache").mkdir()
    (src / ".cache" / "download.metadata").write_text("etag and a timestamp")
    (src / ".gitattributes").write_text("*")
    os.link(src / "vae" / "config.json", src / "vae" / "hardlink.json")
    pack_directory(src, tmp_path / "m.tar")
    with tarfile.open(tmp_path / "m.tar") as tar:
        members = tar.getmembers()
        names = [m.name for m in members]
        assert names == sorted(names)
        assert names == ["model_index.json", "run.sh", "unet", "unet/config.json",
                         "unet/diffusion_pytorch_model.safetensors", "vae", "vae/config.json",
                         "vae/hardlink.json", "z-last.txt"]
        for m in members:
            assert (m.mtime, m.uid, m.gid, m.uname, m.gname) == (0, 0, 0, "", "")
            assert m.isdir() or m.isreg(), "hard links become plain copies"
            assert m.mode == (0o755 if m.isdir() or m.name == "run.sh" else 0o644)
        tar.extractall(tmp_path / "out", filter="data")
    for rel, content in TREE.items():
        assert (tmp_path / "out" / rel).read_bytes() == content
    assert not (tmp_path / "out" / ".cache").exists(), "hidden entries are not part of the model"


@pytest.mark.parametrize("target_is_dir", [False, True])
def test_a_symlink_inside_the_directory_is_refused(tmp_path: Path, target_is_dir: bool) -> None:
    src = write_tree(tmp_path / "src", TREE)
    (src / "unet" / "link").symlink_to(src / "vae" if target_is_dir else src / "vae" / "config.json")
    with pytest.raises(PublishError, match=r"unet/link .* is a symbolic link"):
        pack_directory(src, tmp_path / "m.tar")


def test_a_special_file_is_refused(tmp_path: Path) -> None:
    src = write_tree(tmp_path / "src", TREE)
    os.mkfifo(src / "vae" / "pipe")
    with pytest.raises(PublishError, match=r"vae/pipe .* is not a regular file or directory"):
        pack_directory(src, tmp_path / "m.tar")


def _safetensors(path: Path, keys: list[str], values: int = 1) -> Path:
    # The safetensors layout: u64 little-endian header length, JSON header, data (random here).
    header = {key: {"dtype": "F32", "shape": [values], "data_offsets": [4 * values * i, 4 * values * (i + 1)]}
              for i, key in enumerate(keys)}
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + os.urandom(4 * values * len(keys)))
    return path


def test_kind_is_detected_for_directories_and_checkpoints(tmp_path: Path) -> None:
    sd = write_tree(tmp_path / "sd", TREE)
    classifier = tmp_path / "classifier"
    classifier.mkdir()
    (classifier / "config.json").write_text(json.dumps({"architectures": ["ResNetForImageClassification"]}))
    checkpoint = _safetensors(tmp_path / "sd.safetensors", ["model.diffusion_model.input.weight"])
    assert detect_kind(sd) == "text-to-image"
    assert detect_kind(classifier) == "image-classification"
    assert detect_kind(checkpoint) == "text-to-image"

    weights = _safetensors(tmp_path / "weights.safetensors", ["encoder.weight"])
    with pytest.raises(PublishError, match="not a recognised model"):
        detect_kind(weights)
    assert detect_kind(weights, "image-classification") == "image-classification"
    with pytest.raises(PublishError, match="unknown model kind"):
        detect_kind(weights, "text-to-speech")


def _reopen(resources: FakeResources, cdn: FakeCdn, folder: str, name: str) -> bytes:
    manifest, small, dek = resources.stored[(folder, name)]
    out = io.BytesIO()
    open_stream(JoinedReader([io.BytesIO(small), io.BytesIO(cdn.objects[manifest["big_key"]])]), out, dek)
    return out.getvalue()


def test_publish_a_file_big_part_first_then_unchanged(tmp_path: Path) -> None:
    model = _safetensors(tmp_path / "sd.safetensors", ["model.diffusion_model.w"], values=12_500)
    kind = detect_kind(model)
    calls: list[str] = []
    resources, cdn, work = FakeResources(calls), FakeCdn(calls), tmp_path / "work"
    result = publish_model(model, name="sd", folder="models", resources=resources, cdn=cdn,
                           kind=kind, small_size_kb=4, segment_size=4096, work_dir=work)
    model_id = hashlib.sha256(model.read_bytes()).hexdigest()
    total = sealed_size(model.stat().st_size, 4096)
    assert (result.status, result.id, result.sealed_size) == ("created", model_id, total)
    assert result.small_size == split_point(total, 4) == 4096
    assert result.big_key == f"models/sd/{model_id}.big"
    # The manifest may only appear once the big part is on S3 and its size checked.
    assert calls == ["resources.list", "cdn.ensure_bucket", "cdn.upload_file", "cdn.object_size",
                     "resources.upload"]
    manifest = resources.stored[("models", "sd")][0]
    assert manifest == {"id": model_id, "name": "sd", "kind": "text-to-image",
                        "plaintext_size": model.stat().st_size, "sealed_size": total, "small_size": 4096,
                        "big_key": result.big_key, "segment_size": 4096, "is_directory": False}
    assert len(cdn.objects[result.big_key]) == total - 4096
    assert _reopen(resources, cdn, "models", "sd") == model.read_bytes()
    assert list(work.iterdir()) == [], "temporary files are removed"

    calls.clear()
    again = publish_model(model, name="sd", folder="models", resources=resources, cdn=cdn,
                          kind=kind, small_size_kb=4, segment_size=4096, work_dir=work)
    assert again == dataclasses.replace(result, status="unchanged")
    assert calls == ["resources.list", "cdn.object_size"], "no seal, no upload"

    # Other parameters, or a big part gone from S3, mean a fresh seal of the same content.
    assert publish_model(model, name="sd", folder="models", resources=resources, cdn=cdn,
                         kind=kind, small_size_kb=8, segment_size=4096, work_dir=work).status == "replaced"
    del cdn.objects[result.big_key]
    assert publish_model(model, name="sd", folder="models", resources=resources, cdn=cdn,
                         kind=kind, small_size_kb=8, segment_size=4096, work_dir=work).status == "replaced"
    assert _reopen(resources, cdn, "models", "sd") == model.read_bytes()


def test_a_directory_is_published_as_its_tar_and_changed_content_replaces(tmp_path: Path) -> None:
    src = write_tree(tmp_path / "sd", TREE)
    resources, cdn = FakeResources(), FakeCdn()
    first = publish_model(src, name="tiny-sd", folder="models", resources=resources, cdn=cdn,
                          kind=detect_kind(src), work_dir=tmp_path / "work")
    tar_id, tar_size = pack_directory(src, tmp_path / "ref.tar")
    assert (first.status, first.id, first.plaintext_size) == ("created", tar_id, tar_size)
    assert resources.stored[("models", "tiny-sd")][0]["is_directory"] is True
    assert _reopen(resources, cdn, "models", "tiny-sd") == (tmp_path / "ref.tar").read_bytes()

    (src / "vae" / "config.json").write_bytes(b'{"a": 3}')
    second = publish_model(src, name="tiny-sd", folder="models", resources=resources, cdn=cdn,
                           kind=detect_kind(src), work_dir=tmp_path / "work")
    assert second.status == "replaced" and second.id != first.id
    assert first.big_key in cdn.objects, "the old big part stays for nodes still downloading it"
    assert list((tmp_path / "work").iterdir()) == []


def test_a_failed_big_part_upload_leaves_no_manifest_and_no_temp_files(tmp_path: Path) -> None:
    src = write_tree(tmp_path / "sd", TREE)
    resources, cdn = FakeResources(), FakeCdn()
    cdn.fail_upload = True
    with pytest.raises(UpstreamError):
        publish_model(src, name="tiny-sd", folder="models", resources=resources, cdn=cdn,
                      kind=detect_kind(src), work_dir=tmp_path / "work")
    assert resources.calls == ["resources.list"] and resources.stored == {}
    assert list((tmp_path / "work").iterdir()) == []


def test_content_that_changes_between_hashing_and_sealing_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _safetensors(tmp_path / "sd.safetensors", ["model.diffusion_model.w"])
    monkeypatch.setattr(lib.sealed.publish, "sha256_file", lambda path: "0" * 64)
    resources, cdn = FakeResources(), FakeCdn()
    with pytest.raises(PublishError, match="changed while it was being published"):
        publish_model(model, name="sd", folder="models", resources=resources, cdn=cdn,
                      kind=detect_kind(model), work_dir=tmp_path / "w")
    assert cdn.objects == {} and resources.stored == {}


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"name": "../etc"}, "name '../etc' must match"),
    ({"folder": "a/b"}, "folder 'a/b' must match"),
    ({"segment_size": 0}, "segment size must be between"),
    ({"small_size_kb": -1}, "must not be negative"),
])
def test_bad_arguments_are_refused_before_any_call(
    tmp_path: Path, kwargs: dict[str, Any], message: str
) -> None:
    src = write_tree(tmp_path / "sd", TREE)
    resources, cdn = FakeResources(), FakeCdn()
    arguments: dict[str, Any] = {"name": "tiny-sd", "folder": "models", "kind": "text-to-image", **kwargs}
    with pytest.raises(PublishError, match=message):
        publish_model(src, resources=resources, cdn=cdn, **arguments)
    assert resources.calls == [] and cdn.calls == []


# -- CLI argument handling (no network: each case fails before the first call) --------------------


@pytest.fixture
def publish_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lib.cli, "COMMAND_MODULES", ("lib.cli.publish",))
    for var in ("RESOURCE_API_URL", "RESOURCE_API_EMAIL", "RESOURCE_API_PASSWORD",
                "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.usefixtures("publish_cli")
def test_cli_needs_a_resource_api_and_takes_no_password_argument(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    base = ["publish", str(tmp_path), "--name", "m", "--folder", "models", "--bucket", "b"]
    with pytest.raises(SystemExit):  # a publisher brings its own bucket and write credential
        main(base[:-2])
    assert "required: --bucket" in capsys.readouterr().err
    assert main(base) == 2
    assert "pass --resource-api or set $RESOURCE_API_URL" in capsys.readouterr().err
    monkeypatch.setenv("RESOURCE_API_URL", "http://127.0.0.1:9")
    assert main([*base, "--email", "p@example.com", "--cdn-endpoint-url", "http://s3.example.com"]) == 2
    assert "plain HTTP to another host" in capsys.readouterr().err
    assert main([*base, "--email", "p@example.com"]) == 2
    assert "needs your S3 write credential: $AWS_ACCESS_KEY_ID and $AWS_SECRET_ACCESS_KEY" in (
        capsys.readouterr().err
    )
    with pytest.raises(SystemExit):
        main([*base, "--password", "secret"])
