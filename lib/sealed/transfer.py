"""Moving an object's bytes into a local file: byte ranges, parallel ranged fetches, atomic writes.

What :class:`~lib.sealed.cdn.CdnClient` does with the bytes once the store answers, independent
of the store: the ranges an object is cut into, the ``Range`` header of each, a response body
streamed to its offset in a preallocated file, ranges fetched in parallel with the rest stopped
early once one fails for good, and a temp file renamed over the destination only when complete.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Protocol

MiB = 1024 * 1024
# Bounded so a range is streamed to disk instead of held whole in memory.
STREAM_CHUNK = 1 * MiB


class TransferError(Exception):
    """The store answered, but not with the bytes it promised (short body, ignored Range)."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class AbortedError(Exception):
    """Another range failed for good; the remaining ones stop early instead of finishing uselessly."""


class Body(Protocol):
    """A streamed response body, such as botocore's ``StreamingBody``."""

    def iter_chunks(self, chunk_size: int = ...) -> Iterator[bytes]: ...

    def close(self) -> None: ...


def split_ranges(size: int, part_size: int) -> list[tuple[int, int]]:
    """Inclusive ``(first, last)`` byte ranges covering ``[0, size)`` in order; none for ``size == 0``."""
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    if part_size < 1:
        raise ValueError(f"part_size must be >= 1, got {part_size}")
    return [(start, min(start + part_size, size) - 1) for start in range(0, size, part_size)]


def range_header(first: int, last: int) -> str:
    """The HTTP ``Range`` value for the inclusive byte range ``[first, last]``."""
    if first < 0 or last < first:
        raise ValueError(f"invalid byte range {first}-{last}")
    return f"bytes={first}-{last}"


def stream_to_file(body: Body, fd: int, offset: int, abort: threading.Event | None) -> int:
    """Write ``body`` into ``fd`` from ``offset`` on, chunk by chunk; return the offset after the end."""
    try:
        for chunk in body.iter_chunks(STREAM_CHUNK):
            if abort is not None and abort.is_set():
                raise AbortedError()
            view = memoryview(chunk)
            while view:  # pwrite may write less than asked (a signal, a nearly full disk)
                written = os.pwrite(fd, view, offset)
                view = view[written:]
                offset += written
    finally:
        body.close()
    return offset


def write_atomically(dest: Path, size: int | None, fill: Callable[[int], int]) -> int:
    """Let ``fill`` write a temp file beside ``dest``, check its byte count, rename it to ``dest``.

    With a ``size`` the file is preallocated, so ranges can land at their offsets in any order, and
    ``fill`` must write exactly that many bytes. On any failure no partial file is left behind.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Same directory as dest, so the final rename is atomic (same filesystem).
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        try:
            if size is not None:
                os.ftruncate(fd, size)
            written = fill(fd)
            if size is not None and written != size:
                raise TransferError(f"received {written} of {size} bytes", retryable=False)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return written


def fetch_ranges(
    ranges: list[tuple[int, int]],
    fetch: Callable[[int, int, threading.Event], int],
    *,
    max_workers: int,
) -> int:
    """Run ``fetch(first, last, abort)`` for every range on up to ``max_workers`` threads.

    Returns the sum of what the calls return. The first failure sets ``abort`` (a fetch checks it
    and raises :class:`AbortedError`), cancels the ranges not started, waits for the running ones,
    and is raised itself, not the aborts it caused.
    """
    if not ranges:
        return 0
    abort = threading.Event()
    workers = min(max_workers, len(ranges))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cdn-range") as pool:
        futures: list[Future[int]] = [pool.submit(fetch, first, last, abort) for first, last in ranges]
        wait(futures, return_when=FIRST_EXCEPTION)
        if any(f.done() and f.exception() is not None for f in futures):
            abort.set()
            for future in futures:
                future.cancel()
        # Leaving the with-block waits for the ranges still running, so none writes after fd closes.
    errors = [exc for f in futures if not f.cancelled() and (exc := f.exception()) is not None]
    if errors:
        # The aborted ranges only echo the real failure; report the one that caused it.
        raise next((exc for exc in errors if not isinstance(exc, AbortedError)), errors[0])
    return sum(future.result() for future in futures)
