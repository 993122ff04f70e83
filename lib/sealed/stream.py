"""The big part of a sealed model streamed through verification: no staging, and resumable.

A fetch is cut into *batches* of whole segments (:meth:`SealedLayout.batches`): one batch for a
single streamed GET, several for parallel ranged GETs. :class:`SegmentStreamer` fetches one batch
with one request — the part of the batch that lies in the small part comes from memory — reads
it a segment at a time into a reused buffer, verifies and decrypts the segment in memory and
writes the plaintext to its offset in the :class:`~lib.sealed.plaintext.PlaintextFile`. So the
download, the decryption and (on the plaintext file's thread) the hashing overlap, and memory is
a few segments per stream whatever the model size.

A dropped connection (a reset, a timeout, a body cut short) does not start the batch over: the
next request asks for the bytes from the first segment not yet written (every one before it
verified), with ``If-Match`` on the ETag of the first answer so the rest cannot come from another
object. Retries are bounded: ``policy.attempts`` failures in a row without a verified segment in
between end the fetch with :class:`~lib.errors.UpstreamError`. An integrity failure is never
retried. (docs/sealed-models.md, "How a node fetches".)
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

from lib.errors import IntegrityError, UpstreamError
from lib.retry import RetryPolicy, call_with_retries
from lib.sealed.format import SegmentOpener
from lib.sealed.layout import SealedLayout
from lib.sealed.plaintext import PlaintextFile
from lib.sealed.transfer import AbortedError, TransferError, fetch_ranges

# Plaintext buffers per stream, lent in turn to the hashing thread so it hashes from memory
# instead of reading the segment back from tmpfs (the read-back cost 0.05 s of CPU per 300 MiB).
# Measured, streaming + hashing 500 MiB from the test server, the counts taking turns (3 runs
# each, 2 cores): 2 buffers 0.60-0.64 s, 3 0.55-0.58 s, 4 0.54-0.58 s, 8 0.50-0.59 s. Past 3 the
# gain is noise and costs memory: a stream holds 4 segments (one sealed, three plaintext).
LENT_BUFFERS = 3


class ObjectStream(Protocol):
    """One answered GET: the length of its body, the object's size and ETag, the body itself."""

    length: int
    object_size: int | None  # the whole object's, from Content-Range (or the length of a plain GET)
    etag: str | None

    def readinto(self, buffer: memoryview, /) -> int:
        """Bytes read (0 at the end); a transport failure is a :class:`TransferError`."""
        ...

    def close(self) -> None: ...


class RangeSource(Protocol):
    """The store of big parts, as the streamer needs it (:class:`~lib.sealed.cdn.CdnClient`)."""

    def open_range(
        self, key: str, first: int, last: int, *, whole_object: bool = False, if_match: str | None = None
    ) -> ObjectStream:
        """GET bytes ``first..last`` (inclusive) of ``key``; a plain GET if ``whole_object``.

        Transient failures raise :class:`TransferError` (``retryable``); others our own errors.
        """
        ...

    def where(self, key: str) -> str:
        """How messages name the object, e.g. ``s3://bucket/key``."""
        ...


@dataclass
class StreamStats:
    """What the streaming of one fetch cost: requests made, resumes, bytes received."""

    requests: int = 0
    resumes: int = 0
    bytes: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, *, requests: int = 0, resumes: int = 0, received: int = 0) -> None:
        with self._lock:
            self.requests += requests
            self.resumes += resumes
            self.bytes += received


class _EtagPin:
    """The ETag of the first answer; every later answer must carry the same one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.value: str | None = None

    def check(self, etag: str | None, where: str) -> None:
        with self._lock:
            if self.value is None:
                self.value = etag
            elif etag is not None and etag != self.value:
                raise TransferError(f"{where} changed during the download (ETag {etag} after "
                                    f"{self.value})", retryable=False)


@dataclass
class SegmentStreamer:
    """Fetches, verifies and writes the segments of one sealed file (see the module doc).

    ``prefix`` holds the first sealed bytes, known in memory (the small part, plus the rest of the
    header if the small part is shorter than one); the big part, object ``key`` of ``source``,
    starts at sealed offset ``big_start``. Without ``opener`` and ``sink`` it can only
    :meth:`open` requests: a fetch sends its first one while the key is still being released.
    """

    layout: SealedLayout
    prefix: bytes
    big_start: int
    key: str
    source: RangeSource
    opener: SegmentOpener | None = None
    sink: PlaintextFile | None = None
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    sleep: Callable[[float], None] = time.sleep
    stats: StreamStats = field(default_factory=StreamStats)
    _pin: _EtagPin = field(default_factory=_EtagPin)
    _local: threading.local = field(default_factory=threading.local, repr=False)

    def request_for(self, first: int, last: int) -> tuple[int, int, bool] | None:
        """Big-part bytes ``(from, to, whole object)`` holding segments ``first..last``; None if
        they are all in memory already."""
        start, end = self.layout.spans(first, last + 1)
        if end <= len(self.prefix):
            return None
        span = max(start, len(self.prefix)) - self.big_start, end - self.big_start - 1
        return (*span, span == (0, self.layout.sealed_size - self.big_start - 1))

    def open(self, first: int, last: int) -> ObjectStream | None:
        """Send the GET for segments ``first..last`` (one attempt); None if no request is needed."""
        request = self.request_for(first, last)
        if request is None:
            return None
        self.stats.add(requests=1)
        stream = self.source.open_range(self.key, request[0], request[1], whole_object=request[2],
                                        if_match=self._pin.value)
        self._accept(stream, first, last)
        return stream

    def _accept(self, stream: ObjectStream, first: int, last: int) -> None:
        request = self.request_for(first, last)
        assert request is not None
        try:
            expected, big_size = request[1] - request[0] + 1, self.layout.sealed_size - self.big_start
            if stream.object_size is not None and stream.object_size != big_size:
                # Truncated or extended in the store: not the object the manifest describes.
                raise IntegrityError(f"{self.source.where(self.key)} is {stream.object_size} bytes, "
                                     f"expected {big_size}")
            if stream.length != expected:
                # A server that ignores Range would hand us the wrong bytes at the wrong offsets.
                raise TransferError(f"{self.source.where(self.key)} bytes {request[0]}-{request[1]}: the "
                                    f"store announced {stream.length} bytes, not {expected}", retryable=False)
            self._pin.check(stream.etag, self.source.where(self.key))
        except BaseException:
            stream.close()
            raise

    def run(self, first: int, last: int, abort: threading.Event | None = None,
            stream: ObjectStream | None = None) -> int:
        """Fetch segments ``first..last`` (inclusive) into the sink; return the plaintext bytes.

        ``stream``, if given, is an answered GET for exactly these segments (sent early, while the
        key was being released); it is used for the first attempt and closed in any case.
        """
        if self.opener is None or self.sink is None:
            raise ValueError("a streamer without opener and sink can only open requests")
        sealed, pool = self._buffers()
        index, failures, written = first, 0, 0
        while index <= last:
            try:
                if stream is None:
                    stream = self.open(index, last)
                elif index == first and failures == 0:
                    self._accept(stream, first, last)
                while index <= last:
                    if abort is not None and abort.is_set():
                        raise AbortedError()
                    size = self._read_segment(index, stream, sealed)
                    plain, final = pool.get(), self.layout.is_last(index)
                    try:
                        length = self.opener.open_into(index, final, sealed[:size], plain)
                    except BaseException:
                        pool.put(plain)
                        raise
                    self.sink.write(index, plain[:length], give_back=partial(pool.put, plain))
                    index, failures, written = index + 1, 0, written + length
            except TransferError as exc:
                failures += 1
                if not exc.retryable:
                    raise UpstreamError(f"S3 GET of {exc}") from exc
                if failures >= self.policy.attempts:
                    raise UpstreamError(
                        f"S3 GET of {exc} (gave up after {failures} attempts in a row without a "
                        f"verified segment, at segment {index} of {self.layout.count})"
                    ) from exc
                self.stats.add(resumes=1)
                self.sleep(self.policy.delay(failures))
            finally:
                if stream is not None:
                    stream.close()
                    stream = None
        return written

    def _buffers(self) -> tuple[memoryview, queue.SimpleQueue[memoryview]]:
        """This thread's sealed-segment buffer and pool of plaintext buffers, made once per thread:
        a ranged fetch runs many batches on each of a few threads, and memory must not grow with
        the batches. The plaintext buffers are lent to the sink's hashing thread in turn."""
        mine = self._local.__dict__
        if "pool" not in mine:
            mine["sealed"] = memoryview(bytearray(self.layout.stride))
            mine["pool"] = queue.SimpleQueue()
            for _ in range(LENT_BUFFERS):
                mine["pool"].put(memoryview(bytearray(self.layout.segment_size)))
        return mine["sealed"], mine["pool"]

    def _read_segment(self, index: int, stream: ObjectStream | None, buffer: memoryview) -> int:
        """Put the sealed bytes of segment ``index`` at the front of ``buffer``; return how many.

        Each read asks for the rest of the segment at once. Measured, reading 500 MiB from the
        test server through ``S3ObjectStream``: 0.22-0.24 s of CPU with 64 KiB reads, 0.18 s with
        256 KiB, 0.15-0.16 s with 1 MiB and with 4 MiB: a default segment per read is enough.
        """
        start, end = self.layout.span(index)
        size = end - start
        filled = 0
        if start < len(self.prefix):
            piece = self.prefix[start:min(end, len(self.prefix))]
            buffer[: len(piece)] = piece
            filled = len(piece)
        while filled < size:
            if stream is None:
                raise AssertionError(f"segment {index} reaches past the prefix, but no request was made")
            got = stream.readinto(buffer[filled:size])
            if not got:
                raise TransferError(f"{self.source.where(self.key)}: the body ended {size - filled} bytes "
                                    f"early, in segment {index}")
            filled += got
            self.stats.add(received=got)
        return size


def stream_all(
    streamer: SegmentStreamer,
    batches: list[tuple[int, int]],
    *,
    workers: int,
    early: ObjectStream | None = None,
) -> int:
    """Run every batch, ``workers`` at a time in order; the first failure stops the others.

    ``early`` is an answered GET for the first batch. Returns the plaintext bytes written.
    """
    unused = [early] if early is not None else []

    def run(first: int, last: int, abort: threading.Event) -> int:
        stream = unused.pop() if first == batches[0][0] and unused else None
        return streamer.run(first, last, abort, stream)

    try:
        if len(batches) == 1:
            return run(*batches[0], threading.Event())
        return fetch_ranges(batches, run, max_workers=workers)
    finally:
        for stream in unused:  # the first batch never ran: cancelled by another's failure
            stream.close()


def read_head(source: RangeSource, key: str, size: int, *, policy: RetryPolicy,
              sleep: Callable[[float], None] = time.sleep) -> bytes:
    """The first ``size`` bytes of object ``key``: the rest of a header the small part lacks."""
    def attempt() -> bytes:
        stream = source.open_range(key, 0, size - 1)
        try:
            if stream.length != size:
                raise TransferError(f"{source.where(key)}: the store announced {stream.length} bytes, "
                                    f"not {size}", retryable=False)
            buffer = memoryview(bytearray(size))
            filled = 0
            while filled < size:
                got = stream.readinto(buffer[filled:])
                if not got:
                    raise TransferError(f"{source.where(key)}: the body ended {size - filled} bytes early")
                filled += got
            return bytes(buffer)
        finally:
            stream.close()

    try:
        return call_with_retries(attempt, policy=policy, sleep=sleep, what=f"S3 GET {source.where(key)}",
                                 retry_on=lambda exc: isinstance(exc, TransferError) and exc.retryable)
    except TransferError as exc:
        raise UpstreamError(f"S3 GET of {exc}") from exc
