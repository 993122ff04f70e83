"""Streamed SHA-256 digests: a model's id is the sha256 of its plaintext file (DESIGN §3)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Protocol

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
