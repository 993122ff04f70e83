"""Sealed models when something is wrong: each failure is a clear 503, in /health and in the logs.

The cases run in order against one Serve instance: wrong reader credentials (a second app), a
manifest forged by a publisher the nodes do not trust, a corrupted big part, a hostile directory
archive, S3 down, then the resource API down. Nothing unverified is ever loaded, and nothing is
written outside the node's cache.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import ray
from ray import serve

import lib.sealed.publish
from deployments.app import bind_graph
from lib.cli.publish import detect_kind
from lib.digest import sha256_file
from lib.sealed.cdn import CdnClient
from lib.sealed.publish import publish_model
from lib.sealed.signing import SigningKey
from lib.settings import AppSettings
from tests.hostile_archives import symlink_chain_escape
from tests.integration.test_api import assert_error, png_b64
from tests.sealed_world import BUCKET, FOLDER, SMALL_SIZE_KB, SealedWorld, mark_unique, sealed_world
from tests.serve_harness import ServeInstance, running_serve, start_ray, wait_ready

MODELS = ("clf-corrupt", "clf-s3-down", "clf-api-down", "clf-forged")
HOSTILE = "clf-hostile"
WRONG_READER = ("wrong-reader@sealserve.test", "a-password-the-loader-does-not-have")


@pytest.fixture(scope="module")
def outside(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory outside the node's cache that the hostile archive aims at."""
    return tmp_path_factory.mktemp("outside")


@pytest.fixture(scope="module")
def world(
    demo_models_dir: Path, tmp_path_factory: pytest.TempPathFactory, outside: Path
) -> Iterator[SealedWorld]:
    sources = tmp_path_factory.mktemp("sources")
    models = {name: mark_unique(demo_models_dir / "tiny-classifier", sources / name)[0] for name in MODELS}
    with sealed_world(tmp_path_factory.mktemp("sealed"), models) as sealed:
        sealed.resource_api.create_user(*WRONG_READER, role="reader")
        publish_hostile(sealed, demo_models_dir / "tiny-classifier", outside)
        yield sealed


def publish_hostile(world: SealedWorld, source: Path, outside: Path) -> None:
    """A publisher's archive that escapes Python 3.11.7's tarfile "data" filter into ``outside``.

    Published through the real path (seal, S3, resource API); only the packing is the attacker's.
    """
    def hostile_pack(src: Path, dst: Path) -> tuple[str, int]:
        dst.write_bytes(symlink_chain_escape(outside))
        return sha256_file(dst), dst.stat().st_size

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lib.sealed.publish, "pack_directory", hostile_pack)
        world.publish(source, HOSTILE)


def settings_for(world: SealedWorld, tmp: pytest.TempPathFactory, sealed: dict[str, Any]) -> AppSettings:
    return AppSettings.from_args(
        {
            "environment": "production",
            "model_dirs": [str(tmp.mktemp("no-local-models"))],
            "state_dir": str(tmp.mktemp("state")),
            "model_scan_interval": 2,
            "sealed": sealed,
        }
    )


@pytest.fixture(scope="module")
def api(world: SealedWorld, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeInstance]:
    start_ray()
    settings = settings_for(world, tmp_path_factory, world.sealed_args([*MODELS, HOSTILE]))
    with running_serve(bind_graph(settings), Path(settings.model_dirs[0])) as instance:
        yield instance


def classify(api: ServeInstance, model: str, prefix: str = "") -> Any:
    body = {"image": png_b64(), "top_k": 2, "model_id": model}
    return api.post(f"{prefix}/v1/classify", json=body, headers=api.auth())


def health_errors(api: ServeInstance, prefix: str = "") -> list[str]:
    body = api.get(f"{prefix}/health", headers=api.auth()).json()
    assert body["status"] == ("degraded" if body["errors"] else "ok")
    return list(body["errors"])


def loaded_classifiers(api: ServeInstance) -> list[str]:
    deployments = api.get("/health", headers=api.auth()).json()["deployments"]
    return next(d["loaded_models"] for d in deployments if d["deployment"] == "ImageClassifier")


def logged(text: str) -> bool:
    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    for path in logs.rglob("*"):
        try:
            if path.is_file() and text in path.read_text(errors="replace"):
                return True
        except OSError:
            continue
    return False


def test_wrong_reader_password(
    api: ServeInstance, world: SealedWorld, tmp_path_factory: pytest.TempPathFactory
) -> None:
    model_id = world.published["clf-api-down"].id
    sealed = world.sealed_args(["clf-api-down"], email=WRONG_READER[0])
    sealed["models"] = [{"name": "clf-api-down", "id": model_id}]  # pinned: listed even unlisted
    settings = settings_for(world, tmp_path_factory, sealed)
    serve.run(bind_graph(settings), name="badcreds", route_prefix="/bad")
    try:
        bad = ServeInstance(api.base_url + "/bad", api.model_dir)
        wait_ready(bad)
        listed = {m["name"]: m for m in bad.get("/v1/models", headers=bad.auth()).json()["models"]}
        assert listed["clf-api-down"]["status"] == "error"
        assert "AuthenticationError" in listed["clf-api-down"]["error"]
        error = assert_error(classify(bad, model_id), 503, "model_unavailable")
        assert "AuthenticationError" in error["message"]
        assert any("AuthenticationError" in e for e in health_errors(bad))
        assert WRONG_READER[1] not in str(listed) + error["message"]
    finally:
        serve.delete("badcreds")
    assert world.key_releases("clf-api-down") == 0


def test_a_manifest_no_trusted_publisher_signed_is_never_fetched(
    api: ServeInstance, world: SealedWorld, demo_models_dir: Path, tmp_path: Path
) -> None:
    """A publisher account (or a compromised resource API) replaces clf-forged with a model of its
    own, signed by a key the nodes do not trust: the loaders refuse its listing and never fetch it."""
    genuine = world.published["clf-forged"]
    forged_source = mark_unique(demo_models_dir / "tiny-classifier", tmp_path / "forged")[0]
    forged = publish_model(
        forged_source, name="clf-forged", folder=FOLDER, kind=detect_kind(forged_source),
        resources=world.publisher(), cdn=CdnClient(world.s3.config(BUCKET)), small_size_kb=SMALL_SIZE_KB,
        signing_key=SigningKey.generate(),
    )
    assert forged.status == "replaced" and forged.id != genuine.id
    deadline = time.monotonic() + 60  # the loaders list every model_scan_interval (2 s)
    while not any("clf-forged" in e and "not signed by a trusted publisher" in e for e in health_errors(api)):
        assert time.monotonic() < deadline, health_errors(api)
        time.sleep(0.5)
    listed = [m["id"] for m in api.get("/v1/models", headers=api.auth()).json()["models"]]
    assert forged.id not in listed
    assert classify(api, forged.id).status_code in (404, 503)
    assert classify(api, "clf-forged").status_code in (404, 503)
    assert world.key_releases("clf-forged") == 0 and world.s3.download_count(BUCKET, forged.big_key) == 0
    assert forged.id not in loaded_classifiers(api)


def test_corrupted_big_part(api: ServeInstance, world: SealedWorld) -> None:
    published = world.published["clf-corrupt"]
    s3 = boto3.client(
        "s3", endpoint_url=world.s3.config("x", direct=True).endpoint_url, region_name="us-east-1",
        aws_access_key_id="testing", aws_secret_access_key="testing",
    )
    body = bytearray(s3.get_object(Bucket="sealed-models", Key=published.big_key)["Body"].read())
    body[len(body) // 2] ^= 0x01
    s3.put_object(Bucket="sealed-models", Key=published.big_key, Body=bytes(body))

    error = assert_error(classify(api, "clf-corrupt"), 503, "model_unavailable")
    assert "IntegrityError" in error["message"]
    assert any("clf-corrupt" in e and "IntegrityError" in e for e in health_errors(api))
    assert published.id not in loaded_classifiers(api)
    assert not any(published.id in p.name for p in world.cache_dir.rglob("*"))
    assert logged("sealed model clf-corrupt is unavailable: IntegrityError")
    # the other sealed models are unaffected
    assert classify(api, "clf-s3-down").status_code == 200
    assert classify(api, "clf-s3-down").json()["model"] == world.published["clf-s3-down"].id


def test_hostile_directory_archive(api: ServeInstance, world: SealedWorld, outside: Path) -> None:
    published = world.published[HOSTILE]

    error = assert_error(classify(api, HOSTILE), 503, "model_unavailable")

    assert "IntegrityError" in error["message"] and "cannot be unpacked" in error["message"]
    assert list(outside.iterdir()) == []
    assert not any(published.id in p.name for p in world.cache_dir.rglob("*"))
    assert published.id not in loaded_classifiers(api)
    assert classify(api, "clf-s3-down").status_code == 200


def test_s3_down(api: ServeInstance, world: SealedWorld) -> None:
    # clf-s3-down is cached on the node now: it keeps working; a model never fetched cannot.
    world.s3.stop()
    assert classify(api, "clf-s3-down").status_code == 200
    error = assert_error(classify(api, "clf-api-down"), 503, "model_unavailable")
    assert "UpstreamError" in error["message"] and "S3" in error["message"]
    assert any("clf-api-down" in e and "UpstreamError" in e for e in health_errors(api))


def test_resource_api_down(api: ServeInstance, world: SealedWorld) -> None:
    world.resource_api.stop()
    error = assert_error(classify(api, "clf-api-down"), 503, "model_unavailable")
    assert "UpstreamError" in error["message"] and "resource API" in error["message"]
    assert api.get("/health").json()["ready"] is True  # degraded, still serving what it has
    assert classify(api, "clf-s3-down").status_code == 200
    assert world.published["clf-api-down"].id not in loaded_classifiers(api)
