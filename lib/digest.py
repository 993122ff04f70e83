"""Streamed SHA-256 digests: a model's id is the sha256 of its plaintext file (docs/sealed-format.md)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import IO, TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

_CHUNK = 1 << 20


class _Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


def sha256_stream(f: _Readable, chunk_size: int = _CHUNK) -> str:
    """Hex SHA-256 of everything ``f`` yields, read in bounded chunks."""
    digest = hashlib.sha256()
    while chunk := f.read(chunk_size):
        digest.update(chunk)
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of the file at ``path``, without loading it whole."""
    with Path(path).open("rb") as f:
        return sha256_stream(f)


class HashingIO:
    """Wraps a file to hash and count the bytes read from or written to it.

    Writing: a tar being packed or a plaintext being opened, so its id needs no second pass
    (tarfile also needs ``tell``). Reading: sealing's input, proving the sealed bytes are the
    ones the id was computed over.
    """

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self._digest = hashlib.sha256()
        self.size = 0

    def write(self, data: ReadableBuffer, /) -> int:
        view = memoryview(data).cast("B")
        self._digest.update(view)
        self._raw.write(view)
        self.size += view.nbytes
        return view.nbytes

    def read(self, size: int = -1, /) -> bytes:
        chunk = self._raw.read(size)
        self._digest.update(chunk)
        self.size += len(chunk)
        return chunk

    def tell(self) -> int:
        return self.size

    def hexdigest(self) -> str:
        return self._digest.hexdigest()
