"""The sealed model format, v1: streaming AES-256-GCM with a per-file HKDF key.

The byte layout is specified in ``docs/sealed-format.md``; this module is its only
implementation. In short::

    header   = b"SEALSRV1" | 0x01 | segment_size (u32 BE) | salt (32) | nonce_prefix (7)   # 52 bytes
    seg_key  = HKDF-SHA256(ikm=DEK, salt=salt, info=b"sealserve/v1" + header, length=32)
    segment i = AES-256-GCM(seg_key, nonce=prefix | i (u32 BE) | last (0x01/0x00)) -> ciphertext | tag

Both directions stream: memory use is a couple of segments whatever the file size. Opening
writes plaintext to ``dst`` as segments verify, so a caller must not trust ``dst`` until
:func:`open_stream` returns; :func:`open_file` handles that by writing a temporary file and
renaming it into place only after the final segment verified.
"""

from __future__ import annotations

import io
import os
import secrets
import struct
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from lib.errors import IntegrityError

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

MAGIC = b"SEALSRV1"
VERSION = 1
SALT_SIZE = 32
NONCE_PREFIX_SIZE = 7
TAG_SIZE = 16
KEY_SIZE = 32
HEADER_SIZE = len(MAGIC) + 1 + 4 + SALT_SIZE + NONCE_PREFIX_SIZE  # 52
DEFAULT_SEGMENT_SIZE = 1 << 20
# The header field is 32 bits, but an unauthenticated header must not make us allocate 4 GiB
# before the first tag can prove it genuine; 64 MiB is far above any size we would choose.
MAX_SEGMENT_SIZE = 1 << 26
# The segment counter is 32 bits: one more segment would reuse a nonce under the same key.
MAX_SEGMENTS = 1 << 32
HKDF_INFO_PREFIX = b"sealserve/v1"

_HEADER = struct.Struct(f">{len(MAGIC)}sBI{SALT_SIZE}s{NONCE_PREFIX_SIZE}s")
assert _HEADER.size == HEADER_SIZE


class ByteSource(Protocol):
    """Anything with ``read(n) -> bytes``: a binary file, ``io.BytesIO``, a :class:`JoinedReader`."""

    def read(self, size: int = -1, /) -> bytes: ...


class ByteSink(Protocol):
    """Anything with ``write(buffer)``: a binary file, ``io.BytesIO``, a hashing wrapper.

    As with :meth:`io.RawIOBase.write`, the buffer may be reused once ``write`` returns: a sink
    must copy what it keeps, never hold on to the object it was given.
    """

    def write(self, data: ReadableBuffer, /) -> object: ...


def generate_key() -> bytes:
    """A fresh random data key (DEK) for one model."""
    return secrets.token_bytes(KEY_SIZE)


def _check_key(key: bytes) -> None:
    if not isinstance(key, bytes | bytearray) or len(key) != KEY_SIZE:
        # The length is safe to report; the key itself never goes into a message.
        raise ValueError(f"the data key must be {KEY_SIZE} bytes")


def _check_segment_size(segment_size: int) -> None:
    if not 1 <= segment_size <= MAX_SEGMENT_SIZE:
        raise ValueError(f"segment size must be between 1 and {MAX_SEGMENT_SIZE} bytes, got {segment_size}")


def _segment_count(plaintext_size: int, segment_size: int) -> int:
    # An empty file still has one (empty) final segment, so that truncation to the bare header
    # cannot pass for an empty file.
    return max(1, -(-plaintext_size // segment_size))


def sealed_size(plaintext_size: int, segment_size: int = DEFAULT_SEGMENT_SIZE) -> int:
    """The exact size of the sealed form of a ``plaintext_size``-byte file."""
    if plaintext_size < 0:
        raise ValueError("plaintext size must not be negative")
    _check_segment_size(segment_size)
    return HEADER_SIZE + plaintext_size + TAG_SIZE * _segment_count(plaintext_size, segment_size)


def _segment_key(key: bytes, header: bytes, salt: bytes) -> AESGCM:
    # Binding the whole header into `info` authenticates it: any change to the magic, version,
    # segment size or nonce prefix yields another key, so the first segment fails to verify.
    hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=salt, info=HKDF_INFO_PREFIX + header)
    return AESGCM(hkdf.derive(bytes(key)))


def _nonce(prefix: bytes, index: int, last: bool) -> bytes:
    return prefix + index.to_bytes(4, "big") + (b"\x01" if last else b"\x00")


def _read_exact(src: ByteSource, size: int) -> bytes:
    """Read ``size`` bytes, fewer only at end of stream (raw streams may return short reads)."""
    first = src.read(size)
    if not first or len(first) == size:
        return first or b""
    buf = bytearray(first)
    while len(buf) < size:
        chunk = src.read(size - len(buf))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def _fill(src: ByteSource, view: memoryview) -> int:
    """Fill ``view`` from ``src``; fewer bytes only at end of stream. Uses ``readinto`` if it can."""
    readinto = getattr(src, "readinto", None)
    filled = 0
    while filled < len(view):
        if readinto is not None:
            got = readinto(view[filled:])
        else:
            chunk = src.read(len(view) - filled)
            got = len(chunk)
            view[filled : filled + got] = chunk
        if not got:
            break
        filled += got
    return filled


def _segments(src: ByteSource, size: int) -> Iterator[tuple[memoryview, bool]]:
    """Yield ``(chunk, is_last)``; one chunk of read-ahead tells whether the current one is last.

    The chunks are views of two reused buffers, valid until the next one is yielded: a fresh
    1 MiB object per segment costs the allocator (and the page faults of fresh memory) more
    than the decryption itself.
    """
    current, upcoming = memoryview(bytearray(size)), memoryview(bytearray(size))
    filled = _fill(src, current)
    while True:
        if filled < size:
            yield current[:filled], True
            return
        ahead = _fill(src, upcoming)
        if not ahead:
            yield current, True
            return
        yield current, False
        current, upcoming, filled = upcoming, current, ahead


@dataclass(frozen=True)
class Header:
    """A parsed header (docs/sealed-format.md §2). Not authenticated by itself: a changed
    header yields another segment key, so segment 0 fails to verify (§5)."""

    segment_size: int
    salt: bytes = field(repr=False)
    nonce_prefix: bytes = field(repr=False)
    raw: bytes = field(repr=False)


def parse_header(raw: bytes) -> Header:
    """Check and parse the first :data:`HEADER_SIZE` bytes of a sealed file (§4 step 1)."""
    if len(raw) < HEADER_SIZE:
        raise IntegrityError("sealed data is truncated: incomplete header")
    raw = bytes(raw[:HEADER_SIZE])
    magic, version, segment_size, salt, nonce_prefix = _HEADER.unpack(raw)
    if magic != MAGIC:
        raise IntegrityError("not a sealed file: bad magic")
    if version != VERSION:
        raise IntegrityError(f"unsupported sealed format version {version}")
    if not 1 <= segment_size <= MAX_SEGMENT_SIZE:
        raise IntegrityError(f"unsupported segment size {segment_size}")
    return Header(segment_size, salt, nonce_prefix, raw)


class SegmentOpener:
    """Verifies and decrypts single segments of one sealed file, in any order (§3, §4).

    Thread-safe (the AEAD object is immutable). The caller says which segment a buffer is and
    whether it is the last: positions come from the stream (:func:`open_stream`) or from the
    sealed size (:class:`~lib.sealed.layout.SealedLayout`), and a wrong one fails the tag.
    """

    def __init__(self, key: bytes, header: Header) -> None:
        _check_key(key)
        self.header = header
        self.segment_size = header.segment_size
        self._aead = _segment_key(key, header.raw, header.salt)

    def open_into(self, index: int, last: bool, sealed: memoryview | bytes, out: WriteableBuffer) -> int:
        """Verify segment ``index`` and write its plaintext to the front of ``out``; return its length.

        ``out`` must hold ``len(sealed) - TAG_SIZE`` bytes. On a failed tag, ``out`` holds
        unverified plaintext (OpenSSL decrypts before it compares the tag): never let it leave
        process memory unless this method returned.
        """
        size = len(sealed) - TAG_SIZE
        if size < 0:
            raise IntegrityError(f"sealed data is truncated: segment {index} is shorter than its tag")
        if index >= MAX_SEGMENTS:
            raise IntegrityError("sealed data has more segments than the format allows")
        try:
            self._aead.decrypt_into(
                _nonce(self.header.nonce_prefix, index, last), sealed, None, memoryview(out).cast("B")[:size]
            )
        except InvalidTag:
            # One message for every cause on purpose: the tag cannot tell a wrong key from a
            # flipped bit, a swapped segment or a missing tail, and guessing would mislead.
            raise IntegrityError(
                f"sealed data failed verification at segment {index} "
                "(tampered, truncated, reordered, or wrong key)"
            ) from None
        if last and size == 0 and index > 0:
            # Only the key holder can produce this, but the format is canonical: an empty
            # final segment exists only for an empty file.
            raise IntegrityError("sealed data ends with an empty segment after data")
        return size


def seal_stream(
    src: ByteSource,
    dst: ByteSink,
    key: bytes,
    *,
    segment_size: int = DEFAULT_SEGMENT_SIZE,
    salt: bytes | None = None,
    nonce_prefix: bytes | None = None,
) -> int:
    """Seal everything ``src`` yields into ``dst``; return the number of bytes written.

    ``salt`` and ``nonce_prefix`` exist only so tests can check known answers. Production code
    must leave them out: a repeated (key, salt) pair would repeat every nonce.
    """
    _check_key(key)
    _check_segment_size(segment_size)
    salt = secrets.token_bytes(SALT_SIZE) if salt is None else salt
    nonce_prefix = secrets.token_bytes(NONCE_PREFIX_SIZE) if nonce_prefix is None else nonce_prefix
    if len(salt) != SALT_SIZE or len(nonce_prefix) != NONCE_PREFIX_SIZE:
        raise ValueError(f"salt must be {SALT_SIZE} bytes and nonce prefix {NONCE_PREFIX_SIZE} bytes")
    header = _HEADER.pack(MAGIC, VERSION, segment_size, salt, nonce_prefix)
    aead = _segment_key(key, header, salt)
    dst.write(header)
    written = HEADER_SIZE
    # One output buffer for the whole stream: allocating a fresh ~1 MiB object per segment made
    # sealing about five times slower (the allocator hands freed pages back to the OS each time).
    out = memoryview(bytearray(segment_size + TAG_SIZE))
    for index, (chunk, last) in enumerate(_segments(src, segment_size)):
        if index >= MAX_SEGMENTS:
            raise ValueError("input too large for this segment size: the 32-bit segment counter would wrap")
        sealed = out[: len(chunk) + TAG_SIZE]
        aead.encrypt_into(_nonce(nonce_prefix, index, last), chunk, None, sealed)
        dst.write(sealed)
        written += len(sealed)
    return written


def open_stream(src: ByteSource, dst: ByteSink, key: bytes) -> int:
    """Verify and decrypt a sealed stream into ``dst``; return the plaintext size.

    Raises :class:`~lib.errors.IntegrityError` on any tampering, truncation, reordering, trailing
    data or wrong key. Plaintext reaches ``dst`` segment by segment, before the end is verified:
    whatever ``dst`` holds is untrusted unless this function returns.
    """
    _check_key(key)
    opener = SegmentOpener(key, parse_header(_read_exact(src, HEADER_SIZE)))
    out = memoryview(bytearray(opener.segment_size))
    plaintext_size = 0
    for index, (sealed, last) in enumerate(_segments(src, opener.segment_size + TAG_SIZE)):
        size = opener.open_into(index, last, sealed, out)
        dst.write(out[:size])
        plaintext_size += size
    return plaintext_size


@contextmanager
def _atomic_output(dst: Path) -> Iterator[io.BufferedWriter]:
    """A temporary file beside ``dst``, renamed over it only if the block completes."""
    fd, tmp_name = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
            out.flush()
            # Without fsync a crash after the rename could leave a renamed but empty file.
            os.fsync(out.fileno())
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def seal_file(src: Path, dst: Path, key: bytes, *, segment_size: int = DEFAULT_SEGMENT_SIZE) -> int:
    """Seal ``src`` into ``dst`` atomically; return the sealed size."""
    _check_key(key)
    _check_segment_size(segment_size)
    with Path(src).open("rb") as inp, _atomic_output(Path(dst)) as out:
        return seal_stream(inp, out, key, segment_size=segment_size)


def open_file(src: Path, dst: Path, key: bytes) -> int:
    """Verify and decrypt ``src`` into ``dst``; return the plaintext size.

    ``dst`` appears (or is replaced) only once the whole file verified; on any failure it is left
    as it was and no temporary file remains.
    """
    _check_key(key)
    with Path(src).open("rb") as inp, _atomic_output(Path(dst)) as out:
        return open_stream(inp, out, key)


def split_point(sealed_size: int, small_size_kb: int) -> int:
    """How many leading bytes of a sealed file form the small part (docs/sealed-format.md §6)."""
    if sealed_size < 0 or small_size_kb < 0:
        raise ValueError("sizes must not be negative")
    return min(small_size_kb * 1024, sealed_size * 20 // 100)


def _copy(src: ByteSource, dst: ByteSink, size: int | None, chunk_size: int = DEFAULT_SEGMENT_SIZE) -> int:
    """Copy ``size`` bytes (everything if ``None``) in bounded chunks; return the count."""
    copied = 0
    while size is None or copied < size:
        want = chunk_size if size is None else min(chunk_size, size - copied)
        chunk = src.read(want)
        if not chunk:
            break
        dst.write(chunk)
        copied += len(chunk)
    return copied


def split_file(sealed: Path, small_out: Path, big_out: Path, small_size_kb: int) -> tuple[int, int]:
    """Split a sealed file into its small and big parts; return their sizes."""
    sealed = Path(sealed)
    cut = split_point(sealed.stat().st_size, small_size_kb)
    with sealed.open("rb") as inp:
        with _atomic_output(Path(small_out)) as out:
            small = _copy(inp, out, cut)
        with _atomic_output(Path(big_out)) as out:
            big = _copy(inp, out, None)
    if small != cut:
        raise OSError(f"{sealed} shrank while being split")
    return small, big


class JoinedReader(io.RawIOBase):
    """Read several binary streams one after the other, as one stream.

    ``open_stream(JoinedReader([small, big]), dst, key)`` opens a split model without
    concatenating the parts on disk. The streams are not closed by this reader.
    """

    def __init__(self, streams: Iterable[ByteSource]) -> None:
        super().__init__()
        self._streams: list[ByteSource] = list(streams)
        self._current = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer, /) -> int:
        view = memoryview(buffer).cast("B")
        if not view:
            # An empty read must not be mistaken for the end of the current stream.
            return 0
        while self._current < len(self._streams):
            chunk = self._streams[self._current].read(len(view))
            if chunk:
                view[: len(chunk)] = chunk
                return len(chunk)
            self._current += 1
        return 0
