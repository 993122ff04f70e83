"""Streamed sealed fetches (docs/sealed-models.md): layout, verified plaintext file, resume, head start.

The rules under test: plaintext reaches the cache only as verified segments, in a hidden 0600
temp file; nothing appears under a final name before every segment verified and the SHA-256
matched; any failure leaves nothing behind; a dropped connection resumes at the first segment not
yet written, with bounded retries; memory is a few segments whatever the model size. The fakes
are those of ``test_sealed_cache`` (real sealed bytes, real key wrap, S3 answers from memory).
"""

from __future__ import annotations

import hashlib
import io
import itertools
import os
import random
import stat
import threading
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lib.errors import IntegrityError, NotFoundError, UpstreamError
from lib.retry import RetryPolicy
from lib.sealed.fetch import FetchOutcome, SealedFetcher, SealedRef, TransferPlan
from lib.sealed.format import (
    HEADER_SIZE,
    TAG_SIZE,
    SegmentOpener,
    generate_key,
    parse_header,
    seal_stream,
)
from lib.sealed.layout import SealedLayout
from lib.sealed.plaintext import HASH_CHUNK, PlaintextFile
from lib.sealed.stream import LENT_BUFFERS
from lib.sealed.wire import ResourceManifest
from tests.unit.test_sealed_cache import FINGERPRINT, FOLDER, FakeCdn, FakeStore, all_names, payload

SEGMENT = 4096
STRIDE = SEGMENT + TAG_SIZE
SMALL = 1024  # small_size_kb=1: the big part starts at sealed offset 1024, inside segment 0
NO_WAIT = RetryPolicy(attempts=3, base_delay=0.0, max_delay=0.0)
HANG_GUARD_S = 30.0


def sealed_bytes(plaintext: bytes, segment_size: int, key: bytes) -> bytes:
    out = io.BytesIO()
    seal_stream(io.BytesIO(plaintext), out, key, segment_size=segment_size)
    return out.getvalue()


# -- SealedLayout ----------------------------------------------------------------------------------


@settings(deadline=None, max_examples=60)
@given(
    size=st.integers(min_value=0, max_value=9000),
    segment_size=st.sampled_from([1, 17, 512, 4096]),
    order=st.randoms(use_true_random=False),
)
def test_layout_finds_every_segment_where_seal_stream_put_it(
    size: int, segment_size: int, order: random.Random
) -> None:
    key, plaintext = generate_key(), payload(size, seed=size)
    sealed = sealed_bytes(plaintext, segment_size, key)
    layout = SealedLayout.of(segment_size, len(sealed))
    opener = SegmentOpener(key, parse_header(sealed))
    assert layout.count == max(1, -(-size // segment_size))
    assert layout.plaintext_size == size

    out = bytearray(size)
    indices = list(range(layout.count))
    order.shuffle(indices)  # any order: each segment knows its position and whether it is last
    for index in indices:
        start, end = layout.span(index)
        plain = bytearray(layout.plaintext_length(index))
        n = opener.open_into(index, layout.is_last(index), memoryview(sealed)[start:end], plain)
        offset = layout.plaintext_offset(index)
        out[offset : offset + n] = plain
    assert bytes(out) == plaintext


@pytest.mark.parametrize(
    ("sealed_size", "message"),
    [
        (HEADER_SIZE - 1, "incomplete header"),
        (HEADER_SIZE, "segment 0 is shorter than its tag"),
        (HEADER_SIZE + TAG_SIZE - 1, "segment 0 is shorter than its tag"),
        (HEADER_SIZE + STRIDE + 5, "segment 1 is shorter than its tag"),
        (HEADER_SIZE + STRIDE + TAG_SIZE, "empty segment after data"),
    ],
)
def test_layout_refuses_sizes_no_sealed_file_has(sealed_size: int, message: str) -> None:
    with pytest.raises(IntegrityError, match=message):
        SealedLayout.of(SEGMENT, sealed_size)


def test_layout_refuses_an_unsupported_segment_size() -> None:
    with pytest.raises(IntegrityError, match="unsupported segment size"):
        SealedLayout.of(0, 1000)


@pytest.mark.parametrize("change", ["drop the final segment", "append a tag's worth", "cut one byte"])
def test_a_wrong_sealed_size_moves_the_last_flag_and_fails(change: str) -> None:
    key = generate_key()
    sealed = sealed_bytes(payload(3 * SEGMENT), SEGMENT, key)  # three full segments
    if change == "drop the final segment":
        sealed = sealed[:-STRIDE]
    elif change == "append a tag's worth":
        sealed += bytes(STRIDE)
    else:
        sealed = sealed[:-1]
    layout = SealedLayout.of(SEGMENT, len(sealed))
    opener = SegmentOpener(key, parse_header(sealed))
    with pytest.raises(IntegrityError, match="failed verification"):
        for index in range(layout.count):
            start, end = layout.span(index)
            out = bytearray(end - start - TAG_SIZE)
            opener.open_into(index, layout.is_last(index), sealed[start:end], out)


def test_layout_batches_cover_every_segment_once_in_order() -> None:
    layout = SealedLayout.of(SEGMENT, HEADER_SIZE + 10 * STRIDE)
    assert layout.batches(3) == [(0, 2), (3, 5), (6, 8), (9, 9)]
    assert layout.batches(100) == [(0, 9)]
    assert layout.spans(3, 6) == (HEADER_SIZE + 3 * STRIDE, HEADER_SIZE + 6 * STRIDE)
    with pytest.raises(ValueError):
        layout.batches(0)


def test_the_opener_refuses_a_segment_at_another_position_or_with_another_last_flag() -> None:
    key = generate_key()
    sealed = sealed_bytes(payload(2 * SEGMENT), SEGMENT, key)
    layout = SealedLayout.of(SEGMENT, len(sealed))
    opener = SegmentOpener(key, parse_header(sealed))
    first = sealed[slice(*layout.span(0))]
    out = bytearray(SEGMENT)
    with pytest.raises(IntegrityError, match="segment 1"):
        opener.open_into(1, False, first, out)
    with pytest.raises(IntegrityError, match="segment 0"):
        opener.open_into(0, True, first, out)
    assert opener.open_into(0, False, first, out) == SEGMENT


# -- PlaintextFile ---------------------------------------------------------------------------------


def test_segments_written_in_any_order_from_several_threads_hash_to_the_plaintext(tmp_path: Path) -> None:
    plaintext = payload(10 * SEGMENT + 123)
    layout = SealedLayout.of(SEGMENT, HEADER_SIZE + len(plaintext) + 11 * TAG_SIZE)
    indices = list(range(layout.count))
    random.Random(7).shuffle(indices)
    with PlaintextFile(tmp_path, layout, name_hint="m") as out:
        assert out.path.name.startswith(".m.") and out.path.name.endswith(".part")
        assert stat.S_IMODE(out.path.stat().st_mode) == 0o600

        def write(chunk: list[int]) -> None:
            for index in chunk:
                offset = layout.plaintext_offset(index)
                out.write(index, plaintext[offset : offset + layout.plaintext_length(index)])

        threads = [threading.Thread(target=write, args=(indices[i::3],)) for i in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(HANG_GUARD_S)
        assert out.digest() == hashlib.sha256(plaintext).hexdigest()
        final = out.publish(tmp_path / "model.bin")
    assert final.read_bytes() == plaintext
    assert all_names(tmp_path) == ["model.bin"]


def test_nothing_is_published_before_the_digest(tmp_path: Path) -> None:
    layout = SealedLayout.of(SEGMENT, HEADER_SIZE + 2 * STRIDE)
    with PlaintextFile(tmp_path, layout) as out:
        out.write(0, bytes(SEGMENT))
        with pytest.raises(ValueError, match="incomplete"):
            out.digest()
        with pytest.raises(ValueError, match="before digest"):
            out.publish(tmp_path / "final")
        with pytest.raises(ValueError, match="written twice"):
            out.write(0, bytes(SEGMENT))
        with pytest.raises(ValueError, match="bytes, expected"):
            out.write(1, bytes(SEGMENT - 1))
    assert all_names(tmp_path) == []


def test_discard_stops_the_hashing_and_removes_the_file(tmp_path: Path) -> None:
    layout = SealedLayout.of(SEGMENT, HEADER_SIZE + 4 * STRIDE)
    out = PlaintextFile(tmp_path, layout)
    out.write(0, bytes(SEGMENT))
    out.discard()
    out.discard()  # idempotent
    assert all_names(tmp_path) == []
    assert not out._thread.is_alive()


def test_an_empty_plaintext_has_the_empty_digest(tmp_path: Path) -> None:
    layout = SealedLayout.of(SEGMENT, HEADER_SIZE + TAG_SIZE)
    with PlaintextFile(tmp_path, layout) as out:
        out.write(0, b"")
        assert out.digest() == hashlib.sha256(b"").hexdigest()


# -- streamed fetches ------------------------------------------------------------------------------


@pytest.fixture
def store() -> FakeStore:
    return FakeStore()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "cache"
    path.mkdir(mode=0o700)
    return path


SINGLE = TransferPlan(retry=NO_WAIT)
RANGED = TransferPlan(single_get_max_bytes=0, range_bytes=3 * STRIDE, workers=3, retry=NO_WAIT)


def fetcher_for(
    store: FakeStore, plan: TransferPlan = SINGLE, sleeps: list[float] | None = None
) -> SealedFetcher:
    return SealedFetcher(store, fingerprint=FINGERPRINT, cdn_factory=lambda config: FakeCdn(store), plan=plan,
                         sleep=(sleeps if sleeps is not None else []).append)


def publish(
    store: FakeStore, name: str = "model.bin", size: int = 10 * SEGMENT + 100, **options: Any
) -> bytes:
    plaintext = payload(size, seed=len(name))
    store.publish(name, plaintext, segment_size=SEGMENT, small_size_kb=1, **options)
    return plaintext


def big_offset(index: int) -> int:
    """Where segment ``index`` starts in the big part (the small part holds the first 1024 bytes)."""
    return HEADER_SIZE + index * STRIDE - SMALL


def fetch(store: FakeStore, root: Path, plan: TransferPlan = SINGLE, name: str = "model.bin",
          hint: ResourceManifest | None = None, sleeps: list[float] | None = None) -> FetchOutcome:
    return fetcher_for(store, plan, sleeps).fetch(SealedRef(FOLDER, name), root, hint=hint)


@pytest.mark.parametrize("plan", [SINGLE, RANGED], ids=["one GET", "ranged GETs"])
@pytest.mark.parametrize("is_directory", [False, True], ids=["file", "directory"])
def test_nothing_but_hidden_temp_files_exist_until_the_fetch_returns(
    store: FakeStore, root: Path, plan: TransferPlan, is_directory: bool
) -> None:
    from tests.unit.test_sealed_cache import make_tar

    plaintext = make_tar({"w.bin": payload(40_000)}) if is_directory else payload(40_000)
    store.publish("model.bin", plaintext, segment_size=SEGMENT, small_size_kb=1, is_directory=is_directory)
    looks: list[list[str]] = []

    def look() -> None:
        names = all_names(root)
        for name in names:
            assert name.startswith(".") and name.endswith(".part"), name
            assert stat.S_IMODE((root / name).stat().st_mode) == 0o600
        looks.append(names)

    store.on_read = look
    outcome = fetch(store, root, plan)

    assert len(looks) >= 9 and all(len(names) == 1 for names in looks)  # the one hidden file, throughout
    assert all_names(root) == [outcome.path.name]
    if not is_directory:
        assert outcome.path.read_bytes() == plaintext


def test_a_tampered_last_segment_is_never_visible_under_the_final_name(
    store: FakeStore, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    publish(store)
    store.flip_big_bit("model.bin", -1)  # the final tag: every earlier segment verifies first
    final = root / f"{store.resources[(FOLDER, 'model.bin')].manifest['id']}.{FOLDER}.model.bin"
    renamed: list[str] = []
    written: list[int] = []
    for name in ("rename", "replace"):
        real = getattr(os, name)

        def record(src: Any, dst: Any, *args: Any, _real: Callable[..., Any] = real, **kw: Any) -> None:
            renamed.append(str(dst))
            _real(src, dst, *args, **kw)

        monkeypatch.setattr(os, name, record)
    real_write = PlaintextFile.write
    def record_write(self: PlaintextFile, index: int, data: Any, **kw: Any) -> None:
        written.append(index)
        real_write(self, index, data, **kw)

    monkeypatch.setattr(PlaintextFile, "write", record_write)
    store.on_read = lambda: assert_absent(final)

    with pytest.raises(IntegrityError, match="segment 10"):
        fetch(store, root)

    assert renamed == []
    assert written == list(range(10))  # the last segment's unverified plaintext never reached the file
    assert all_names(root) == []


def assert_absent(path: Path) -> None:
    assert not path.exists()


def test_a_digest_that_is_not_the_id_publishes_nothing(store: FakeStore, root: Path) -> None:
    publish(store)
    manifest = store.resources[(FOLDER, "model.bin")].manifest
    store.tamper("model.bin", manifest={**manifest, "id": "0" * 64})
    with pytest.raises(IntegrityError, match="does not match its id"):
        fetch(store, root)
    assert all_names(root) == []


@pytest.mark.parametrize("plan", [SINGLE, RANGED], ids=["one GET", "ranged GETs"])
def test_a_failure_mid_stream_leaves_nothing_under_the_cache_root(
    store: FakeStore, root: Path, plan: TransferPlan
) -> None:
    publish(store)
    store.cuts = [5000] * 10  # every answer breaks off inside its second segment's worth
    store.cuts_at[big_offset(1)] = [0] * 10  # ...and from there on at once: no progress
    store.cuts_at[big_offset(3)] = [0] * 10
    sleeps: list[float] = []

    with pytest.raises(UpstreamError, match=r"gave up after 3 attempts .* at segment") as info:
        fetch(store, root, plan, sleeps=sleeps)

    assert "s3://big-parts/" in info.value.message and "ConnectionResetError" in info.value.message
    assert all_names(root) == []
    assert all(stream.closed for stream in store.streams)
    assert len(sleeps) >= 2


def test_the_sink_failing_mid_stream_leaves_nothing(
    store: FakeStore, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    publish(store)
    real_write = PlaintextFile.write

    def full_after_three(self: PlaintextFile, index: int, data: Any, **kw: Any) -> None:
        if index == 3:
            raise OSError(28, "No space left on device")
        real_write(self, index, data, **kw)

    monkeypatch.setattr(PlaintextFile, "write", full_after_three)
    with pytest.raises(OSError, match="No space"):
        fetch(store, root)
    assert all_names(root) == []


def test_a_dropped_connection_resumes_at_the_first_unwritten_segment(store: FakeStore, root: Path) -> None:
    plaintext = publish(store)
    cut = big_offset(2) + 1000  # segments 0 and 1 arrived whole, segment 2 in part
    store.cuts = [cut]
    sleeps: list[float] = []

    outcome = fetch(store, root, sleeps=sleeps)

    assert outcome.path.read_bytes() == plaintext
    (key, first, last, whole, if_match), (key2, first2, last2, whole2, if_match2) = store.requests
    big_size = len(store.objects[key])
    assert (first, last, whole, if_match) == (0, big_size - 1, True, None)  # one plain GET
    assert (key2, first2, last2, whole2) == (key, big_offset(2), big_size - 1, False)  # from segment 2 on
    assert if_match2 == store.streams[0].etag  # and only from the same object
    assert outcome.details["resumes"] == 1 and outcome.details["requests"] == 2
    assert len(sleeps) == 1


def test_retries_are_bounded_per_run_of_failures_not_per_fetch(store: FakeStore, root: Path) -> None:
    plaintext = publish(store)
    # Five drops, each after one more whole segment: more drops than attempts, but never two
    # without a verified segment in between, so the fetch goes on.
    store.cuts = [big_offset(1) + 10] + [STRIDE + 10] * 4
    outcome = fetch(store, root)
    assert outcome.path.read_bytes() == plaintext
    assert outcome.details["resumes"] == 5
    assert [r[1] for r in store.requests] == [0] + [big_offset(i) for i in range(1, 6)]


def test_ranged_fetch_asks_for_whole_segments_in_order_and_assembles_them(
    store: FakeStore, root: Path
) -> None:
    plaintext = publish(store, size=20 * SEGMENT + 7)  # 21 segments: 7 batches of 3
    outcome = fetch(store, root, RANGED)
    assert outcome.path.read_bytes() == plaintext
    spans = sorted((first, last) for _, first, last, _, _ in store.requests)
    big_size = len(store.objects[store.requests[0][0]])
    assert spans[0][0] == 0 and spans[-1][1] == big_size - 1
    assert all(a[1] + 1 == b[0] for a, b in itertools.pairwise(spans))  # no gap, no overlap
    assert [first for first, _ in spans[1:]] == [big_offset(i) for i in range(3, 21, 3)]
    assert outcome.details["workers"] == 3 and outcome.details["requests"] == 7


def test_a_ranged_fetch_resumes_inside_its_range(store: FakeStore, root: Path) -> None:
    plaintext = publish(store, size=20 * SEGMENT)
    store.cuts_at[big_offset(6)] = [STRIDE + 50]  # the third batch breaks in its second segment
    outcome = fetch(store, root, RANGED)
    assert outcome.path.read_bytes() == plaintext
    assert sorted(r[1] for r in store.requests).count(big_offset(7)) == 1  # resumed at segment 7
    assert outcome.details["resumes"] == 1


def test_a_server_that_ignores_range_is_refused(store: FakeStore, root: Path) -> None:
    publish(store, size=20 * SEGMENT)
    store.ignore_range = True
    with pytest.raises(UpstreamError, match="announced"):
        fetch(store, root, RANGED)
    assert all_names(root) == []


def test_an_object_replaced_mid_download_fails_instead_of_mixing(store: FakeStore, root: Path) -> None:
    publish(store)
    key = store.resources[(FOLDER, "model.bin")].manifest["big_key"]
    store.cuts = [big_offset(3)]
    original = store.objects[key]

    def replace_once() -> None:
        if store.objects[key] is original and store.streams[0]._pos > big_offset(2):
            store.objects[key] = bytes(b ^ 0xFF for b in original[:100]) + original[100:]

    store.on_read = replace_once
    with pytest.raises(UpstreamError, match="PreconditionFailed"):
        fetch(store, root)
    assert all_names(root) == []


def test_a_missing_big_part_is_not_found_and_leaves_nothing(store: FakeStore, root: Path) -> None:
    publish(store)
    store.objects.clear()
    with pytest.raises(NotFoundError):
        fetch(store, root)
    assert all_names(root) == []


# -- the head start: the first GET goes out while the key is being released --------------------------


def listed(store: FakeStore, name: str = "model.bin") -> ResourceManifest:
    return ResourceManifest.model_validate(store.resources[(FOLDER, name)].manifest)


def test_the_first_get_is_sent_while_the_key_is_being_released(store: FakeStore, root: Path) -> None:
    plaintext = publish(store)
    requested = threading.Event()
    store.on_read = requested.set  # not expected: the body is read only once the key is there
    sent: list[bool] = []

    def hold_the_release() -> None:
        # The release answers only once the GET went out: a fetch that sent it after the release
        # would hang here (up to the guard) and fail below.
        sent.append(wait_for(lambda: len(store.requests) == 1))
        sent.append(not requested.is_set())

    store.get_gate = hold_the_release
    outcome = fetch(store, root, hint=listed(store))

    assert sent == [True, True]
    assert outcome.path.read_bytes() == plaintext
    assert outcome.details["early_get"] is True
    assert outcome.details["requests"] == 1 and len(store.requests) == 1


def wait_for(condition: Callable[[], bool]) -> bool:
    done = threading.Event()
    deadline = threading.Timer(HANG_GUARD_S, done.set)
    deadline.start()
    try:
        while not condition():
            if done.wait(0.001):
                return False
        return True
    finally:
        deadline.cancel()


def test_a_hint_that_no_longer_matches_is_dropped_unread(store: FakeStore, root: Path) -> None:
    publish(store)
    old = listed(store)
    new_plaintext = payload(7 * SEGMENT, seed=99)
    store.publish("model.bin", new_plaintext, segment_size=SEGMENT, small_size_kb=1)  # republished

    outcome = fetch(store, root, hint=old)

    assert outcome.path.read_bytes() == new_plaintext
    assert outcome.details["early_get"] is False
    assert [r[0] for r in store.requests] == [old.big_key, listed(store).big_key]
    assert store.streams[0].closed and store.streams[0]._pos == 0
    assert all_names(root) == [outcome.path.name]


def test_a_failed_key_release_closes_the_early_get(store: FakeStore, root: Path) -> None:
    publish(store)
    hint = listed(store)
    store.get_error[(FOLDER, "model.bin")] = UpstreamError("resource API unreachable")
    with pytest.raises(UpstreamError, match="resource API"):
        fetch(store, root, hint=hint)
    assert len(store.streams) == 1 and store.streams[0].closed
    assert all_names(root) == []


def test_no_early_get_for_a_version_other_than_the_pinned_one(store: FakeStore, root: Path) -> None:
    publish(store)
    with pytest.raises(IntegrityError, match="pins"):
        fetcher_for(store).fetch(SealedRef(FOLDER, "model.bin", "f" * 64), root, hint=listed(store))
    assert store.requests == []


# -- memory ------------------------------------------------------------------------------------------


def peak_traced(run: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        run()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.fixture
def two_sizes(store: FakeStore) -> Iterator[tuple[int, int]]:
    segment = 32 * 1024
    store.record = False  # the fake's own bookkeeping grows with the number of requests
    for name, size in (("small.bin", 1 << 20), ("large.bin", 16 << 20)):
        store.publish(name, os.urandom(size), segment_size=segment, small_size_kb=64)
    yield segment, 16 << 20


@pytest.mark.parametrize("workers", [1, 3])
def test_memory_is_a_few_segments_per_stream_whatever_the_model_size(
    store: FakeStore, root: Path, two_sizes: tuple[int, int], workers: int
) -> None:
    segment, large = two_sizes
    plan = TransferPlan(single_get_max_bytes=0 if workers > 1 else 1 << 40, range_bytes=4 * segment,
                        workers=workers, retry=NO_WAIT)
    peaks = {}
    for name in ("small.bin", "large.bin"):
        outcome = fetcher_for(store, plan).fetch(SealedRef(FOLDER, name), root)
        outcome.path.unlink()
        # The fake S3 copies each range it serves (up to 4 segments): measured apart from ours.
        peaks[name] = peak_traced(lambda n=name: fetcher_for(store, plan).fetch(SealedRef(FOLDER, n), root))
    fake_copy = 4 * segment if workers > 1 else 0
    # Per stream: a sealed and LENT_BUFFERS plaintext segment buffers (and the fake's copy of its
    # range); per fetch: the hashing thread's read-back buffer (ranges only: one GET lends every
    # segment to it); and some slack for the objects around them (threads, futures, the fake's).
    read_back = HASH_CHUNK if workers > 1 else 0
    bound = workers * ((1 + LENT_BUFFERS) * segment + fake_copy) + read_back + 512 * 1024
    assert bound < large // 4
    assert all(peak < bound for peak in peaks.values()), (peaks, bound)  # the same bound for 1 and 16 MiB


@settings(deadline=None, max_examples=25)
@given(
    size=st.integers(min_value=0, max_value=3000),
    segment_size=st.sampled_from([1, 17, 512, 4096]),
    small_size_kb=st.integers(min_value=0, max_value=2),
    segments_per_range=st.integers(min_value=1, max_value=5),
)
def test_ranged_fetch_round_trips_any_size_segment_split_and_range(
    tmp_path_factory: pytest.TempPathFactory, size: int, segment_size: int, small_size_kb: int,
    segments_per_range: int,
) -> None:
    store = FakeStore()
    plaintext = payload(size, seed=size)
    store.publish("m.bin", plaintext, segment_size=segment_size, small_size_kb=small_size_kb)
    plan = TransferPlan(single_get_max_bytes=0, range_bytes=segments_per_range * (segment_size + TAG_SIZE),
                        workers=3, retry=NO_WAIT)
    root = tmp_path_factory.mktemp("ranged")
    outcome = fetcher_for(store, plan).fetch(SealedRef(FOLDER, "m.bin"), root, hint=listed(store, "m.bin"))
    assert outcome.path.read_bytes() == plaintext
    assert all_names(root) == [outcome.path.name]
    assert all(stream.closed for stream in store.streams)
