"""CdnClient against a real S3-compatible server process (moto), through real HTTP."""

from __future__ import annotations

import hashlib
import logging
import os
import time
import uuid
from pathlib import Path

import boto3
import pytest
from pydantic import SecretStr

from devservers.s3 import S3Server, start_s3_server
from lib.errors import IntegrityError, NotFoundError, UpstreamError
from lib.retry import RetryPolicy
from lib.sealed.cdn import CdnClient
from lib.sealed.transfer import MiB, range_header, split_ranges
from lib.sealed.wire import CdnConfig

FAST_RETRY = RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.05)


def _bucket() -> str:
    return f"sealserve-test-{uuid.uuid4().hex[:12]}"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_random(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


@pytest.fixture
def cdn(s3_server: S3Server) -> CdnClient:
    client = CdnClient(s3_server.config(_bucket()), part_size=5 * MiB, max_workers=4, retry_policy=FAST_RETRY)
    client.ensure_bucket()
    return client


def _raw_s3(server: S3Server):  # type: ignore[no-untyped-def]
    return boto3.session.Session().client(
        "s3", endpoint_url=server.direct_endpoint_url, region_name="us-east-1",
        aws_access_key_id="testing", aws_secret_access_key="testing",
    )


def test_ensure_bucket_creates_the_bucket_once(s3_server: S3Server) -> None:
    bucket = _bucket()
    client = CdnClient(s3_server.config(bucket), retry_policy=FAST_RETRY)
    raw = _raw_s3(s3_server)
    assert bucket not in [b["Name"] for b in raw.list_buckets()["Buckets"]]

    client.ensure_bucket()
    client.ensure_bucket()  # idempotent: a second node racing to create it must not fail

    assert bucket in [b["Name"] for b in raw.list_buckets()["Buckets"]]


def test_small_object_round_trip(cdn: CdnClient, tmp_path: Path) -> None:
    src = _write_random(tmp_path / "small.bin", 1000)
    cdn.upload_file(src, "models/small.bin")

    assert cdn.exists("models/small.bin")
    assert cdn.object_size("models/small.bin") == 1000
    dest = tmp_path / "out" / "small.bin"
    assert cdn.download_file("models/small.bin", dest, expected_size=1000) == 1000
    assert _sha256(dest) == _sha256(src)


def test_multipart_upload_and_parallel_ranged_download(
    s3_server: S3Server, cdn: CdnClient, tmp_path: Path
) -> None:
    size = 20_000_000
    src = _write_random(tmp_path / "big.bin", size)
    key = "models/big.sealed"
    cdn.upload_file(src, key)

    # S3 marks the ETag of a multipart object with "-<number of parts>".
    etag = _raw_s3(s3_server).head_object(Bucket=cdn.bucket, Key=key)["ETag"]
    assert etag.strip('"').endswith("-4"), etag

    s3_server.reset_counts()
    dest = tmp_path / "big.out"
    assert cdn.download_file(key, dest, expected_size=size) == size
    assert _sha256(dest) == _sha256(src)

    gets = [r for r in s3_server.requests() if r.method == "GET" and r.path == f"/{cdn.bucket}/{key}"]
    expected_ranges = {range_header(first, last) for first, last in split_ranges(size, 5 * MiB)}
    assert len(expected_ranges) == 4
    assert {r.range for r in gets} == expected_ranges
    assert len(gets) == 4
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".part")] == []


def test_simple_download_matches_ranged_download(s3_server: S3Server, cdn: CdnClient, tmp_path: Path) -> None:
    src = _write_random(tmp_path / "obj.bin", 6 * MiB + 123)
    cdn.upload_file(src, "obj.bin")
    direct = CdnClient(s3_server.config(cdn.bucket, direct=True), retry_policy=FAST_RETRY)
    s3_server.reset_counts()
    assert direct.download_file("obj.bin", tmp_path / "direct.out") == src.stat().st_size
    assert s3_server.requests() == []  # the direct endpoint bypasses the counting proxy

    assert cdn.download_file_simple("obj.bin", tmp_path / "simple.out") == src.stat().st_size
    cdn.download_file("obj.bin", tmp_path / "ranged.out")

    assert _sha256(tmp_path / "simple.out") == _sha256(tmp_path / "ranged.out") == _sha256(src)
    assert _sha256(tmp_path / "direct.out") == _sha256(src)


def test_download_counter_counts_one_per_download(
    s3_server: S3Server, cdn: CdnClient, tmp_path: Path
) -> None:
    src = _write_random(tmp_path / "counted.bin", 12 * MiB)
    cdn.upload_file(src, "counted.bin")
    cdn.upload_file(_write_random(tmp_path / "other.bin", 10), "other.bin")
    s3_server.reset_counts()

    assert cdn.exists("counted.bin")
    assert cdn.object_size("counted.bin") == 12 * MiB
    assert s3_server.download_count(cdn.bucket, "counted.bin") == 0  # HEADs are not downloads

    cdn.download_file("counted.bin", tmp_path / "a")  # 3 ranges, one download
    assert s3_server.download_count(cdn.bucket, "counted.bin") == 1
    cdn.download_file("counted.bin", tmp_path / "b")
    cdn.download_file_simple("counted.bin", tmp_path / "c")
    cdn.download_file("other.bin", tmp_path / "d")

    assert s3_server.download_count(cdn.bucket, "counted.bin") == 3
    assert s3_server.download_count(cdn.bucket, "other.bin") == 1
    assert s3_server.request_count("GET", f"/{cdn.bucket}/counted.bin") == 3 + 3 + 1
    assert s3_server.request_count("HEAD", f"/{cdn.bucket}/counted.bin") == 2 + 2  # + one per ranged


def test_expected_size_mismatch_leaves_no_file(cdn: CdnClient, tmp_path: Path) -> None:
    cdn.upload_file(_write_random(tmp_path / "x.bin", 5000), "x.bin")
    out = tmp_path / "out"
    out.mkdir()

    with pytest.raises(IntegrityError, match="5000 bytes, expected 4999"):
        cdn.download_file("x.bin", out / "x.bin", expected_size=4999)

    assert list(out.iterdir()) == []


def test_missing_object_and_bucket_are_not_found(s3_server: S3Server, cdn: CdnClient, tmp_path: Path) -> None:
    dest = tmp_path / "missing.bin"
    with pytest.raises(NotFoundError, match=f"s3://{cdn.bucket}/no/such/key"):
        cdn.download_file("no/such/key", dest)
    with pytest.raises(NotFoundError):
        cdn.download_file_simple("no/such/key", dest)
    with pytest.raises(NotFoundError):
        cdn.object_size("no/such/key")
    assert not cdn.exists("no/such/key")
    assert list(tmp_path.iterdir()) == []

    no_bucket = CdnClient(s3_server.config(_bucket()), retry_policy=FAST_RETRY)
    with pytest.raises(NotFoundError):
        no_bucket.download_file_simple("k", dest)


def test_delete(cdn: CdnClient, tmp_path: Path) -> None:
    cdn.upload_file(_write_random(tmp_path / "d.bin", 10), "d.bin")
    cdn.delete("d.bin")
    assert not cdn.exists("d.bin")
    cdn.delete("d.bin")  # deleting twice is not an error


def test_stopped_server_gives_upstream_error_after_bounded_retries(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = start_s3_server()
    try:
        config = server.config(_bucket())
        setup = CdnClient(config)
        setup.ensure_bucket()
        setup.upload_file(_write_random(tmp_path / "o.bin", 100), "o.bin")
    finally:
        server.stop()
    server.stop()  # idempotent
    with pytest.raises(ProcessLookupError):
        os.kill(server.pid, 0)  # stopped by its PID and reaped
    client = CdnClient(config, connect_timeout=1.0, read_timeout=2.0, max_attempts=1, retry_policy=FAST_RETRY)
    caplog.set_level(logging.WARNING, logger="lib")

    started = time.monotonic()
    with pytest.raises(UpstreamError) as info:
        client.download_file("o.bin", tmp_path / "o.out")
    elapsed = time.monotonic() - started

    assert f"s3://{config.bucket}/o.bin" in info.value.message
    assert "EndpointConnectionError" in info.value.message
    assert elapsed < 10
    retries = [r for r in caplog.records if "retrying" in r.getMessage()]
    assert len(retries) == FAST_RETRY.attempts - 1
    assert not (tmp_path / "o.out").exists()
    with pytest.raises(UpstreamError):
        client.upload_file(tmp_path / "o.bin", "again.bin")


def test_credentials_never_reach_logs_or_errors(
    s3_server: S3Server, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "sEcReT-" + uuid.uuid4().hex
    config = CdnConfig(
        endpoint_url=s3_server.endpoint_url, bucket=_bucket(),
        access_key_id="AKIDTEST" + uuid.uuid4().hex[:8].upper(), secret_access_key=SecretStr(secret),
    )
    caplog.set_level(logging.DEBUG)
    client = CdnClient(config, part_size=1024, retry_policy=FAST_RETRY)
    client.ensure_bucket()
    client.upload_file(_write_random(tmp_path / "c.bin", 5000), "c.bin")
    client.download_file("c.bin", tmp_path / "c.out")
    with pytest.raises(NotFoundError) as missing_download:
        client.download_file("missing", tmp_path / "m")
    with pytest.raises(NotFoundError) as missing_size:
        client.object_size("missing")
    errors = [missing_download.value.message, missing_size.value.message]

    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert caplog.records, "DEBUG capture saw nothing: the assertion below would be vacuous"
    assert secret not in logged
    assert secret not in repr(client) and secret not in repr(config)
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("lib"))
    assert "downloaded s3://" in ours  # our own DEBUG line was captured and checked
    assert config.access_key_id not in ours
    assert all(secret not in e and config.access_key_id not in e for e in errors)
