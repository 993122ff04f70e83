"""A sealed model's plaintext while it is being opened: nothing is published before all of it verified.

Segments are verified (their GCM tag) in process memory first and only then written, at their
offsets, into a hidden temporary file (``mkstemp``: mode 0600, ``O_EXCL``) in the node's tmpfs
cache directory, so the file never holds a byte whose tag failed. A thread hashes the plaintext
as the contiguous written prefix grows — hashlib releases the GIL on large buffers, so hashing
runs beside download and decryption instead of after them — from the writer's buffer when the
writer lends it (segments in order), else read back from the file. :meth:`PlaintextFile.publish` renames
the file to its final name, and only after every segment was written and :meth:`digest` returned
the SHA-256 the caller compared with the model id; any other way out (an error, an abort) ends in
:meth:`discard`, which removes it. A path handed out therefore always holds verified bytes.
(docs/sealed-format.md §4 states the rule; docs/sealed-models.md how a node applies it.)
"""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from lib.sealed.layout import SealedLayout

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

# Bytes the hashing thread reads back per call. Measured on the 2-core test machine, CPU time to
# pread + sha256 256 MiB of tmpfs (three runs each; wall times were useless at load 30):
# 0.23-0.25 s with 256 KiB reads, 0.24 s with 1 MiB, 0.24 s with 4 MiB, 0.25-0.26 s with 16 MiB.
# The size hardly matters, so one default segment: the buffer counts against peak memory.
HASH_CHUNK = 1 << 20


class PlaintextFile:
    """The hidden temporary file a sealed model is opened into, and the SHA-256 that follows it."""

    def __init__(
        self, directory: Path, layout: SealedLayout, *, name_hint: str = "sealed", preallocate: bool = False
    ) -> None:
        fd, name = tempfile.mkstemp(dir=directory, prefix=f".{name_hint}.", suffix=".part")
        self.path = Path(name)
        self._fd = fd
        self._layout = layout
        self._written = bytearray(layout.count)
        self._frontier = 0  # segments [0, frontier) are all written
        self._cond = threading.Condition()
        self._closed = False
        self._published = False
        self._digest: str | None = None
        self._hash_error: BaseException | None = None
        self._lent: dict[int, tuple[memoryview, Callable[[], None]]] = {}
        self._lending = True
        try:
            self._size(preallocate)
        except BaseException:
            self._remove()
            raise
        self._thread = threading.Thread(target=self._hash, name="sealed-sha256", daemon=True)
        self._thread.start()

    def _size(self, preallocate: bool) -> None:
        """Give the file its final size; ranges may then land in any order.

        With ``preallocate`` the memory is taken now: a model that does not fit in the tmpfs
        fails before any byte is downloaded, and writing into pages that exist is cheaper
        (measured, 500 MiB on tmpfs: 0.12 s of CPU to pwrite into preallocated pages, 0.16 s into
        a sparse file; preallocating cost 0.06 s, spent while the store prepares its answer).
        """
        size = self._layout.plaintext_size
        if preallocate and size:
            try:
                os.posix_fallocate(self._fd, 0, size)
                return
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
        os.ftruncate(self._fd, size)  # sparse: memory is taken as segments are written

    @property
    def layout(self) -> SealedLayout:
        return self._layout

    def write(self, index: int, plaintext: ReadableBuffer, *, give_back: Callable[[], None] | None = None
              ) -> None:
        """Write the *verified* plaintext of segment ``index``; safe to call from several threads.

        With ``give_back`` the caller lends the buffer: if the segment is the next in line (every
        earlier one written), the hashing thread hashes it from memory and then calls
        ``give_back``, instead of reading it back from the file; otherwise ``give_back`` is called
        at once. Either way the caller must not touch the buffer until then.
        """
        data = memoryview(plaintext).cast("B")
        if data.nbytes != self._layout.plaintext_length(index):
            raise ValueError(f"segment {index} has {data.nbytes} bytes, expected "
                             f"{self._layout.plaintext_length(index)}")
        offset, view = self._layout.plaintext_offset(index), data
        while view:  # pwrite may write less than asked (a signal, a full tmpfs)
            written = os.pwrite(self._fd, view, offset)
            view = view[written:]
            offset += written
        with self._cond:
            if self._written[index]:
                raise ValueError(f"segment {index} written twice")
            lend = give_back is not None and self._lending and index == self._frontier
            if lend:
                assert give_back is not None
                self._lent[index] = (data, give_back)
            self._written[index] = 1
            advanced = False
            while self._frontier < self._layout.count and self._written[self._frontier]:
                self._frontier += 1
                advanced = True
            if advanced:
                self._cond.notify_all()
        if give_back is not None and not lend:
            give_back()

    def _start_of(self, index: int) -> int:
        """Plaintext offset where segment ``index`` starts (the size, for ``index`` = count)."""
        return min(index * self._layout.segment_size, self._layout.plaintext_size)

    def _hash(self) -> None:
        digest = hashlib.sha256()
        buffer: memoryview | None = None  # for reading back; never needed when every segment is lent
        index = 0
        try:
            while index < self._layout.count:
                with self._cond:
                    while not self._closed and index >= self._frontier:
                        self._cond.wait()
                    if self._closed:
                        return
                    lent = self._lent.pop(index, None)
                    # Not lent: read back every written segment up to the next lent one.
                    end = index + 1 if lent else min([i for i in self._lent if i > index] + [self._frontier])
                if lent is not None:
                    digest.update(lent[0])
                    lent[1]()
                else:
                    if buffer is None:
                        buffer = memoryview(bytearray(min(HASH_CHUNK, max(1, self._layout.plaintext_size))))
                    self._read_back(digest, buffer, self._start_of(index), self._start_of(end))
                index = end
            self._digest = digest.hexdigest()
        except BaseException as exc:  # handed to the caller by digest()
            self._hash_error = exc
        finally:
            with self._cond:  # nothing lent may stay lent: a writer could wait for it forever
                self._lending = False
                leftovers = list(self._lent.values())
                self._lent.clear()
            for _, give_back in leftovers:
                give_back()

    def _read_back(self, digest: Any, buffer: memoryview, start: int, end: int) -> None:
        while start < end:
            got = os.preadv(self._fd, [buffer[: min(len(buffer), end - start)]], start)
            if got <= 0:
                raise OSError(f"{self.path} is shorter than what was written to it")
            digest.update(buffer[:got])
            start += got

    def complete(self) -> bool:
        """Whether every segment was written."""
        with self._cond:
            return self._frontier == self._layout.count

    def digest(self) -> str:
        """The SHA-256 (hex) of the plaintext, once every segment is written; waits for the hashing."""
        if not self.complete():
            raise ValueError("the plaintext is incomplete: not every segment was written")
        self._thread.join()
        if self._hash_error is not None:
            raise self._hash_error
        assert self._digest is not None
        return self._digest

    def publish(self, dest: Path) -> Path:
        """Rename the file to ``dest``; only after :meth:`digest` matched the expected id."""
        if self._digest is None:
            raise ValueError("publish() before digest(): nothing is published unverified")
        os.close(self._fd)
        self._fd = -1
        os.rename(self.path, dest)
        self._published = True
        return dest

    def discard(self) -> None:
        """Stop the hashing and remove the file, unless it was published. Idempotent."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join()
        if not self._published:
            self._remove()

    def _remove(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> PlaintextFile:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.discard()
