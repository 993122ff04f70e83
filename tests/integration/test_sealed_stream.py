"""Streamed sealed fetches against the real stores: moto's S3 server and the resource API as processes.

The S3 server's proxy breaks responses on request (``S3Server.cut_responses``) and can go down,
so a dropped connection, a resume and a store dying mid-stream are real TCP events seen by the
real ``CdnClient`` (botocore, urllib3). The node side is the production ``SealedFetcher``.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest

from devservers.resource_api import ResourceApiServer, start_resource_api_server
from devservers.s3 import RecordedRequest, S3Server, start_s3_server
from lib.errors import IntegrityError, UpstreamError
from lib.retry import RetryPolicy
from lib.sealed.cdn import CdnClient
from lib.sealed.fetch import FetchOutcome, SealedFetcher, SealedRef, TransferPlan
from lib.sealed.fingerprint import node_fingerprint
from lib.sealed.format import DEFAULT_SEGMENT_SIZE, TAG_SIZE
from lib.sealed.layout import SealedLayout
from lib.sealed.publish import PublishResult, publish_model
from lib.sealed.resource_client import ResourceClient
from lib.sealed.signing import SigningKey
from lib.sealed.wire import CdnConfig

BUCKET = "sealed-stream"
FOLDER = "models"
NAME = "streamed.bin"
PUBLISHER = ("publisher@stream.test", "publisher-password-for-stream-tests-0123")
READER = ("reader@stream.test", "reader-password-for-stream-tests-4567")
SEGMENT = DEFAULT_SEGMENT_SIZE
SIZE = 6 * SEGMENT + 12_345  # 7 segments of 1 MiB
RETRY = RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.05)
CDN_ATTEMPTS = 2  # botocore's own attempts per request, under ours
NODE_KEY = SigningKey.generate()


@dataclass
class Stores:
    s3: S3Server
    api: ResourceApiServer
    published: PublishResult
    plaintext: bytes

    def publisher(self) -> ResourceClient:
        return ResourceClient(self.api.url, *PUBLISHER, retry=RETRY)

    def big_gets(self) -> list[RecordedRequest]:
        return [r for r in self.s3.requests()
                if r.method == "GET" and r.path == f"/{BUCKET}/{self.published.big_key}"]


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stores]:
    work = tmp_path_factory.mktemp("sealed-stream")
    s3 = start_s3_server()
    api = None
    try:
        api = start_resource_api_server(work / "resource-api")
        api.create_user(*PUBLISHER, role="publisher")
        api.create_user(*READER, role="reader")
        api.set_cdn(s3.config(BUCKET))  # through the proxy: counted, and breakable
        api.approve_node(READER, NODE_KEY, node_fingerprint())
        plaintext = os.urandom(SIZE)
        source = work / NAME
        source.write_bytes(plaintext)
        published = publish_model(
            source, name=NAME, folder=FOLDER, kind="image-classification", small_size_kb=64,
            resources=ResourceClient(api.url, *PUBLISHER, retry=RETRY), cdn=CdnClient(s3.config(BUCKET)),
        )
        yield Stores(s3, api, published, plaintext)
    finally:
        if api is not None:
            api.stop()
        s3.stop()


@pytest.fixture
def node(stores: Stores) -> Iterator[ResourceClient]:
    stores.s3.clear_faults()
    stores.s3.reset_counts()
    client = ResourceClient(stores.api.url, *READER, retry=RETRY, node_key=NODE_KEY)
    yield client
    client.close()
    stores.s3.clear_faults()


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[Path]:
    # tmpfs, as on a node; private to this test.
    path = Path("/dev/shm") / f"sealserve-stream-test-{os.getpid()}-{tmp_path.name}"
    path.mkdir(mode=0o700)
    yield path
    for leftover in path.iterdir():
        leftover.unlink()
    path.rmdir()


def fetch(node: ResourceClient, cache: Path, plan: TransferPlan | None = None) -> FetchOutcome:
    def cdn_factory(config: CdnConfig) -> CdnClient:
        return CdnClient(config, connect_timeout=1.0, read_timeout=5.0, max_attempts=CDN_ATTEMPTS,
                         retry_policy=RETRY)

    fetcher = SealedFetcher(node, fingerprint=node_fingerprint(), cdn_factory=cdn_factory,
                            plan=plan or TransferPlan(retry=RETRY))
    hint = {m.name: m for m in node.list(FOLDER)}[NAME]
    return fetcher.fetch(SealedRef(FOLDER, NAME, hint.id), cache, hint=hint)


def layout_of(published: PublishResult) -> SealedLayout:
    return SealedLayout.of(SEGMENT, published.sealed_size)


def big_offset_of_segment(published: PublishResult, index: int) -> int:
    return layout_of(published).span(index)[0] - published.small_size


def test_one_streamed_get_sent_before_the_key_arrived(
    stores: Stores, node: ResourceClient, cache: Path
) -> None:
    releases = stores.publisher().fetch_count(folder=FOLDER, name=NAME, kind="dek")

    outcome = fetch(node, cache)

    assert hashlib.sha256(outcome.path.read_bytes()).hexdigest() == stores.published.id
    assert outcome.path.read_bytes() == stores.plaintext
    assert outcome.details["early_get"] is True and outcome.details["resumes"] == 0
    (get,) = stores.big_gets()
    assert get.range is None and get.status == 200 and not get.cut
    assert get.sent == stores.published.sealed_size - stores.published.small_size
    assert stores.s3.download_count(BUCKET, stores.published.big_key) == 1
    assert stores.publisher().fetch_count(folder=FOLDER, name=NAME, kind="dek") == releases + 1
    assert [p.name for p in cache.iterdir()] == [outcome.path.name]


def test_a_dropped_connection_resumes_from_the_first_unverified_segment(
    stores: Stores, node: ResourceClient, cache: Path
) -> None:
    published = stores.published
    big_size = published.sealed_size - published.small_size
    cut = big_offset_of_segment(published, 3) + 200_000  # segments 0-2 whole, 3 in part
    stores.s3.cut_responses(BUCKET, published.big_key, after_bytes=cut)

    outcome = fetch(node, cache)

    assert outcome.path.read_bytes() == stores.plaintext
    first, second = stores.big_gets()
    assert first.cut and first.sent == cut and first.range is None
    resume_at = big_offset_of_segment(published, 3)
    assert second.range == f"bytes={resume_at}-{big_size - 1}" and not second.cut
    assert second.if_match and second.if_match.strip('"')  # the rest only from the same object
    # Not started over: what travelled is the big part plus the part of segment 3 thrown away.
    assert first.sent + second.sent == big_size + (cut - resume_at)
    assert outcome.details["resumes"] == 1 and outcome.details["requests"] == 2
    assert stores.s3.download_count(BUCKET, published.big_key) == 1


def test_ranged_gets_resume_inside_their_range(stores: Stores, node: ResourceClient, cache: Path) -> None:
    published = stores.published
    stride = SEGMENT + TAG_SIZE
    plan = TransferPlan(single_get_max_bytes=0, range_bytes=2 * stride, workers=2, retry=RETRY)
    stores.s3.cut_responses(BUCKET, published.big_key, after_bytes=stride + 1000)

    outcome = fetch(node, cache, plan)

    assert outcome.path.read_bytes() == stores.plaintext
    gets = stores.big_gets()
    (broken,) = [g for g in gets if g.cut]
    assert broken.range is not None
    start = int(broken.range.removeprefix("bytes=").split("-")[0])
    boundaries = {big_offset_of_segment(published, i) for i in range(1, layout_of(published).count)}
    resumed = [g for g in gets if g.range and start < int(g.range.removeprefix("bytes=").split("-")[0])
               <= start + broken.sent]
    assert len(resumed) == 1
    assert int(resumed[0].range.removeprefix("bytes=").split("-")[0]) in boundaries  # type: ignore[union-attr]
    assert outcome.details["resumes"] == 1


def test_s3_going_down_mid_stream_fails_cleanly_and_leaves_nothing(
    stores: Stores, node: ResourceClient, cache: Path
) -> None:
    published = stores.published
    stores.s3.cut_responses(BUCKET, published.big_key, after_bytes=big_offset_of_segment(published, 2) + 10,
                            then_down=True)

    with pytest.raises(UpstreamError) as info:
        fetch(node, cache)

    assert "S3 GET of s3://" in info.value.message and "gave up after 3 attempts" in info.value.message
    assert list(cache.iterdir()) == []
    dropped = [g for g in stores.big_gets() if g.status == 0]
    assert 1 <= len(dropped) <= RETRY.attempts * CDN_ATTEMPTS  # bounded

    # The store is back: the next fetch works (a failure is not cached).
    stores.s3.set_down(False)
    outcome = fetch(node, cache)
    assert outcome.path.read_bytes() == stores.plaintext


def test_a_tampered_last_segment_on_s3_never_appears(
    stores: Stores, node: ResourceClient, cache: Path
) -> None:
    published = stores.published
    raw = boto3.session.Session().client(
        "s3", endpoint_url=stores.s3.direct_endpoint_url, region_name="us-east-1",
        aws_access_key_id="testing", aws_secret_access_key="testing",
    )
    original = raw.get_object(Bucket=BUCKET, Key=published.big_key)["Body"].read()
    tampered = bytearray(original)
    tampered[-1] ^= 0x01  # the final tag
    raw.put_object(Bucket=BUCKET, Key=published.big_key, Body=bytes(tampered))
    seen: set[str] = set()
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.update(p.name for p in cache.iterdir())

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        with pytest.raises(IntegrityError, match=f"segment {layout_of(published).count - 1}"):
            fetch(node, cache)
    finally:
        stop.set()
        watcher.join()
        raw.put_object(Bucket=BUCKET, Key=published.big_key, Body=original)

    assert seen and all(name.startswith(".") and name.endswith(".part") for name in seen)
    assert list(cache.iterdir()) == []
