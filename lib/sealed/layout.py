"""Where each segment of a sealed file lies, known before any byte of it arrives (docs/sealed-format.md).

:func:`~lib.sealed.format.open_stream` learns which segment is the last by reading one ahead. A
node fetching a sealed model knows the sealed size in advance (from the manifest, checked against
the store's answer), so it computes every position instead and can fetch, verify and place
segments in any order: segment *i* spans ``[52 + i·(S+16), 52 + (i+1)·(S+16))`` clipped to the
sealed size, its plaintext goes to ``i·S``, and the last one is ``n - 1``. For a stream of exactly
``sealed_size`` bytes this is the rule of §4, so the same files verify and the same files fail
(a changed size moves the last-segment flag, and the tags fail).
"""

from __future__ import annotations

from dataclasses import dataclass

from lib.errors import IntegrityError
from lib.sealed.format import HEADER_SIZE, MAX_SEGMENT_SIZE, MAX_SEGMENTS, TAG_SIZE


@dataclass(frozen=True)
class SealedLayout:
    """The segments of a sealed file of ``sealed_size`` bytes with plaintext segment size ``segment_size``."""

    segment_size: int
    sealed_size: int
    count: int
    plaintext_size: int

    @classmethod
    def of(cls, segment_size: int, sealed_size: int) -> SealedLayout:
        """The layout, or :class:`~lib.errors.IntegrityError` if no sealed file can have this size."""
        if not 1 <= segment_size <= MAX_SEGMENT_SIZE:
            raise IntegrityError(f"unsupported segment size {segment_size}")
        body = sealed_size - HEADER_SIZE
        if body < 0:
            raise IntegrityError("sealed data is truncated: incomplete header")
        if body == 0:
            # A sealed file always has at least one segment, even for an empty plaintext.
            raise IntegrityError("sealed data is truncated: segment 0 is shorter than its tag")
        stride = segment_size + TAG_SIZE
        count = -(-body // stride)
        last = body - (count - 1) * stride
        if last < TAG_SIZE:
            raise IntegrityError(f"sealed data is truncated: segment {count - 1} is shorter than its tag")
        if count > MAX_SEGMENTS:
            raise IntegrityError("sealed data has more segments than the format allows")
        if last == TAG_SIZE and count > 1:
            raise IntegrityError("sealed data ends with an empty segment after data")
        return cls(segment_size, sealed_size, count, body - count * TAG_SIZE)

    @property
    def stride(self) -> int:
        """Sealed bytes of every segment but the last."""
        return self.segment_size + TAG_SIZE

    def span(self, index: int) -> tuple[int, int]:
        """Sealed byte offsets ``[start, end)`` of segment ``index``."""
        self._check(index)
        start = HEADER_SIZE + index * self.stride
        return start, min(start + self.stride, self.sealed_size)

    def spans(self, first: int, end: int) -> tuple[int, int]:
        """Sealed byte offsets ``[start, end)`` of segments ``first`` to ``end - 1``."""
        if not 0 <= first < end <= self.count:
            raise ValueError(f"invalid segment range {first}..{end} of {self.count}")
        return self.span(first)[0], self.span(end - 1)[1]

    def plaintext_offset(self, index: int) -> int:
        self._check(index)
        return index * self.segment_size

    def plaintext_length(self, index: int) -> int:
        start, end = self.span(index)
        return end - start - TAG_SIZE

    def is_last(self, index: int) -> bool:
        return index == self.count - 1

    def batches(self, segments_per_batch: int) -> list[tuple[int, int]]:
        """Consecutive ``(first, last)`` segment indices (inclusive) covering every segment, in order."""
        if segments_per_batch < 1:
            raise ValueError("a batch needs at least one segment")
        return [
            (first, min(first + segments_per_batch, self.count) - 1)
            for first in range(0, self.count, segments_per_batch)
        ]

    def _check(self, index: int) -> None:
        if not 0 <= index < self.count:
            raise ValueError(f"segment {index} is not one of the {self.count} segments")
