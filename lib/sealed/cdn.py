"""Client for the S3-compatible store ("CDN") that holds the big parts of sealed models.

One client speaks to AWS S3, MinIO, R2 or a local test server: only ``CdnConfig.endpoint_url``
differs. A node reads big parts through ``open_range``: one GET (whole object or a byte range)
answered as a stream that :mod:`lib.sealed.stream` verifies as it reads and resumes when it
breaks. ``download_file`` (parallel ranged GETs written at their offsets into a preallocated temp
file, then renamed; the mechanics are :mod:`lib.sealed.transfer`) and ``download_file_simple``
download to a file, for publishing checks and benchmarks. What to retry is decided in
:mod:`lib.sealed.s3_errors`.

Errors: a missing object or bucket is :class:`~lib.errors.NotFoundError`; any other remote
failure, once the retries are spent, is :class:`~lib.errors.UpstreamError` naming the bucket, the
key and the class of the cause. Local filesystem errors (disk full, permissions) propagate as the
``OSError`` they are: they are not the store's fault and retrying the network would not fix them.
"""

from __future__ import annotations

import http.client
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import boto3
import urllib3.exceptions
from boto3.s3.transfer import TransferConfig
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError

from lib.errors import IntegrityError, NotFoundError, SealserveError
from lib.retry import RetryPolicy, call_with_retries
from lib.sealed.s3_errors import client_error_details, is_local, is_retryable, translate
from lib.sealed.transfer import (
    AbortedError,
    MiB,
    TransferError,
    fetch_ranges,
    range_header,
    split_ranges,
    stream_to_file,
    write_atomically,
)
from lib.sealed.wire import CdnConfig

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

T = TypeVar("T")

log = logging.getLogger(__name__)

DEFAULT_PART_SIZE = 8 * MiB
# S3 rejects multipart parts under 5 MiB (but the last), whatever size the ranged downloads use.
MIN_UPLOAD_PART_SIZE = 5 * MiB
MAX_RANGE_SIZE = 256 * MiB
# What reading a response body raises when the connection breaks: botocore wraps most of
# urllib3's errors, not all, and a reset socket is an OSError.
_BODY_ERRORS = (BotoCoreError, urllib3.exceptions.HTTPError, http.client.HTTPException, OSError)


class S3ObjectStream:
    """An answered GET (:class:`~lib.sealed.stream.ObjectStream`): a failure while reading the body
    is a retryable :class:`TransferError` naming the object and the cause's class."""

    def __init__(self, response: Any, where: str) -> None:
        self._body = response["Body"]
        self._readinto = self._body.readinto
        # urllib3 reads every chunk into a fresh bytes object and copies it out; http.client's
        # own readinto fills our buffer straight from the socket. Measured on 500 MiB from the
        # test server: 0.13 s of CPU through urllib3, 0.085 s direct. Taken only where the
        # body is exactly what S3 sends for a GET: a length, no content encoding.
        raw = getattr(self._body, "_raw_stream", None)
        direct = getattr(raw, "_fp", None)
        if (isinstance(direct, http.client.HTTPResponse) and direct.length is not None
                and not getattr(raw, "headers", {}).get("Content-Encoding")):
            self._readinto = direct.readinto
        self.length = int(response.get("ContentLength", -1))
        self.etag: str | None = response.get("ETag")
        self._where = where
        # "bytes 0-99/1000" on a 206; a plain GET's body is the whole object.
        content_range = str(response.get("ContentRange") or "")
        total = content_range.rpartition("/")[2]
        self.object_size: int | None = (
            int(total) if total.isdigit() else None if content_range else self.length
        )

    def readinto(self, buffer: memoryview, /) -> int:
        try:
            return int(self._readinto(buffer))
        except _BODY_ERRORS as exc:
            raise TransferError(f"{self._where}: the body broke off: {type(exc).__name__}") from exc

    def close(self) -> None:
        self._body.close()


class CdnClient:
    """Upload, inspect, download and delete objects in the bucket named by a :class:`CdnConfig`.

    Thread-safe: the boto3 client is created once and shared by the download threads. Public API:
    nodes use ``open_range`` (through :mod:`lib.sealed.stream`); publishing ``ensure_bucket``,
    ``upload_file`` and ``object_size``; ``download_file`` and ``download_file_simple`` (the
    baselines of bench/sealed_fetch.py) download to a file; ``exists`` and ``delete`` are for an
    operator's housekeeping (a failed publish may leave an orphan big part).
    """

    def __init__(
        self,
        config: CdnConfig,
        *,
        connect_timeout: float = 3.0,
        read_timeout: float = 30.0,
        max_attempts: int = 4,
        part_size: int = DEFAULT_PART_SIZE,
        max_workers: int = 4,
        spread_ranges: bool = True,
        client: S3Client | None = None,
        retry_policy: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if part_size < 1 or max_workers < 1 or max_attempts < 1:
            raise ValueError("part_size, max_workers and max_attempts must all be >= 1")
        self.bucket = config.bucket
        self.endpoint_url = config.endpoint_url
        self.part_size = part_size
        self.max_workers = max_workers
        self.spread_ranges = spread_ranges
        self._retry = retry_policy or RetryPolicy()
        self._sleep = sleep
        self._client: S3Client = client or self._make_client(
            config, connect_timeout=connect_timeout, read_timeout=read_timeout, max_attempts=max_attempts
        )

    def _make_client(self, config: CdnConfig, *, connect_timeout: float, read_timeout: float,
                     max_attempts: int) -> S3Client:
        boto_config = BotoConfig(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            # botocore's "max_attempts" key counts retries only; "total_max_attempts" counts the
            # first call too, which is what our max_attempts means.
            retries={"total_max_attempts": max_attempts, "mode": "standard"},
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            # Every download thread (and every upload thread) needs its own pooled connection.
            max_pool_connections=max(10, self.max_workers),
            # botocore >= 1.36 adds CRC trailers to every upload and checks them on downloads;
            # several S3 look-alikes reject the trailers, and a ranged GET cannot be checked
            # against a whole-object checksum. The sealed format authenticates every byte anyway.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        # A private session: boto3's default session is shared global state and not thread-safe.
        session = boto3.session.Session()
        return session.client(
            "s3",
            endpoint_url=config.endpoint_url,
            region_name=config.region,
            aws_access_key_id=config.access_key_id,
            aws_secret_access_key=config.secret_access_key.get_secret_value(),
            config=boto_config,
        )

    def __repr__(self) -> str:
        return f"CdnClient(endpoint_url={self.endpoint_url!r}, bucket={self.bucket!r})"

    def close(self) -> None:
        """Release the pooled HTTP connections."""
        self._client.close()

    def where(self, key: str) -> str:
        """How messages name an object: ``s3://bucket/key``."""
        return self._where(key)

    def _where(self, key: str | None) -> str:
        return f"s3://{self.bucket}/{key}" if key is not None else f"s3://{self.bucket}"

    def _translate(self, exc: BaseException, action: str, key: str | None) -> SealserveError:
        """Our error for ``exc``: names the object and the class of the cause, never a credential."""
        return translate(exc, action, self._where(key))

    @contextmanager
    def _our_errors(self, action: str, key: str | None) -> Iterator[None]:
        try:
            yield
        except Exception as exc:
            if is_local(exc):
                raise
            raise self._translate(exc, action, key) from exc

    def _remote(self, fn: Callable[[], T], action: str, key: str | None) -> T:
        """Run one remote operation with our retries on top of botocore's, translating the failure."""
        with self._our_errors(action, key):
            return call_with_retries(
                fn, policy=self._retry, retry_on=is_retryable,
                what=f"S3 {action} {self._where(key)}", sleep=self._sleep,
            )

    def ensure_bucket(self) -> None:
        """Create the bucket unless it exists already (idempotent; safe to race with another node)."""
        try:
            self._remote(lambda: self._client.head_bucket(Bucket=self.bucket), "HeadBucket", None)
            return
        except NotFoundError:
            pass  # create it below

        def create() -> None:
            try:
                if self._client.meta.region_name in (None, "us-east-1"):
                    # us-east-1 rejects an explicit LocationConstraint for itself.
                    self._client.create_bucket(Bucket=self.bucket)
                else:
                    self._client.create_bucket(
                        Bucket=self.bucket,
                        CreateBucketConfiguration={"LocationConstraint": self._client.meta.region_name},  # type: ignore[typeddict-item]
                    )
            except ClientError as exc:
                if client_error_details(exc)[0] != "BucketAlreadyOwnedByYou":
                    raise

        self._remote(create, "CreateBucket", None)

    def _head(self, key: str) -> tuple[int, str | None]:
        response = self._remote(lambda: self._client.head_object(Bucket=self.bucket, Key=key), "HEAD", key)
        return int(response["ContentLength"]), response.get("ETag")

    def object_size(self, key: str) -> int:
        """Size in bytes of the object (one HEAD request)."""
        return self._head(key)[0]

    def exists(self, key: str) -> bool:
        """Whether the object exists (one HEAD request)."""
        try:
            self._head(key)
        except NotFoundError:
            return False
        return True

    def delete(self, key: str) -> None:
        """Delete the object; deleting a missing object is not an error (S3 semantics)."""
        self._remote(lambda: self._client.delete_object(Bucket=self.bucket, Key=key), "DELETE", key)

    def upload_file(self, path: Path, key: str) -> None:
        """Upload ``path`` as ``key``; multipart in parallel above ``part_size`` (at least 5 MiB)."""
        upload_part = max(self.part_size, MIN_UPLOAD_PART_SIZE)
        transfer = TransferConfig(
            multipart_threshold=upload_part,
            multipart_chunksize=upload_part,
            max_concurrency=self.max_workers,
            use_threads=True,
            # The CRT client would pick its own part sizes and retries; keep behaviour deterministic.
            preferred_transfer_client="classic",
        )
        if not path.is_file():  # a local mistake: fail before any network call, and unretried
            raise FileNotFoundError(f"no such file to upload: {path}")
        self._remote(lambda: self._client.upload_file(str(path), self.bucket, key, Config=transfer),
                     "PUT", key)

    def range_size(self, size: int) -> int:
        """Bytes per ranged GET for an object of ``size`` bytes.

        ``part_size`` is the smallest range. With ``spread_ranges`` (the default) ranges grow to
        spread the object evenly over the workers (fewer requests for the same parallelism: each
        costs the server a lookup, and some S3 look-alikes read the whole object per range), up
        to ``MAX_RANGE_SIZE`` so a failed range costs a bounded retry. Without it, every range is
        ``part_size`` (finest retry granularity).
        """
        if not self.spread_ranges:
            return self.part_size
        even = -(-size // self.max_workers)
        return max(self.part_size, min(even, MAX_RANGE_SIZE))

    def open_range(
        self, key: str, first: int, last: int, *, whole_object: bool = False, if_match: str | None = None
    ) -> S3ObjectStream:
        """One GET of bytes ``first..last`` of ``key`` (a plain GET if ``whole_object``), answered.

        One attempt: the caller retries, resuming where it stopped (:mod:`lib.sealed.stream`). A
        transient failure is a retryable :class:`TransferError`; a missing object
        :class:`~lib.errors.NotFoundError`; anything else (403, 412 on ``If-Match``) our error.
        """
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if not whole_object:
            params["Range"] = range_header(first, last)
        if if_match:
            params["IfMatch"] = if_match
        try:
            response = self._client.get_object(**params)
        except Exception as exc:
            if is_local(exc):
                raise
            error = self._translate(exc, "GET", key)
            if is_retryable(exc):
                raise TransferError(error.message.removeprefix("S3 GET of ")) from exc
            raise error from exc
        return S3ObjectStream(response, self._where(key))

    def download_file(self, key: str, dest: Path, *, expected_size: int | None = None) -> int:
        """Download ``key`` to ``dest`` with parallel ranged GETs; return the number of bytes.

        One HEAD gives the size and the ETag; the ranged GETs carry ``If-Match`` with that ETag,
        so an object replaced mid-download fails (412) instead of yielding a mix of two objects.
        ``dest`` appears only complete; on any failure no partial file is left behind.
        """
        started = time.monotonic()
        size, etag = self._head(key)
        if expected_size is not None and size != expected_size:
            raise IntegrityError(f"{self._where(key)} is {size} bytes, expected {expected_size}")
        ranges = split_ranges(size, self.range_size(size))
        with self._our_errors("GET", key):
            written = write_atomically(dest, size, lambda fd: self._fetch_ranges(key, etag, ranges, fd))
        elapsed = time.monotonic() - started
        log.debug(
            "downloaded %s: %d bytes in %d ranges, %.2fs (%.1f MiB/s)",
            self._where(key), written, len(ranges), elapsed, written / MiB / max(elapsed, 1e-9),
        )
        return written

    def download_file_simple(self, key: str, dest: Path) -> int:
        """Download ``key`` to ``dest`` with one plain streamed GET: the baseline for benchmarks."""
        return write_atomically(
            dest, None, lambda fd: self._remote(lambda: self._fetch_whole(key, fd), "GET", key)
        )

    def _fetch_ranges(self, key: str, etag: str | None, ranges: list[tuple[int, int]], fd: int) -> int:
        def fetch(first: int, last: int, abort: threading.Event) -> int:
            return call_with_retries(
                lambda: self._fetch_range(key, etag, first, last, fd, abort),
                policy=self._retry,
                retry_on=lambda exc: not abort.is_set() and is_retryable(exc),
                what=f"S3 GET {self._where(key)} {range_header(first, last)}",
                sleep=self._sleep,
            )

        return fetch_ranges(ranges, fetch, max_workers=self.max_workers)

    def _fetch_range(
        self, key: str, etag: str | None, first: int, last: int, fd: int, abort: threading.Event
    ) -> int:
        if abort.is_set():
            raise AbortedError()
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": key, "Range": range_header(first, last)}
        if etag:
            params["IfMatch"] = etag
        response = self._client.get_object(**params)
        expected = last - first + 1
        if int(response.get("ContentLength", -1)) != expected:
            response["Body"].close()
            # A server that ignores Range would send the whole object and overwrite other ranges.
            raise TransferError(f"asked for {expected} bytes, server announced "
                                f"{response.get('ContentLength')}", retryable=False)
        end = stream_to_file(response["Body"], fd, first, abort)
        if end != last + 1:
            raise TransferError(f"short body: {end - first} of {expected} bytes")
        return expected

    def _fetch_whole(self, key: str, fd: int) -> int:
        os.ftruncate(fd, 0)  # a retry rewrites the file from the start
        response = self._client.get_object(Bucket=self.bucket, Key=key)
        size = stream_to_file(response["Body"], fd, 0, None)
        if size != response["ContentLength"]:
            raise TransferError(f"short body: {size} of {response['ContentLength']} bytes")
        return size

