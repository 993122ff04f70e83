"""Publishing against real servers: moto S3 as a process and the resource API as a process.

Each published model is then fetched back exactly as a node does it (key release to a fresh key
pair, parallel ranged download of the big part, join, open) and compared with the source.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devservers.resource_api import (
    REPO_ROOT,
    SEALSERVE_CLI,
    RecordingSession,
    ResourceApiServer,
    start_resource_api_server,
)
from devservers.s3 import S3Server
from lib.cli.publish import detect_kind
from lib.digest import sha256_file
from lib.errors import IntegrityError
from lib.retry import RetryPolicy
from lib.sealed.archive import pack_directory
from lib.sealed.cdn import CdnClient
from lib.sealed.fingerprint import node_fingerprint
from lib.sealed.format import JoinedReader, open_stream
from lib.sealed.keywrap import NodeKeyPair
from lib.sealed.publish import PublishResult, publish_model
from lib.sealed.resource_client import ResourceClient
from lib.sealed.signing import PublisherTrust, SigningKey

BUCKET = "sealed-models"
FOLDER = "models"
PUBLISHER = ("publisher@example.com", "publish-integration-publisher-pw")
READER = ("reader@example.com", "publish-integration-reader-pw")
NODE = node_fingerprint(machine_id_path=os.devnull, hostname="node-a", gpu_uuids=["GPU-a"])
NODE_KEY = SigningKey.generate()
FAST_RETRY = RetryPolicy(attempts=3, base_delay=0.05, max_delay=0.2)


@pytest.fixture(scope="module")
def resource_api(
    tmp_path_factory: pytest.TempPathFactory, s3_server: S3Server
) -> Iterator[ResourceApiServer]:
    server = start_resource_api_server(tmp_path_factory.mktemp("resource-api"))
    try:
        server.create_user(*PUBLISHER, role="publisher")
        server.create_user(*READER, role="reader")
        # Through the counting proxy, so the tests can tell which S3 requests publishing made.
        server.set_cdn(s3_server.config(BUCKET))
        server.approve_node(READER, NODE_KEY, NODE)
        yield server
    finally:
        server.stop()
    log = server.log_tail(10**7)
    for secret in (PUBLISHER[1], READER[1], server.env["RESOURCE_MASTER_KEY"]):
        assert secret not in log


def _client(server: ResourceApiServer, who: tuple[str, str], session: RecordingSession | None = None
            ) -> ResourceClient:
    return ResourceClient(server.url, *who, timeout=(1.0, 10.0), retry=FAST_RETRY, session=session,
                          node_key=NODE_KEY)


def _publish(server: ResourceApiServer, s3: S3Server, path: Path, name: str, work: Path,
             session: RecordingSession | None = None, **kwargs: Any) -> PublishResult:
    cdn = CdnClient(s3.config(BUCKET), retry_policy=FAST_RETRY)
    try:
        return publish_model(path, name=name, folder=FOLDER, kind=detect_kind(path),
                             resources=_client(server, PUBLISHER, session), cdn=cdn, work_dir=work, **kwargs)
    finally:
        cdn.close()


def _fetch_as_node(server: ResourceApiServer, name: str, dest: Path, trust: PublisherTrust | None = None
                   ) -> tuple[dict[str, Any], Path]:
    """What a node does: key release to its own key pair, CDN config, download, join, open."""
    keypair = NodeKeyPair.generate()
    reader = _client(server, READER)
    fetched = reader.get(FOLDER, name, keypair, NODE)
    manifest = fetched.manifest.model_dump()
    (trust or PublisherTrust()).check_manifest(FOLDER, fetched.manifest.model_dump(mode="json"),
                                               dek=fetched.dek, what=name)
    cdn = CdnClient(reader.cdn_config(keypair, NODE), part_size=1 << 20, retry_policy=FAST_RETRY)
    dest.mkdir(parents=True, exist_ok=True)
    big, plaintext = dest / "big", dest / "plaintext"
    try:
        cdn.download_file(manifest["big_key"], big,
                          expected_size=manifest["sealed_size"] - manifest["small_size"])
    finally:
        cdn.close()
    with big.open("rb") as big_part, plaintext.open("wb") as out:
        assert open_stream(JoinedReader([io.BytesIO(fetched.small_part), big_part]), out, fetched.dek) \
            == manifest["plaintext_size"]
    assert sha256_file(plaintext) == manifest["id"]
    return manifest, plaintext


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _s3_writes(s3: S3Server) -> int:
    return s3.request_count("PUT", f"/{BUCKET}") + s3.request_count("POST", f"/{BUCKET}")


def test_publish_a_directory_fetch_it_as_a_node_and_republish_unchanged(
    resource_api: ResourceApiServer, s3_server: S3Server, demo_models_dir: Path, tmp_path: Path
) -> None:
    source = demo_models_dir / "tiny-sd"
    result = _publish(resource_api, s3_server, source, "tiny-sd", tmp_path / "work", small_size_kb=64)
    expected_id, tar_size = pack_directory(source, tmp_path / "reference.tar")
    assert (result.status, result.id, result.plaintext_size) == ("created", expected_id, tar_size)
    assert result.small_size == 64 * 1024 and result.big_key == f"{FOLDER}/tiny-sd/{expected_id}.big"

    listed = {m.name: m.model_dump() for m in _client(resource_api, READER).list(FOLDER)}
    assert listed["tiny-sd"] == {
        "id": expected_id, "name": "tiny-sd", "kind": "text-to-image", "plaintext_size": tar_size,
        "sealed_size": result.sealed_size, "small_size": result.small_size, "big_key": result.big_key,
        "segment_size": 1 << 20, "is_directory": True,
    }
    cdn = CdnClient(s3_server.config(BUCKET))
    assert cdn.object_size(result.big_key) == result.sealed_size - result.small_size
    cdn.close()
    assert list((tmp_path / "work").iterdir()) == []

    _, plaintext = _fetch_as_node(resource_api, "tiny-sd", tmp_path / "node")
    with tarfile.open(plaintext) as tar:
        tar.extractall(tmp_path / "node" / "unpacked", filter="data")
    assert _tree(tmp_path / "node" / "unpacked") == _tree(source)

    s3_server.reset_counts()
    session = RecordingSession()
    again = _publish(resource_api, s3_server, source, "tiny-sd", tmp_path / "work", session, small_size_kb=64)
    assert again.status == "unchanged" and again.id == expected_id
    assert _s3_writes(s3_server) == 0, "no S3 upload for an unchanged model"
    assert s3_server.request_count("HEAD", f"/{BUCKET}/{result.big_key}") == 1
    assert session.calls == [("POST", "/login", 200), ("GET", f"/resources/{FOLDER}", 200)], \
        "no resource upload for an unchanged model"


def _cli_publish(server: ResourceApiServer, s3: S3Server, *argv: str) -> list[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RESOURCE_API_"))}
    # Credentials in the environment only, as an operator would pass them; the publisher's own
    # S3 write credential, never one released by the resource API.
    write = s3.config(BUCKET)
    env.update(RESOURCE_API_URL=server.url, RESOURCE_API_EMAIL=PUBLISHER[0],
               RESOURCE_API_PASSWORD=PUBLISHER[1], AWS_ACCESS_KEY_ID=write.access_key_id,
               AWS_SECRET_ACCESS_KEY=write.secret_access_key.get_secret_value())
    argv = (*argv, "--bucket", BUCKET, "--cdn-endpoint-url", str(write.endpoint_url))
    done = subprocess.run([*SEALSERVE_CLI, "publish", *argv], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert PUBLISHER[1] not in done.stdout + done.stderr
    return done.stdout.strip().splitlines()


def test_cli_publishes_a_single_file_with_its_own_credential_and_signs_it(
    resource_api: ResourceApiServer, s3_server: S3Server, demo_models_dir: Path, tmp_path: Path
) -> None:
    weights = demo_models_dir / "tiny-classifier" / "model.safetensors"
    signer = SigningKey.generate()
    signer.save(tmp_path / "signing.key")
    argv = [str(weights), "--name", "classifier-weights", "--folder", FOLDER, "--signing-key",
            str(tmp_path / "signing.key"), "--kind", "image-classification", "--segment-size", "65536",
            "--work-dir", str(tmp_path / "work")]
    s3_server.reset_counts()
    lines = _cli_publish(resource_api, s3_server, *argv)
    assert lines[-1] == sha256_file(weights), "the id alone on the last line"
    assert lines[0].startswith(f"created: {FOLDER}/classifier-weights")
    assert s3_server.request_count("PUT", f"/{BUCKET}/{FOLDER}/classifier-weights/{lines[-1]}.big") >= 1

    manifest, plaintext = _fetch_as_node(resource_api, "classifier-weights", tmp_path / "node",
                                         PublisherTrust([signer.public_b64]))
    with pytest.raises(IntegrityError, match="trusted publisher"):
        _fetch_as_node(resource_api, "classifier-weights", tmp_path / "node2",
                       PublisherTrust([SigningKey.generate().public_b64]))
    assert (manifest["kind"], manifest["is_directory"], manifest["segment_size"]) == \
        ("image-classification", False, 65536)
    assert plaintext.read_bytes() == weights.read_bytes()

    s3_server.reset_counts()
    lines = _cli_publish(resource_api, s3_server, *argv)
    assert lines[0].startswith("unchanged:") and lines[-1] == manifest["id"]
    assert _s3_writes(s3_server) == 0
    assert list((tmp_path / "work").iterdir()) == []


def test_changed_content_under_the_same_name_is_replaced_with_a_new_id(
    resource_api: ResourceApiServer, s3_server: S3Server, demo_models_dir: Path, tmp_path: Path
) -> None:
    source = tmp_path / "classifier"
    shutil.copytree(demo_models_dir / "tiny-classifier", source)
    first = _publish(resource_api, s3_server, source, "classifier", tmp_path / "work")
    assert first.status == "created"
    config = source / "preprocessor_config.json"
    config.write_text(config.read_text().replace("0.875", "0.9"))

    second = _publish(resource_api, s3_server, source, "classifier", tmp_path / "work")
    assert second.status == "replaced" and second.id != first.id
    assert second.big_key == f"{FOLDER}/classifier/{second.id}.big" != first.big_key
    listed = [m.model_dump() for m in _client(resource_api, READER).list(FOLDER) if m.name == "classifier"]
    assert [m["id"] for m in listed] == [second.id]
    manifest, plaintext = _fetch_as_node(resource_api, "classifier", tmp_path / "node")
    assert manifest["kind"] == "image-classification"
    with tarfile.open(plaintext) as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    assert _tree(tmp_path / "unpacked") == _tree(source)
    assert hashlib.sha256(plaintext.read_bytes()).hexdigest() == second.id


def test_a_big_part_gone_from_the_store_is_named_to_nodes_and_uploaded_again_by_publish(
    resource_api: ResourceApiServer, s3_server: S3Server, demo_models_dir: Path, tmp_path: Path
) -> None:
    """A lifecycle rule (or a person) deleted the big part: the manifest still lists it."""
    from lib.errors import NotFoundError

    source = demo_models_dir / "tiny-classifier"
    first = _publish(resource_api, s3_server, source, "gone-clf", tmp_path / "work")
    cdn = CdnClient(s3_server.config(BUCKET))
    try:
        cdn.delete(first.big_key)
    finally:
        cdn.close()

    with pytest.raises(NotFoundError) as missing:
        _fetch_as_node(resource_api, "gone-clf", tmp_path / "node-before")
    assert first.big_key in str(missing.value)  # the node's error names the missing object

    again = _publish(resource_api, s3_server, source, "gone-clf", tmp_path / "work")
    assert (again.status, again.id) == ("replaced", first.id)  # not "unchanged"
    _, plaintext = _fetch_as_node(resource_api, "gone-clf", tmp_path / "node-after")
    assert sha256_file(plaintext) == first.id
