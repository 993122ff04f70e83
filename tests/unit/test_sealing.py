"""The sealed format v1 (docs/sealed-format.md): round trips, layout, known answers, every tampering."""

from __future__ import annotations

import hashlib
import io
import os
import struct
import tracemalloc
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from lib.digest import sha256_file, sha256_stream
from lib.errors import IntegrityError
from lib.sealed import format as sealing
from lib.sealed.format import (
    DEFAULT_SEGMENT_SIZE,
    HEADER_SIZE,
    KEY_SIZE,
    JoinedReader,
    generate_key,
    open_file,
    open_stream,
    seal_file,
    seal_stream,
    sealed_size,
    split_file,
    split_point,
)

# Crypto timings vary with machine load; a deadline would make these tests flaky, not stricter.
# Applied per test rather than as a loaded profile, which would change every other test module too.
fuzz = settings(deadline=None, max_examples=100, suppress_health_check=[HealthCheck.too_slow])

KEY = bytes(range(KEY_SIZE))
TAG = 16

segment_sizes = st.integers(min_value=16, max_value=4096)


@st.composite
def plaintexts(draw: st.DrawFn) -> tuple[bytes, int]:
    """A segment size and a plaintext whose length favours the edges: 0, 1, k*s and k*s ± 1."""
    segment_size = draw(segment_sizes)
    k = draw(st.integers(min_value=0, max_value=4))
    edge = max(0, k * segment_size + draw(st.sampled_from([-1, 0, 1])))
    anywhere = st.integers(min_value=0, max_value=5 * segment_size)
    length = draw(st.one_of(st.sampled_from([0, 1, edge]), anywhere))
    return draw(st.binary(min_size=length, max_size=length)), segment_size


def seal(data: bytes, segment_size: int, key: bytes = KEY) -> bytes:
    out = io.BytesIO()
    seal_stream(io.BytesIO(data), out, key, segment_size=segment_size)
    return out.getvalue()


def unseal(sealed: bytes, key: bytes = KEY) -> bytes:
    out = io.BytesIO()
    n = open_stream(io.BytesIO(sealed), out, key)
    assert n == len(out.getvalue())
    return out.getvalue()


def segments_of(sealed: bytes, segment_size: int) -> list[bytes]:
    body = sealed[HEADER_SIZE:]
    step = segment_size + TAG
    return [body[i : i + step] for i in range(0, len(body), step)]


# --- round trips and layout -------------------------------------------------------------------


@fuzz
@given(plaintexts())
def test_round_trip(case: tuple[bytes, int]) -> None:
    data, segment_size = case
    sealed = seal(data, segment_size)
    assert len(sealed) == sealed_size(len(data), segment_size)
    assert unseal(sealed) == data


@fuzz
@given(plaintexts())
def test_header_layout(case: tuple[bytes, int]) -> None:
    data, segment_size = case
    sealed = seal(data, segment_size)
    assert sealed[:8] == b"SEALSRV1"
    assert sealed[8] == 0x01
    assert struct.unpack(">I", sealed[9:13])[0] == segment_size
    segments = segments_of(sealed, segment_size)
    # One segment per started block, a single empty one for an empty file, never a trailing empty one.
    assert len(segments) == max(1, -(-len(data) // segment_size))
    assert all(len(s) == segment_size + TAG for s in segments[:-1])
    last_plaintext = len(data) - segment_size * (len(segments) - 1)
    assert len(segments[-1]) == last_plaintext + TAG
    assert last_plaintext > 0 or not data


def test_sealed_size_examples() -> None:
    assert sealed_size(0, 16) == HEADER_SIZE + TAG
    assert sealed_size(16, 16) == HEADER_SIZE + 16 + TAG
    assert sealed_size(17, 16) == HEADER_SIZE + 17 + 2 * TAG
    assert sealed_size(3 << 20) == HEADER_SIZE + (3 << 20) + 3 * TAG
    assert DEFAULT_SEGMENT_SIZE == 1 << 20 and HEADER_SIZE == 52
    with pytest.raises(ValueError):
        sealed_size(-1)
    with pytest.raises(ValueError):
        sealed_size(10, 0)


def test_two_seals_of_the_same_data_differ() -> None:
    data = b"the same weights" * 100
    a, b = seal(data, 64), seal(data, 64)
    assert a[13:45] != b[13:45]  # salt
    assert a[45:52] != b[45:52]  # nonce prefix
    assert a[HEADER_SIZE:] != b[HEADER_SIZE:]
    assert unseal(a) == unseal(b) == data


def test_generate_key_is_random_and_sized() -> None:
    keys = {generate_key() for _ in range(8)}
    assert len(keys) == 8 and all(len(k) == KEY_SIZE for k in keys)


def test_bad_key_length_is_rejected_without_echoing_it() -> None:
    with pytest.raises(ValueError) as info:
        seal_stream(io.BytesIO(b"x"), io.BytesIO(), b"k" * 31)
    assert "kkkk" not in str(info.value)
    with pytest.raises(ValueError):
        open_stream(io.BytesIO(seal(b"x", 16)), io.BytesIO(), b"k" * 33)


class Trickle:
    """A source that returns at most a few bytes per read, as sockets and raw streams may."""

    def __init__(self, data: bytes, step: int) -> None:
        self._f, self._step = io.BytesIO(data), step

    def read(self, size: int = -1, /) -> bytes:
        return self._f.read(self._step if size < 0 else min(size, self._step))


@fuzz
@given(plaintexts(), st.integers(min_value=1, max_value=50))
def test_short_reads_are_handled(case: tuple[bytes, int], step: int) -> None:
    data, segment_size = case
    out = io.BytesIO()
    seal_stream(Trickle(data, step), out, KEY, segment_size=segment_size)
    plain = io.BytesIO()
    open_stream(Trickle(out.getvalue(), step), plain, KEY)
    assert plain.getvalue() == data


# --- known answer: the format cannot drift from the spec --------------------------------------


def independent_seal(data: bytes, key: bytes, salt: bytes, prefix: bytes, segment_size: int) -> bytes:
    """docs/sealed-format.md §2-3 written out again, without lib.sealed.format."""
    header = b"SEALSRV1" + b"\x01" + segment_size.to_bytes(4, "big") + salt + prefix
    assert len(header) == 52
    seg_key = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=b"sealserve/v1" + header).derive(key)
    aead = AESGCM(seg_key)
    chunks = [data[i : i + segment_size] for i in range(0, len(data), segment_size)] or [b""]
    body = b""
    for i, chunk in enumerate(chunks):
        nonce = prefix + i.to_bytes(4, "big") + (b"\x01" if i == len(chunks) - 1 else b"\x00")
        body += aead.encrypt(nonce, chunk, None)
    return header + body


SALT = bytes(range(100, 132))
PREFIX = bytes.fromhex("a1b2c3d4e5f607")


@pytest.mark.parametrize("length", [0, 1, 63, 64, 65, 200])
def test_known_answer_matches_independent_computation(length: int) -> None:
    data = bytes((7 * i) % 251 for i in range(length))
    out = io.BytesIO()
    seal_stream(io.BytesIO(data), out, KEY, segment_size=64, salt=SALT, nonce_prefix=PREFIX)
    assert out.getvalue() == independent_seal(data, KEY, SALT, PREFIX, 64)


def test_known_answer_frozen_vector() -> None:
    # Frozen once from the spec-derived computation above, so a change to both sides still shows.
    data = b"sealserve known answer test vector, version 1." * 3
    out = io.BytesIO()
    seal_stream(io.BytesIO(data), out, KEY, segment_size=64, salt=SALT, nonce_prefix=PREFIX)
    assert len(out.getvalue()) == 238
    assert hashlib.sha256(out.getvalue()).hexdigest() == (
        "ff0a398e41b9892dfd4366956195b67114398aa058a3b5e065424e593b04cdd5"
    )


# --- tampering: every change is an IntegrityError ---------------------------------------------


def assert_rejected(sealed: bytes, key: bytes = KEY, match: str | None = None) -> None:
    with pytest.raises(IntegrityError, match=match) as info:
        unseal(sealed, key)
    assert key.hex() not in info.value.message


@fuzz
@given(plaintexts(), st.data())
def test_any_flipped_bit_is_rejected(case: tuple[bytes, int], data: st.DataObject) -> None:
    plain, segment_size = case
    sealed = bytearray(seal(plain, segment_size))
    bit = data.draw(st.integers(min_value=0, max_value=len(sealed) * 8 - 1), label="bit")
    sealed[bit // 8] ^= 1 << (bit % 8)
    assert_rejected(bytes(sealed))


@fuzz
@given(plaintexts(), st.data())
def test_any_truncation_is_rejected(case: tuple[bytes, int], data: st.DataObject) -> None:
    plain, segment_size = case
    sealed = seal(plain, segment_size)
    cut = data.draw(st.integers(min_value=0, max_value=len(sealed) - 1), label="cut")
    assert_rejected(sealed[:cut])


@fuzz
@given(plaintexts())
def test_dropping_the_final_segment_is_rejected(case: tuple[bytes, int]) -> None:
    plain, segment_size = case
    sealed = seal(plain, segment_size)
    segments = segments_of(sealed, segment_size)
    assume(len(segments) >= 2)
    assert_rejected(sealed[:HEADER_SIZE] + b"".join(segments[:-1]))


@fuzz
@given(plaintexts(), st.data())
def test_swapped_segments_are_rejected(case: tuple[bytes, int], data: st.DataObject) -> None:
    plain, segment_size = case
    sealed = seal(plain, segment_size)
    segments = segments_of(sealed, segment_size)
    assume(len(segments) >= 2)
    i, j = data.draw(
        st.lists(st.integers(0, len(segments) - 1), min_size=2, max_size=2, unique=True), label="i, j"
    )
    segments[i], segments[j] = segments[j], segments[i]
    assert_rejected(sealed[:HEADER_SIZE] + b"".join(segments))


@fuzz
@given(plaintexts(), st.binary(min_size=1, max_size=200))
def test_trailing_bytes_are_rejected(case: tuple[bytes, int], extra: bytes) -> None:
    plain, segment_size = case
    assert_rejected(seal(plain, segment_size) + extra)


@fuzz
@given(plaintexts())
def test_appending_a_copy_of_the_last_segment_is_rejected(case: tuple[bytes, int]) -> None:
    plain, segment_size = case
    sealed = seal(plain, segment_size)
    assert_rejected(sealed + segments_of(sealed, segment_size)[-1])


@fuzz
@given(plaintexts(), st.binary(min_size=KEY_SIZE, max_size=KEY_SIZE))
def test_wrong_key_is_rejected(case: tuple[bytes, int], other: bytes) -> None:
    assume(other != KEY)
    plain, segment_size = case
    assert_rejected(seal(plain, segment_size), key=other)


def test_header_only_and_bad_magic_and_version_are_rejected() -> None:
    sealed = seal(b"hello world", 16)
    assert_rejected(sealed[:HEADER_SIZE])
    # The header is authenticated through HKDF anyway; the early checks are for a useful message.
    assert_rejected(b"NOTSEALD" + sealed[8:], match="magic")
    assert_rejected(sealed[:8] + b"\x02" + sealed[9:], match="version 2")
    assert_rejected(sealed[:9] + (0).to_bytes(4, "big") + sealed[13:], match="segment size 0")
    assert_rejected(sealed[:9] + (1 << 31).to_bytes(4, "big") + sealed[13:], match="segment size")
    assert_rejected(b"", match="header")


def test_splicing_segments_from_another_seal_under_the_same_key_is_rejected() -> None:
    data = os.urandom(100)
    a, b = seal(data, 32), seal(data, 32)
    assert_rejected(a[:HEADER_SIZE] + b[HEADER_SIZE:])
    sa, sb = segments_of(a, 32), segments_of(b, 32)
    assert_rejected(a[:HEADER_SIZE] + sa[0] + sb[1] + b"".join(sa[2:]))


def test_empty_final_segment_after_data_is_rejected() -> None:
    # Only a key holder can build this, but the format allows an empty segment only for an empty file.
    header = b"SEALSRV1\x01" + (16).to_bytes(4, "big") + SALT + PREFIX
    seg_key = HKDF(algorithm=hashes.SHA256(), length=32, salt=SALT, info=b"sealserve/v1" + header).derive(KEY)
    aead = AESGCM(seg_key)
    body = aead.encrypt(PREFIX + (0).to_bytes(4, "big") + b"\x00", b"x" * 16, None)
    body += aead.encrypt(PREFIX + (1).to_bytes(4, "big") + b"\x01", b"", None)
    assert_rejected(header + body)


def test_segment_counter_cannot_wrap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sealing, "MAX_SEGMENTS", 3)
    sealed = seal(b"x" * 48, 16)
    assert unseal(sealed) == b"x" * 48
    with pytest.raises(ValueError):
        seal(b"x" * 49, 16)
    monkeypatch.setattr(sealing, "MAX_SEGMENTS", 2)
    assert_rejected(sealed)


# --- bounded memory ---------------------------------------------------------------------------


class Zeros:
    """A source of ``size`` zero bytes that never holds them all."""

    def __init__(self, size: int) -> None:
        self._left = size

    def read(self, size: int = -1, /) -> bytes:
        n = self._left if size < 0 else min(size, self._left)
        self._left -= n
        return bytes(n)


class Sink:
    def __init__(self) -> None:
        self.total = 0

    def write(self, data: bytes, /) -> int:
        self.total += len(data)
        return len(data)


def test_sealing_and_opening_hold_a_few_segments_not_the_file() -> None:
    segment_size, total = 64 * 1024, 16 * 1024 * 1024
    sealed = io.BytesIO()
    seal_stream(Zeros(total), sealed, KEY, segment_size=segment_size)
    sealed.seek(0)

    tracemalloc.start()
    try:
        sink = Sink()
        seal_stream(Zeros(total), sink, KEY, segment_size=segment_size)
        _, seal_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        opened = Sink()
        open_stream(sealed, opened, KEY)
        _, open_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sink.total == sealed_size(total, segment_size) and opened.total == total
    assert seal_peak < 6 * segment_size, seal_peak
    assert open_peak < 6 * segment_size, open_peak


# --- files: atomic output ---------------------------------------------------------------------


def test_seal_file_and_open_file_round_trip(tmp_path: Path) -> None:
    data = os.urandom(5000)
    (tmp_path / "model.bin").write_bytes(data)
    n = seal_file(tmp_path / "model.bin", tmp_path / "model.sealed", KEY, segment_size=1024)
    assert n == (tmp_path / "model.sealed").stat().st_size == sealed_size(5000, 1024)
    assert open_file(tmp_path / "model.sealed", tmp_path / "out.bin", KEY) == 5000
    assert (tmp_path / "out.bin").read_bytes() == data
    assert sha256_file(tmp_path / "out.bin") == hashlib.sha256(data).hexdigest()
    assert sha256_stream(io.BytesIO(data)) == hashlib.sha256(data).hexdigest()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin", "model.sealed", "out.bin"]


@pytest.mark.parametrize("tamper", ["flip", "truncate", "wrong_key"])
def test_open_file_failure_leaves_no_output_and_no_temp_file(tmp_path: Path, tamper: str) -> None:
    src = tmp_path / "m.sealed"
    sealed = bytearray(seal(os.urandom(3000), 256))
    key = KEY
    if tamper == "flip":
        sealed[-1] ^= 0x80  # the final tag: every earlier segment verifies and is written first
    elif tamper == "truncate":
        del sealed[-TAG:]
    else:
        key = generate_key()
    src.write_bytes(bytes(sealed))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(IntegrityError):
        open_file(src, out_dir / "model.bin", key)
    assert list(out_dir.iterdir()) == []

    (out_dir / "model.bin").write_bytes(b"previous contents")
    with pytest.raises(IntegrityError):
        open_file(src, out_dir / "model.bin", key)
    assert [p.name for p in out_dir.iterdir()] == ["model.bin"]
    assert (out_dir / "model.bin").read_bytes() == b"previous contents"


def test_seal_file_failure_leaves_no_output(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        seal_file(tmp_path / "missing", tmp_path / "out.sealed", KEY)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "in").write_bytes(b"abc")
    with pytest.raises(ValueError):
        seal_file(tmp_path / "in", tmp_path / "out.sealed", KEY, segment_size=0)
    assert [p.name for p in tmp_path.iterdir()] == ["in"]


# --- split and join ---------------------------------------------------------------------------


def test_split_point_rule() -> None:
    assert split_point(1000, 64) == 200  # 20 % wins for small files
    assert split_point(10_000_000, 64) == 64 * 1024  # the configured size wins for large ones
    assert split_point(0, 64) == 0
    assert split_point(999, 1) == 199  # 20 % rounds down


@settings(fuzz, max_examples=30)
@given(plaintexts(), st.integers(min_value=0, max_value=8))
def test_split_and_join_round_trip(
    tmp_path_factory: pytest.TempPathFactory, case: tuple[bytes, int], kb: int
) -> None:
    data, segment_size = case
    d = tmp_path_factory.mktemp("split")
    sealed = seal(data, segment_size)
    (d / "m.sealed").write_bytes(sealed)
    small, big = split_file(d / "m.sealed", d / "small", d / "big", kb)
    assert small == split_point(len(sealed), kb) and small + big == len(sealed)
    assert (d / "small").read_bytes() + (d / "big").read_bytes() == sealed
    with (d / "small").open("rb") as s, (d / "big").open("rb") as b:
        out = io.BytesIO()
        assert open_stream(JoinedReader([s, b]), out, KEY) == len(data)
    assert out.getvalue() == data


@fuzz
@given(st.lists(st.binary(max_size=50), max_size=6), st.integers(min_value=1, max_value=64))
def test_joined_reader_reads_parts_as_one(parts: list[bytes], n: int) -> None:
    reader = JoinedReader([io.BytesIO(p) for p in parts])
    assert reader.read(0) == b""
    got = b""
    while chunk := reader.read(n):
        assert len(chunk) <= n
        got += chunk
    assert got == b"".join(parts)
    assert JoinedReader([io.BytesIO(p) for p in parts]).read() == b"".join(parts)


def test_joined_parts_in_the_wrong_order_are_rejected() -> None:
    sealed = seal(os.urandom(4000), 512)
    cut = split_point(len(sealed), 1)
    with pytest.raises(IntegrityError):
        open_stream(JoinedReader([io.BytesIO(sealed[cut:]), io.BytesIO(sealed[:cut])]), io.BytesIO(), KEY)
