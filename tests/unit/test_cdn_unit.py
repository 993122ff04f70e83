"""CdnClient logic without a server: range arithmetic, retry classification, failure cleanup.

The S3 boundary is cut with a small fake that serves bytes through botocore's real
``StreamingBody`` and can be told to fail particular calls.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from boto3.exceptions import S3UploadFailedError
from botocore.exceptions import (
    ClientError,
    EndpointConnectionError,
    IncompleteReadError,
    ReadTimeoutError,
    ResponseStreamingError,
)
from botocore.response import StreamingBody
from pydantic import SecretStr
from urllib3.exceptions import ProtocolError

from lib.errors import NotFoundError, UpstreamError
from lib.retry import RetryPolicy
from lib.sealed.cdn import CdnClient, S3ObjectStream, is_retryable
from lib.sealed.transfer import MiB, TransferError, range_header, split_ranges
from lib.sealed.wire import CdnConfig

SECRET = "unit-secret-value"


def client_error(status: int, code: str, op: str = "GetObject") -> ClientError:
    response: Any = {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}
    return ClientError(response, op)


# -- range arithmetic --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "part", "expected"),
    [
        (0, 5, []),
        (1, 5, [(0, 0)]),
        (5, 5, [(0, 4)]),
        (6, 5, [(0, 4), (5, 5)]),
        (10, 5, [(0, 4), (5, 9)]),
        (11, 5, [(0, 4), (5, 9), (10, 10)]),
        (3, 1, [(0, 0), (1, 1), (2, 2)]),
    ],
)
def test_split_ranges_exact(size: int, part: int, expected: list[tuple[int, int]]) -> None:
    assert split_ranges(size, part) == expected


@pytest.mark.parametrize("part", [1, 2, 3, 7, 64, 1000])
def test_split_ranges_cover_every_byte_once(part: int) -> None:
    for size in range(0, 200):
        ranges = split_ranges(size, part)
        covered = [b for first, last in ranges for b in range(first, last + 1)]
        assert covered == list(range(size))
        assert all(last - first + 1 <= part for first, last in ranges)
        assert len(ranges) == -(-size // part)


@pytest.mark.parametrize(("size", "part"), [(-1, 5), (10, 0), (10, -3)])
def test_split_ranges_rejects_nonsense(size: int, part: int) -> None:
    with pytest.raises(ValueError, match="must be"):
        split_ranges(size, part)


def test_range_header() -> None:
    assert range_header(0, 0) == "bytes=0-0"
    assert range_header(5, 9) == "bytes=5-9"
    with pytest.raises(ValueError, match="invalid byte range"):
        range_header(9, 5)


# -- retry classification ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "retryable"),
    [
        (client_error(500, "InternalError"), True),
        (client_error(503, "SlowDown"), True),
        (client_error(429, "TooManyRequests"), True),
        (client_error(400, "RequestTimeout"), True),
        (client_error(404, "NoSuchKey"), False),
        (client_error(403, "AccessDenied"), False),
        (client_error(412, "PreconditionFailed"), False),
        (EndpointConnectionError(endpoint_url="http://x"), True),
        (ReadTimeoutError(endpoint_url="http://x"), True),
        (TransferError("short"), True),
        (TransferError("ignored range", retryable=False), False),
        (ValueError("bug"), False),
    ],
)
def test_is_retryable(exc: BaseException, retryable: bool) -> None:
    assert is_retryable(exc) is retryable


def test_is_retryable_sees_through_boto3_wrapping() -> None:
    def wrapped(cause: ClientError) -> S3UploadFailedError:
        try:
            raise cause
        except ClientError:
            try:
                raise S3UploadFailedError("Failed to upload")
            except S3UploadFailedError as exc:
                return exc

    assert is_retryable(wrapped(client_error(503, "SlowDown", "UploadPart")))
    assert not is_retryable(wrapped(client_error(403, "AccessDenied", "UploadPart")))


# -- a fake S3 ---------------------------------------------------------------------------


class FakeS3:
    """Serves ``objects``; ``fail(call_number, params)`` may raise or return a replacement response."""

    def __init__(self, objects: dict[str, bytes], region: str = "us-east-1") -> None:
        self.objects = objects
        self.meta = SimpleNamespace(region_name=region)
        self.get_calls: list[dict[str, Any]] = []
        self.created: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.fail: Callable[[int, dict[str, Any]], dict[str, Any] | None] = lambda n, p: None

    def head_object(self, Bucket: str, Key: str) -> dict[str, Any]:
        if Key not in self.objects:
            raise client_error(404, "404", "HeadObject")
        return {"ContentLength": len(self.objects[Key]), "ETag": '"etag-1"'}

    def get_object(self, Bucket: str, Key: str, Range: str | None = None, IfMatch: str | None = None) -> Any:
        params = {"Key": Key, "Range": Range, "IfMatch": IfMatch}
        with self.lock:
            self.get_calls.append(params)
            number = len(self.get_calls)
        replacement = self.fail(number, params)
        if replacement is not None:
            return replacement
        data = self.objects[Key]
        if Range is not None:
            first, last = (int(x) for x in Range.removeprefix("bytes=").split("-"))
            data = data[first : last + 1]
        return {"Body": StreamingBody(io.BytesIO(data), len(data)), "ContentLength": len(data)}

    def head_bucket(self, Bucket: str) -> None:
        if not self.created:
            raise client_error(404, "404", "HeadBucket")

    def create_bucket(self, **params: Any) -> None:
        self.created.append(params)

    def close(self) -> None:
        pass


def make_client(fake: FakeS3, **kwargs: Any) -> tuple[CdnClient, list[float]]:
    sleeps: list[float] = []
    config = CdnConfig(
        endpoint_url=None, bucket="bkt", access_key_id="AKIDUNIT", secret_access_key=SecretStr(SECRET)
    )
    # Strict part_size ranges: these tests are about the mechanics of many small ranges.
    options: dict[str, Any] = {
        "part_size": 7, "max_workers": 3, "spread_ranges": False, "retry_policy": RetryPolicy(attempts=3)
    }
    options.update(kwargs)
    return CdnClient(config, client=fake, sleep=sleeps.append, **options), sleeps  # type: ignore[arg-type]


DATA = bytes(range(256)) * 4  # 1024 bytes: 147 ranges of 7


def test_ranged_download_reassembles_every_range(tmp_path: Path) -> None:
    fake = FakeS3({"k": DATA})
    client, _ = make_client(fake)

    assert client.download_file("k", tmp_path / "out") == len(DATA)

    assert (tmp_path / "out").read_bytes() == DATA
    expected = sorted(range_header(first, last) for first, last in split_ranges(1024, 7))
    assert sorted(c["Range"] for c in fake.get_calls) == expected
    assert {c["IfMatch"] for c in fake.get_calls} == {'"etag-1"'}  # a replaced object cannot be mixed in


def test_transient_error_on_one_range_is_retried(tmp_path: Path) -> None:
    fake = FakeS3({"k": DATA})
    failed: list[str] = []

    def fail_once(number: int, params: dict[str, Any]) -> None:
        if params["Range"] == "bytes=14-20" and not failed:
            failed.append(params["Range"])
            raise client_error(503, "SlowDown")

    fake.fail = fail_once
    client, sleeps = make_client(fake)

    client.download_file("k", tmp_path / "out")

    assert (tmp_path / "out").read_bytes() == DATA
    assert failed and len(sleeps) == 1
    assert [c["Range"] for c in fake.get_calls].count("bytes=14-20") == 2


def test_persistent_failure_removes_partial_file_and_names_the_object(tmp_path: Path) -> None:
    fake = FakeS3({"models/k": DATA})

    def always_fail_range_3(number: int, params: dict[str, Any]) -> None:
        if params["Range"] == "bytes=21-27":
            raise EndpointConnectionError(endpoint_url="http://cdn")

    fake.fail = always_fail_range_3
    client, sleeps = make_client(fake)

    with pytest.raises(UpstreamError) as info:
        client.download_file("models/k", tmp_path / "out")

    assert "s3://bkt/models/k" in info.value.message and "EndpointConnectionError" in info.value.message
    assert list(tmp_path.iterdir()) == []  # neither dest nor the temp file
    assert [c["Range"] for c in fake.get_calls].count("bytes=21-27") == 3  # bounded: the policy's attempts
    assert len(fake.get_calls) < len(split_ranges(len(DATA), 7)) + 3  # the other ranges stopped early
    assert len(sleeps) == 2


def test_precondition_failed_is_not_retried(tmp_path: Path) -> None:
    fake = FakeS3({"k": DATA})
    fake.fail = lambda n, p: (_ for _ in ()).throw(client_error(412, "PreconditionFailed"))
    client, sleeps = make_client(fake, part_size=2048)

    with pytest.raises(UpstreamError, match="PreconditionFailed"):
        client.download_file("k", tmp_path / "out")
    assert len(fake.get_calls) == 1 and sleeps == []
    assert list(tmp_path.iterdir()) == []


def test_server_ignoring_range_cannot_overwrite_other_ranges(tmp_path: Path) -> None:
    fake = FakeS3({"k": DATA})
    fake.fail = lambda n, p: {"Body": StreamingBody(io.BytesIO(DATA), len(DATA)), "ContentLength": len(DATA)}
    client, _ = make_client(fake, part_size=100)

    with pytest.raises(UpstreamError, match="TransferError"):
        client.download_file("k", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_short_body_is_retried_then_reported(tmp_path: Path) -> None:
    fake = FakeS3({"k": DATA})
    # The server announces the full length but the connection delivers less.
    fake.fail = lambda n, p: {"Body": StreamingBody(io.BytesIO(DATA[:500]), 1024), "ContentLength": 1024}
    client, sleeps = make_client(fake, part_size=1024)

    with pytest.raises(UpstreamError, match="IncompleteReadError"):
        client.download_file("k", tmp_path / "out")
    assert len(fake.get_calls) == 3 and len(sleeps) == 2
    assert list(tmp_path.iterdir()) == []


def test_missing_object_is_not_found_without_retries(tmp_path: Path) -> None:
    client, sleeps = make_client(FakeS3({}))
    with pytest.raises(NotFoundError, match="s3://bkt/nope"):
        client.download_file("nope", tmp_path / "out")
    assert not client.exists("nope")
    assert sleeps == []


def test_empty_object_downloads_without_get(tmp_path: Path) -> None:
    fake = FakeS3({"empty": b""})
    client, _ = make_client(fake)
    assert client.download_file("empty", tmp_path / "out", expected_size=0) == 0
    assert (tmp_path / "out").read_bytes() == b""
    assert fake.get_calls == []


def test_simple_download_restarts_cleanly_after_a_broken_stream(tmp_path: Path) -> None:
    fake = FakeS3({"k": DATA})
    broken = {"Body": StreamingBody(io.BytesIO(b"\xff" * 600), 1024), "ContentLength": 1024}
    fake.fail = lambda n, p: broken if n == 1 else None
    client, sleeps = make_client(fake)

    assert client.download_file_simple("k", tmp_path / "out") == 1024
    assert (tmp_path / "out").read_bytes() == DATA
    assert len(fake.get_calls) == 2 and len(sleeps) == 1
    assert fake.get_calls[0]["Range"] is None


def test_ensure_bucket_creates_with_region_constraint_outside_us_east_1() -> None:
    fake = FakeS3({}, region="eu-west-1")
    client, _ = make_client(fake)
    client.ensure_bucket()
    client.ensure_bucket()
    expected = {"Bucket": "bkt", "CreateBucketConfiguration": {"LocationConstraint": "eu-west-1"}}
    assert fake.created == [expected]


def test_repr_and_constructor_validation_hide_the_secret() -> None:
    client, _ = make_client(FakeS3({}))
    assert SECRET not in repr(client) and "bkt" in repr(client)
    with pytest.raises(ValueError, match=">= 1"):
        make_client(FakeS3({}), max_workers=0)


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        (0, 8 * MiB),  # never below part_size
        (20 * MiB, 8 * MiB),  # 5 MiB each would be below part_size
        (500 * MiB, 125 * MiB),  # one range per worker
        (4096 * MiB, 256 * MiB),  # capped, so a failed range is a bounded retry
    ],
)
def test_ranges_spread_over_the_workers_between_part_size_and_the_cap(size: int, expected: int) -> None:
    client, _ = make_client(FakeS3({}), part_size=8 * MiB, max_workers=4, spread_ranges=True)
    assert client.range_size(size) == expected
    strict, _ = make_client(FakeS3({}), part_size=8 * MiB, max_workers=4, spread_ranges=False)
    assert strict.range_size(size) == 8 * MiB


# -- open_range and S3ObjectStream: what the streamed fetch sees -------------------------------


class BrokenBody:
    """A body whose read fails as a dropped connection does in botocore/urllib3."""

    def __init__(self, error: BaseException) -> None:
        self.error = error
        self.closed = False

    def readinto(self, buffer: memoryview) -> int:
        raise self.error

    def close(self) -> None:
        self.closed = True


def test_open_range_sends_range_and_if_match_and_answers_a_stream() -> None:
    fake = FakeS3({"k": DATA})
    client, _ = make_client(fake)

    stream = client.open_range("k", 10, 19, if_match='"etag-1"')
    buffer = memoryview(bytearray(10))

    assert stream.readinto(buffer) == 10 and bytes(buffer) == DATA[10:20]
    assert fake.get_calls == [{"Key": "k", "Range": "bytes=10-19", "IfMatch": '"etag-1"'}]
    assert stream.length == 10
    stream.close()


def test_open_range_of_the_whole_object_is_a_plain_get() -> None:
    fake = FakeS3({"k": DATA})
    client, _ = make_client(fake)
    stream = client.open_range("k", 0, len(DATA) - 1, whole_object=True)
    assert fake.get_calls[0]["Range"] is None
    assert stream.length == stream.object_size == len(DATA)


def test_the_object_size_comes_from_content_range() -> None:
    fake = FakeS3({"k": DATA})
    fake.fail = lambda n, p: {"Body": StreamingBody(io.BytesIO(DATA[:5]), 5), "ContentLength": 5,
                              "ContentRange": f"bytes 0-4/{len(DATA)}", "ETag": '"e"'}
    client, _ = make_client(fake)
    stream = client.open_range("k", 0, 4)
    assert (stream.length, stream.object_size, stream.etag) == (5, len(DATA), '"e"')


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (client_error(503, "SlowDown"), TransferError),
        (EndpointConnectionError(endpoint_url="http://cdn"), TransferError),
        (client_error(404, "NoSuchKey"), NotFoundError),
        (client_error(412, "PreconditionFailed"), UpstreamError),
        (client_error(403, "AccessDenied"), UpstreamError),
    ],
)
def test_open_range_is_one_attempt_and_says_what_may_be_retried(
    error: BaseException, expected: type[BaseException]
) -> None:
    fake = FakeS3({"k": DATA})
    fake.fail = lambda n, p: (_ for _ in ()).throw(error)
    client, sleeps = make_client(fake)

    with pytest.raises(expected) as info:
        client.open_range("k", 0, 9)

    assert len(fake.get_calls) == 1 and sleeps == []  # the streamer retries, resuming
    assert "s3://bkt/k" in str(info.value) and SECRET not in str(info.value)
    if isinstance(info.value, TransferError):
        assert info.value.retryable


@pytest.mark.parametrize(
    "error",
    [
        ResponseStreamingError(error=ProtocolError("Connection broken: IncompleteRead")),
        ReadTimeoutError(endpoint_url="http://cdn"),
        ConnectionResetError(104, "Connection reset by peer"),
        IncompleteReadError(actual_bytes=5, expected_bytes=10),
    ],
)
def test_a_body_breaking_off_is_a_retryable_transfer_error(error: BaseException) -> None:
    body = BrokenBody(error)
    stream = S3ObjectStream({"Body": body, "ContentLength": 10}, "s3://bkt/k")
    message = f"s3://bkt/k: the body broke off: {type(error).__name__}"
    with pytest.raises(TransferError, match=message) as info:
        stream.readinto(memoryview(bytearray(10)))
    assert info.value.retryable
    stream.close()
    assert body.closed


def test_a_real_http_body_is_read_straight_into_the_buffer() -> None:
    """The fast path reads through http.client; its answer must be the bytes, and a short body 0."""
    import http.client
    import socket

    server, client_sock = socket.socketpair()
    body = b"x" * 100
    server.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 150\r\n\r\n" + body)
    server.close()  # 50 bytes short
    response = http.client.HTTPResponse(client_sock)
    response.begin()
    raw = SimpleNamespace(_fp=response, headers={})
    streaming = SimpleNamespace(_raw_stream=raw, readinto=lambda b: pytest.fail("urllib3 path taken"),
                                close=response.close)
    stream = S3ObjectStream({"Body": streaming, "ContentLength": 150}, "s3://bkt/k")
    buffer = memoryview(bytearray(150))
    got = 0
    while n := stream.readinto(buffer[got:]):
        got += n
    assert got == 100 and bytes(buffer[:got]) == body  # the streamer turns 0-before-the-end into a resume
    stream.close()
    client_sock.close()
