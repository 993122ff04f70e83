"""The node side of sealed models (docs/sealed-format.md): fetch, verify, open, unpack, cache once per node.

The fakes stand at the two network boundaries only: ``FakeStore`` plays the resource API (it holds
real sealed small parts, manifests and DEKs made with :mod:`lib.sealed.format`, and wraps each DEK to the
caller's key pair as the real server does) and ``FakeCdn`` plays S3 (it holds the real big parts).
Everything between them, the crypto included, is the production code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import tarfile
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lib.errors import (
    ConfigurationError,
    IntegrityError,
    NotFoundError,
    UpstreamError,
)
from lib.sealed.fetch import SealedFetcher, SealedRef
from lib.sealed.format import generate_key, seal_stream, split_point
from lib.sealed.keywrap import NodeKeyPair, wrap_for_node
from lib.sealed.node_cache import MARKER, SealedModelCache, describe, process_cache_dir
from lib.sealed.resource_client import FetchedResource
from lib.sealed.transfer import TransferError
from lib.sealed.wire import CdnConfig, ResourceManifest
from tests.hostile_archives import symlink_chain_escape

FOLDER = "models"
FINGERPRINT = "0" * 64
# A bound on waiting for helper threads: only a hang guard, never the thing a test asserts.
HANG_GUARD_S = 30.0


# -- the fakes -------------------------------------------------------------------------------------


@dataclass
class Published:
    """One sealed model as the two stores hold it, plus the plaintext it must open to."""

    manifest: dict[str, Any]
    small: bytes
    dek: bytes
    plaintext: bytes


def seal_and_split(
    plaintext: bytes, dek: bytes, *, segment_size: int, small_size_kb: int
) -> tuple[bytes, bytes]:
    sealed = io.BytesIO()
    seal_stream(io.BytesIO(plaintext), sealed, dek, segment_size=segment_size)
    data = sealed.getvalue()
    cut = split_point(len(data), small_size_kb)
    return data[:cut], data[cut:]


class FakeStore:
    """The resource API (``ResourceSource``) and the S3 bucket behind ``FakeCdn``, counting calls."""

    def __init__(self) -> None:
        self.resources: dict[tuple[str, str], Published] = {}
        self.objects: dict[str, bytes] = {}  # S3 key -> big part
        self.calls: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.gets: list[tuple[str, str]] = []
        self.downloads: list[str] = []
        self.keypairs: set[bytes] = set()
        self.get_error: dict[tuple[str, str], Exception] = {}
        self.list_error: Exception | None = None
        self.download_error: Exception | None = None
        # Called inside open_range before any byte is read: lets a test hold a fetch open.
        self.download_gate: Callable[[], None] | None = None
        # (key, first, last, whole object, If-Match) of every GET; the answered streams.
        self.requests: list[tuple[str, int, int, bool, str | None]] = []
        self.streams: list[FakeStream] = []
        # Byte counts after which the next answers' bodies break off, one per answer.
        self.cuts: list[int] = []
        # Per request start offset: byte counts after which its answers break off, one per answer.
        self.cuts_at: dict[int, list[int]] = {}
        # Called before every read of a body: lets a test look at the cache mid-stream.
        self.on_read: Callable[[], None] | None = None
        # Called inside get (the key release) before it answers: lets a test hold it open.
        self.get_gate: Callable[[], None] | None = None
        # A server that ignores Range and always sends the whole object.
        self.ignore_range = False
        # Keep requests and streams for the test to look at (memory tests turn it off).
        self.record = True

    # -- publishing (what `sealserve publish` would do) --

    def publish(
        self,
        name: str,
        plaintext: bytes,
        *,
        folder: str = FOLDER,
        kind: str = "image-classification",
        is_directory: bool = False,
        segment_size: int = 4096,
        small_size_kb: int = 1,
        manifest_overrides: dict[str, Any] | None = None,
    ) -> Published:
        dek = generate_key()
        small, big = seal_and_split(plaintext, dek, segment_size=segment_size, small_size_kb=small_size_kb)
        model_id = hashlib.sha256(plaintext).hexdigest()
        big_key = f"{folder}/{name}/{model_id}.big"
        manifest = ResourceManifest(
            id=model_id,
            name=name,
            kind=kind,
            plaintext_size=len(plaintext),
            sealed_size=len(small) + len(big),
            small_size=len(small),
            big_key=big_key,
            segment_size=segment_size,
            is_directory=is_directory,
        ).model_dump(mode="json")
        manifest.update(manifest_overrides or {})
        published = Published(manifest=manifest, small=small, dek=dek, plaintext=plaintext)
        self.resources[(folder, name)] = published
        self.objects[big_key] = big
        return published

    def tamper(self, name: str, folder: str = FOLDER, **changes: Any) -> None:
        key = (folder, name)
        self.resources[key] = dataclasses.replace(self.resources[key], **changes)

    def flip_big_bit(self, name: str, offset: int, folder: str = FOLDER) -> None:
        big_key = self.resources[(folder, name)].manifest["big_key"]
        data = bytearray(self.objects[big_key])
        data[offset] ^= 0x01
        self.objects[big_key] = bytes(data)

    # -- ResourceSource --

    def get(self, folder: str, name: str, keypair: NodeKeyPair, fingerprint: str) -> FetchedResource:
        self.calls["get"] += 1
        self.gets.append((folder, name))
        self.keypairs.add(keypair.public_bytes())
        if self.get_gate is not None:
            self.get_gate()
        if (folder, name) in self.get_error:
            raise self.get_error[(folder, name)]
        published = self.resources.get((folder, name))
        if published is None:
            raise NotFoundError(f"resource API: {folder}/{name} does not exist")
        # Through a real wrap/unwrap, as the server and ResourceClient.get do: the fetcher must
        # present the same key pair and fingerprint it can open with.
        wrapped = wrap_for_node(published.dek, keypair.public_bytes(), fingerprint, context="dek")
        dek = keypair.unwrap(wrapped, fingerprint, context="dek")
        return FetchedResource(
            manifest=ResourceManifest.model_validate(published.manifest), small_part=published.small, dek=dek
        )

    def list(self, folder: str) -> list[ResourceManifest]:
        self.calls["list"] += 1
        if self.list_error is not None:
            raise self.list_error
        return [
            ResourceManifest.model_validate(p.manifest)
            for (f, _), p in sorted(self.resources.items()) if f == folder
        ]

    def cdn_config(self, keypair: NodeKeyPair, fingerprint: str) -> CdnConfig:
        self.calls["cdn_config"] += 1
        return CdnConfig(bucket="big-parts", access_key_id="reader", secret_access_key="not-a-secret")


class FakeStream:
    """An answered GET over bytes in memory; ``cut_after`` breaks the body there, as a dropped
    connection would (a retryable :class:`TransferError`, what ``S3ObjectStream`` raises)."""

    def __init__(
        self, body: bytes, object_size: int, etag: str, cut_after: int | None,
        on_read: Callable[[], None] | None = None, where: str = "s3://big-parts/?",
    ) -> None:
        self._on_read = on_read
        self._where = where
        self._body = memoryview(body)
        self.length = len(body)
        self.object_size = object_size
        self.etag = etag
        self._cut_after = cut_after
        self._pos = 0
        self.closed = False

    def readinto(self, buffer: memoryview, /) -> int:
        assert not self.closed, "read after close"
        if self._on_read is not None:
            self._on_read()
        end = len(self._body) if self._cut_after is None else min(len(self._body), self._cut_after)
        if self._pos >= end and end < len(self._body):
            # The message S3ObjectStream gives a broken body.
            raise TransferError(f"{self._where}: the body broke off: ConnectionResetError")
        count = min(len(buffer), end - self._pos)
        buffer[:count] = self._body[self._pos : self._pos + count]
        self._pos += count
        return count

    def close(self) -> None:
        self.closed = True
        self._body = memoryview(b"")  # the store keeps its streams: not their bodies


class FakeCdn:
    """``CdnClient.open_range`` over ``FakeStore.objects``: ranges, ETags, If-Match, injected cuts.

    Every request is recorded as (key, first, last, whole object, If-Match); one that starts at
    byte 0 counts as a download, as the S3 test server's proxy counts them.
    """

    def __init__(self, store: FakeStore) -> None:
        self.store = store

    def where(self, key: str) -> str:
        return f"s3://big-parts/{key}"

    def open_range(
        self, key: str, first: int, last: int, *, whole_object: bool = False, if_match: str | None = None
    ) -> FakeStream:
        store = self.store
        with store.lock:  # ranged fetches call from several threads
            if store.record:
                store.requests.append((key, first, last, whole_object, if_match))
            if first == 0:
                store.calls["download"] += 1
                store.downloads.append(key)
            cuts = store.cuts_at.get(first) or store.cuts
            cut = cuts.pop(0) if cuts else None
        if store.download_gate is not None:
            store.download_gate()
        if store.download_error is not None:
            raise store.download_error
        if key not in store.objects:
            raise NotFoundError(f"s3://big-parts/{key} does not exist")
        data = store.objects[key]
        etag = '"' + hashlib.sha256(data).hexdigest()[:16] + '"'
        if if_match is not None and if_match != etag:
            raise UpstreamError(f"S3 GET of s3://big-parts/{key} failed: ClientError PreconditionFailed")
        body = data if whole_object or store.ignore_range else data[first : last + 1]
        stream = FakeStream(body, len(data), etag, cut, store.on_read, self.where(key))
        with store.lock:
            if store.record:
                store.streams.append(stream)
        return stream


class CountingLock:
    """A lock that counts how often it was released, so a test can wait for N threads to pass it.

    ``SealedModelCache.ensure`` decides leader or waiter inside one critical section; once N
    callers have released the lock, all N have decided, with no sleep and no timing involved.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cond = threading.Condition()
        self.releases = 0

    def __enter__(self) -> CountingLock:
        self._lock.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self._lock.release()
        with self._cond:
            self.releases += 1
            self._cond.notify_all()

    def wait_for_releases(self, count: int) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.releases >= count, timeout=HANG_GUARD_S)


# -- helpers ---------------------------------------------------------------------------------------


def make_tar(files: dict[str, bytes]) -> bytes:
    """A deterministic tar of ``files`` (relative path -> content), directories implied."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as archive:
        dirs = sorted({str(Path(p).parent) for p in files} - {"."})
        for d in dirs:
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            archive.addfile(info)
        for path, data in sorted(files.items()):
            info = tarfile.TarInfo(path)
            info.size = len(data)
            info.mode = 0o644
            archive.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def tar_member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "", data: bytes = b"") -> bytes:
    """A one-member tar with exactly the header fields given: used to build hostile archives."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as archive:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.linkname = linkname
        info.mode = 0o644
        info.size = len(data) if kind == tarfile.REGTYPE else 0
        archive.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    return buf.getvalue()


def tree(root: Path) -> dict[str, bytes | None]:
    """Relative path -> content (None for a directory) of everything under ``root``."""
    return {
        str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes())
        for p in sorted(root.rglob("*"))
    }


def payload(size: int, seed: int = 0) -> bytes:
    """Incompressible-looking, reproducible bytes."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


def all_names(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir()) if path.exists() else []


@pytest.fixture
def store() -> FakeStore:
    return FakeStore()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "cache"
    path.mkdir(mode=0o700)
    return path


@pytest.fixture
def fetcher(store: FakeStore) -> SealedFetcher:
    return SealedFetcher(store, fingerprint=FINGERPRINT, cdn_factory=lambda config: FakeCdn(store))


def ref(name: str, pinned: str | None = None) -> SealedRef:
    return SealedRef(FOLDER, name, pinned)


# -- SealedFetcher ---------------------------------------------------------------------------------


def test_fetch_file_model_lands_at_id_and_name_with_the_exact_plaintext(
    store: FakeStore, fetcher: SealedFetcher, root: Path
) -> None:
    plaintext = payload(40_000)  # several 4 KiB segments, split inside the body
    published = store.publish("classifier.safetensors", plaintext)
    model_id = published.manifest["id"]

    outcome = fetcher.fetch(ref("classifier.safetensors"), root)

    # id, folder and name: the suffix stays last, and two names never share one file
    assert outcome.path == root / f"{model_id}.{FOLDER}.classifier.safetensors"
    assert outcome.path.read_bytes() == plaintext
    assert outcome.manifest.id == model_id
    assert outcome.downloaded_bytes == published.manifest["sealed_size"]
    assert outcome.seconds > 0
    assert all_names(root) == [outcome.path.name]  # no .*.part left behind
    assert store.downloads == [published.manifest["big_key"]]
    assert store.calls["get"] == 1


def test_fetch_directory_model_unpacks_the_tree_under_its_id(
    store: FakeStore, fetcher: SealedFetcher, root: Path, tmp_path: Path
) -> None:
    files = {
        "model_index.json": b'{"_class_name": "StableDiffusionPipeline"}',
        "unet/config.json": b"{}",
        "unet/diffusion_pytorch_model.safetensors": payload(30_000, seed=1),
        "vae/diffusion_pytorch_model.safetensors": payload(9_000, seed=2),
    }
    archive = make_tar(files)
    published = store.publish("tiny-sd", archive, kind="text-to-image", is_directory=True)
    model_id = published.manifest["id"]
    assert model_id == hashlib.sha256(archive).hexdigest()

    outcome = fetcher.fetch(ref("tiny-sd"), root)

    assert outcome.path == root / f"{model_id}.{FOLDER}.tiny-sd"
    assert outcome.path.is_dir()
    expected = {path: data for path, data in files.items()}
    expected.update({"unet": None, "vae": None})
    assert tree(outcome.path) == dict(sorted(expected.items()))
    assert all_names(root) == [outcome.path.name]  # neither the tar nor the big part stays


def test_fetch_empty_file_model(store: FakeStore, fetcher: SealedFetcher, root: Path) -> None:
    store.publish("empty.bin", b"")
    outcome = fetcher.fetch(ref("empty.bin"), root)
    assert outcome.path.read_bytes() == b""
    assert outcome.path.name == f"{hashlib.sha256(b'').hexdigest()}.{FOLDER}.empty.bin"


def test_fetcher_asks_for_the_cdn_config_once_and_keeps_one_key_pair(
    store: FakeStore, fetcher: SealedFetcher, root: Path
) -> None:
    store.publish("a.bin", payload(5000, seed=1))
    store.publish("b.bin", payload(5000, seed=2))
    fetcher.fetch(ref("a.bin"), root)
    fetcher.fetch(ref("b.bin"), root)
    assert store.calls["cdn_config"] == 1
    assert len(store.keypairs) == 1


def test_fetcher_list_validates_manifests(store: FakeStore, fetcher: SealedFetcher) -> None:
    published = store.publish("a.bin", payload(100))
    manifests = fetcher.list(FOLDER)
    assert [m.id for m in manifests] == [published.manifest["id"]]
    assert all(isinstance(m, ResourceManifest) for m in manifests)


def _flip_small_body_bit(store: FakeStore, name: str) -> None:
    small = bytearray(store.resources[(FOLDER, name)].small)
    small[-1] ^= 0x80  # inside segment 0, past the 52-byte header
    store.tamper(name, small=bytes(small))


def _flip_small_header_bit(store: FakeStore, name: str) -> None:
    small = bytearray(store.resources[(FOLDER, name)].small)
    small[20] ^= 0x01  # in the salt: authenticated through the HKDF info
    store.tamper(name, small=bytes(small))


def _big_key(store: FakeStore, name: str) -> str:
    return str(store.resources[(FOLDER, name)].manifest["big_key"])


TAMPERINGS: dict[str, Callable[[FakeStore, str], None]] = {
    "big part bit flip (first byte)": lambda s, n: s.flip_big_bit(n, 0),
    "big part bit flip (last tag)": lambda s, n: s.flip_big_bit(n, -1),
    "big part bit flip (middle)": lambda s, n: s.flip_big_bit(n, 20_000),
    "small part bit flip (body)": _flip_small_body_bit,
    "small part bit flip (header salt)": _flip_small_header_bit,
    "wrong DEK": lambda s, n: s.tamper(n, dek=generate_key()),
    "manifest id of other bytes": lambda s, n: s.tamper(
        n, manifest={**s.resources[(FOLDER, n)].manifest, "id": hashlib.sha256(b"other").hexdigest()}
    ),
    "big part truncated": lambda s, n: s.objects.update({_big_key(s, n): s.objects[_big_key(s, n)][:-1]}),
    "big part swapped for another model's": lambda s, n: s.objects.update(
        {_big_key(s, n): s.objects[_big_key(s, "other.bin")]}
    ),
    "small part shorter than the manifest says": lambda s, n: s.tamper(
        n, small=s.resources[(FOLDER, n)].small[:-1]
    ),
}


@pytest.mark.parametrize("tampering", list(TAMPERINGS), ids=list(TAMPERINGS))
@pytest.mark.parametrize("is_directory", [False, True], ids=["file", "directory"])
def test_any_tampering_is_an_integrity_error_and_leaves_nothing(
    store: FakeStore, fetcher: SealedFetcher, root: Path, tampering: str, is_directory: bool
) -> None:
    plaintext = make_tar({"weights.bin": payload(40_000)}) if is_directory else payload(40_000)
    store.publish("model.bin", plaintext, is_directory=is_directory)
    # Same sizes, other key and bytes: its big part fits the size check but not the small part.
    store.publish("other.bin", payload(len(plaintext), seed=9))
    TAMPERINGS[tampering](store, "model.bin")

    with pytest.raises(IntegrityError):
        fetcher.fetch(ref("model.bin"), root)

    assert all_names(root) == []


def test_a_small_part_of_the_wrong_size_is_refused_before_any_download(
    store: FakeStore, fetcher: SealedFetcher, root: Path
) -> None:
    store.publish("model.bin", payload(10_000))
    store.tamper("model.bin", small=store.resources[(FOLDER, "model.bin")].small + b"\0")
    with pytest.raises(IntegrityError, match=r"small part of model\.bin has the wrong size"):
        fetcher.fetch(ref("model.bin"), root)
    assert store.calls["download"] == 0
    assert all_names(root) == []


def test_a_pinned_id_that_differs_is_refused_before_any_download(
    store: FakeStore, fetcher: SealedFetcher, root: Path
) -> None:
    store.publish("model.bin", payload(10_000))
    with pytest.raises(IntegrityError, match="pins"):
        fetcher.fetch(ref("model.bin", pinned="f" * 64), root)
    assert store.calls["download"] == 0
    assert all_names(root) == []


def test_a_pinned_id_that_matches_is_fetched(store: FakeStore, fetcher: SealedFetcher, root: Path) -> None:
    published = store.publish("model.bin", payload(10_000))
    outcome = fetcher.fetch(ref("model.bin", pinned=published.manifest["id"]), root)
    assert outcome.path.read_bytes() == published.plaintext


@pytest.mark.parametrize(
    "error", [UpstreamError("S3 GET failed: ConnectionError"), OSError(28, "No space left on device")]
)
def test_a_download_failure_propagates_and_leaves_nothing(
    store: FakeStore, fetcher: SealedFetcher, root: Path, error: Exception
) -> None:
    store.publish("model.bin", payload(10_000))
    store.download_error = error
    with pytest.raises(type(error)):
        fetcher.fetch(ref("model.bin"), root)
    assert all_names(root) == []


HOSTILE_TARS: dict[str, Callable[[Path], bytes]] = {
    # `outside` is a directory beside the cache root; none of these may write into it.
    "dot-dot member": lambda outside: tar_member("../../outside/escape", data=b"pwned"),
    "dot-dot inside a path": lambda outside: tar_member("a/../../../outside/escape", data=b"pwned"),
    "symlink to an absolute path": lambda outside: tar_member(
        "link", tarfile.SYMTYPE, linkname=str(outside)
    ),
    "symlink climbing out": lambda outside: tar_member("link", tarfile.SYMTYPE, linkname="../../outside"),
    "hard link climbing out": lambda outside: tar_member(
        "hard", tarfile.LNKTYPE, linkname="../../outside/target"
    ),
    "character device": lambda outside: tar_member("dev", tarfile.CHRTYPE),
    "fifo": lambda outside: tar_member("fifo", tarfile.FIFOTYPE),
    "absolute name": lambda outside: tar_member(str(outside / "abs.txt"), data=b"pwned"),
    # CVE-2025-4517: Python 3.11.7's "data" filter lets this one write outside/pwned.
    "symlink chain past PATH_MAX": symlink_chain_escape,
    "not a tar at all": lambda outside: payload(3000),
}


@pytest.mark.parametrize("hostile", list(HOSTILE_TARS), ids=list(HOSTILE_TARS))
def test_a_hostile_directory_archive_is_refused_and_writes_nothing_outside(
    store: FakeStore, fetcher: SealedFetcher, root: Path, tmp_path: Path, hostile: str
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "target").write_bytes(b"original")
    # The archive's digest matches its id, so only the unpacking can stop it.
    store.publish("evil", HOSTILE_TARS[hostile](outside), is_directory=True)

    with pytest.raises(IntegrityError, match="cannot be unpacked"):
        fetcher.fetch(ref("evil"), root)

    assert all_names(root) == []
    assert tree(outside) == {"target": b"original"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "outside"]


def test_a_symlink_then_a_file_through_it_cannot_escape(
    store: FakeStore, fetcher: SealedFetcher, root: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as archive:
        link = tarfile.TarInfo("d")
        link.type = tarfile.SYMTYPE
        link.linkname = str(outside)
        archive.addfile(link)
        evil = tarfile.TarInfo("d/evil")
        evil.size = 5
        archive.addfile(evil, io.BytesIO(b"pwned"))
    store.publish("evil", buf.getvalue(), is_directory=True)

    with pytest.raises(IntegrityError):
        fetcher.fetch(ref("evil"), root)

    assert all_names(root) == []
    assert all_names(outside) == []


@settings(deadline=None, max_examples=25)
@given(
    size=st.integers(min_value=0, max_value=20_000),
    segment_size=st.sampled_from([1, 17, 512, 4096, 65536]),
    small_size_kb=st.integers(min_value=0, max_value=4),
)
def test_fetch_round_trips_any_size_segment_and_split(
    tmp_path_factory: pytest.TempPathFactory, size: int, segment_size: int, small_size_kb: int
) -> None:
    store = FakeStore()
    fetcher = SealedFetcher(store, fingerprint=FINGERPRINT, cdn_factory=lambda config: FakeCdn(store))
    root = tmp_path_factory.mktemp("prop")
    plaintext = payload(size, seed=size)
    store.publish("m.bin", plaintext, segment_size=segment_size, small_size_kb=small_size_kb)
    outcome = fetcher.fetch(ref("m.bin"), root)
    assert outcome.path.read_bytes() == plaintext
    assert all_names(root) == [outcome.path.name]


# -- SealedModelCache ------------------------------------------------------------------------------


@pytest.fixture
def cache(root: Path, fetcher: SealedFetcher) -> SealedModelCache:
    return SealedModelCache(root, fetcher=fetcher, budget_bytes=10**9)


def test_cache_root_is_created_private(tmp_path: Path, fetcher: SealedFetcher) -> None:
    root = tmp_path / "a" / "b"
    SealedModelCache(root, fetcher=fetcher, budget_bytes=1)
    assert root.is_dir()
    assert root.stat().st_mode & 0o777 == 0o700


def test_second_ensure_is_a_cache_hit(store: FakeStore, cache: SealedModelCache) -> None:
    published = store.publish("model.safetensors", payload(20_000))
    model = ref("model.safetensors")
    assert cache.cached(model) is None

    path, manifest = cache.ensure(model)
    again, manifest_again = cache.ensure(model)

    assert again == path
    assert manifest_again == manifest
    assert manifest.id == published.manifest["id"]
    assert path.read_bytes() == published.plaintext
    assert cache.cached(model) == path
    assert store.calls["get"] == 1
    assert store.calls["download"] == 1
    stats = cache.stats()["model.safetensors"]
    assert stats["fetches"] == 1
    assert stats["cache_hits"] == 1
    assert stats["bytes"] == published.manifest["sealed_size"]
    assert stats["seconds"] > 0
    assert stats["last_error"] is None
    assert cache.errors() == {}


def _run_concurrently(count: int, target: Callable[[], Any]) -> tuple[list[Any], list[BaseException]]:
    results: list[Any] = []
    errors: list[BaseException] = []
    guard = threading.Lock()

    def run() -> None:
        try:
            value = target()
        except BaseException as exc:  # collected for the test to assert on
            with guard:
                errors.append(exc)
        else:
            with guard:
                results.append(value)

    threads = [threading.Thread(target=run, daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(HANG_GUARD_S)
    assert not any(t.is_alive() for t in threads), "ensure() hung"
    return results, errors


@pytest.fixture
def held_fetch(store: FakeStore, cache: SealedModelCache) -> Iterator[Callable[[int], None]]:
    """Make the (single) download wait until ``n`` callers of ensure() have decided leader/waiter."""
    lock = CountingLock()
    cache._lock = lock  # type: ignore[assignment]
    reached: list[bool] = []

    def hold(n: int) -> None:
        store.download_gate = lambda: reached.append(lock.wait_for_releases(n))

    yield hold
    # If the gate timed out, the test ran without real concurrency and proves nothing.
    assert reached == [True]


THREADS = 8


def test_single_flight_concurrent_ensures_share_one_fetch(
    store: FakeStore, cache: SealedModelCache, held_fetch: Callable[[int], None]
) -> None:
    published = store.publish("model.safetensors", payload(50_000))
    held_fetch(THREADS)

    results, errors = _run_concurrently(THREADS, lambda: cache.ensure(ref("model.safetensors")))

    assert errors == []
    assert len(results) == THREADS
    assert store.calls["get"] == 1
    assert store.calls["download"] == 1
    paths = {path for path, _ in results}
    assert len(paths) == 1
    (path,) = paths
    assert path.read_bytes() == published.plaintext
    assert {manifest.id for _, manifest in results} == {published.manifest["id"]}
    assert cache.stats()["model.safetensors"]["fetches"] == 1


def test_single_flight_failure_reaches_every_waiter_then_a_success_clears_it(
    store: FakeStore, cache: SealedModelCache, root: Path, held_fetch: Callable[[int], None]
) -> None:
    published = store.publish("model.safetensors", payload(50_000))
    store.flip_big_bit("model.safetensors", 100)
    held_fetch(THREADS)

    results, errors = _run_concurrently(THREADS, lambda: cache.ensure(ref("model.safetensors")))

    assert results == []
    assert len(errors) == THREADS
    assert all(isinstance(e, IntegrityError) for e in errors)
    assert store.calls["get"] == 1
    assert store.calls["download"] == 1
    error = cache.errors()["model.safetensors"]
    assert error.startswith("IntegrityError: sealed data failed verification")
    assert cache.stats()["model.safetensors"]["fetches"] == 0
    assert cache.cached(ref("model.safetensors")) is None
    assert all_names(root) == []

    # Not a cached failure: the next ensure tries again, and its success clears the error.
    store.download_gate = None
    store.flip_big_bit("model.safetensors", 100)
    path, _ = cache.ensure(ref("model.safetensors"))
    assert path.read_bytes() == published.plaintext
    assert store.calls["get"] == 2
    assert cache.errors() == {}
    assert cache.stats()["model.safetensors"]["last_error"] is None


def test_failures_of_one_model_do_not_block_another(store: FakeStore, cache: SealedModelCache) -> None:
    store.publish("bad.bin", payload(5000, seed=1))
    good = store.publish("good.bin", payload(5000, seed=2))
    store.tamper("bad.bin", dek=generate_key())
    with pytest.raises(IntegrityError):
        cache.ensure(ref("bad.bin"))
    path, _ = cache.ensure(ref("good.bin"))
    assert path.read_bytes() == good.plaintext
    assert set(cache.errors()) == {"bad.bin"}


def test_lru_eviction_removes_the_least_recently_used_and_refetches_it(
    store: FakeStore, fetcher: SealedFetcher, root: Path
) -> None:
    size = 10_000
    for name, seed in (("a.bin", 1), ("b.bin", 2), ("c.bin", 3)):
        store.publish(name, payload(size, seed=seed))
    cache = SealedModelCache(root, fetcher=fetcher, budget_bytes=2 * size)

    path_a, _ = cache.ensure(ref("a.bin"))
    path_b, _ = cache.ensure(ref("b.bin"))
    cache.ensure(ref("a.bin"))  # a is now more recently used than b
    path_c, _ = cache.ensure(ref("c.bin"))

    assert not path_b.exists()
    assert path_a.exists()
    assert path_c.exists()
    assert cache.cached(ref("b.bin")) is None
    assert sorted(all_names(root)) == sorted([path_a.name, path_c.name])
    assert Counter(store.gets)[(FOLDER, "b.bin")] == 1

    path_b2, _ = cache.ensure(ref("b.bin"))  # refetched; now a is the least recently used
    assert path_b2.read_bytes() == store.resources[(FOLDER, "b.bin")].plaintext
    assert Counter(store.gets)[(FOLDER, "b.bin")] == 2
    assert not path_a.exists()
    assert cache.cached(ref("a.bin")) is None
    assert cache.stats()["b.bin"]["fetches"] == 2


def test_a_model_larger_than_the_budget_is_still_kept_alone(
    store: FakeStore, fetcher: SealedFetcher, root: Path
) -> None:
    store.publish("small.bin", payload(100, seed=1))
    store.publish("huge.bin", payload(5000, seed=2))
    cache = SealedModelCache(root, fetcher=fetcher, budget_bytes=1000)
    small, _ = cache.ensure(ref("small.bin"))
    huge, _ = cache.ensure(ref("huge.bin"))
    assert huge.exists()
    assert not small.exists()
    assert all_names(root) == [huge.name]


def test_eviction_of_a_directory_model_removes_its_tree(
    store: FakeStore, fetcher: SealedFetcher, root: Path
) -> None:
    store.publish("dir", make_tar({"x/weights.bin": payload(8000)}), is_directory=True)
    store.publish("file.bin", payload(20_000, seed=3))
    cache = SealedModelCache(root, fetcher=fetcher, budget_bytes=20_000)
    directory, _ = cache.ensure(ref("dir"))
    assert directory.is_dir()
    cache.ensure(ref("file.bin"))
    assert not directory.exists()


def test_clear_removes_every_plaintext_and_the_root(
    store: FakeStore, cache: SealedModelCache, root: Path
) -> None:
    store.publish("a.bin", payload(1000))
    store.publish("d", make_tar({"w.bin": payload(1000, seed=4)}), is_directory=True)
    cache.ensure(ref("a.bin"))
    cache.ensure(ref("d"))
    cache.clear()
    assert not root.exists()
    assert cache.cached(ref("a.bin")) is None


def test_release_removes_every_plaintext_and_keeps_the_cache_usable(
    store: FakeStore, cache: SealedModelCache, root: Path
) -> None:
    data = payload(1000)
    store.publish("a.bin", data)
    store.publish("d", make_tar({"w.bin": payload(1000, seed=4)}), is_directory=True)
    cache.ensure(ref("a.bin"))
    cache.ensure(ref("d"))
    cache.release()
    assert root.is_dir() and list(root.iterdir()) == []
    assert cache.cached(ref("a.bin")) is None
    again, _ = cache.ensure(ref("a.bin"))  # fetched anew, not served from a dangling entry
    assert again.read_bytes() == data
    assert cache.stats()["a.bin"]["fetches"] == 2


def test_describe_names_the_class_and_never_a_foreign_message() -> None:
    assert describe(IntegrityError("bad tag")) == "IntegrityError: bad tag"
    # A foreign exception's message may carry anything (a URL with credentials): only its class.
    assert describe(ValueError("https://user:pw@host")) == "ValueError: ValueError"


# Two published names for the same bytes (an alias such as "sd-latest" next to "sd-1.5") share one
# plaintext path, <root>/<id>[suffix], while the cache keeps one entry per (folder, name).


def test_evicting_one_alias_keeps_the_other_aliass_file(
    store: FakeStore, fetcher: SealedFetcher, root: Path
) -> None:
    same = payload(10_000)
    store.publish("alias-a.bin", same)
    store.publish("alias-b.bin", same)
    store.publish("other.bin", payload(10_000, seed=5))
    cache = SealedModelCache(root, fetcher=fetcher, budget_bytes=20_000)
    cache.ensure(ref("alias-a.bin"))
    path_b, _ = cache.ensure(ref("alias-b.bin"))
    cache.ensure(ref("other.bin"))  # evicts alias-a (LRU), which is the same file as alias-b

    assert cache.cached(ref("alias-b.bin")) == path_b
    assert path_b.exists()


def test_two_aliases_of_one_directory_model_can_both_be_ensured(
    store: FakeStore, cache: SealedModelCache
) -> None:
    archive = make_tar({"w.bin": payload(3000)})
    store.publish("dir-a", archive, is_directory=True)
    store.publish("dir-b", archive, is_directory=True)
    path_a, _ = cache.ensure(ref("dir-a"))
    path_b, _ = cache.ensure(ref("dir-b"))
    assert tree(path_a) == tree(path_b)


# -- process_cache_dir -----------------------------------------------------------------------------

DEAD_PID = 2**31 - 1  # above any Linux pid_max (at most 2**22), yet a valid pid_t


def marked(path: Path, pid: int) -> Path:
    """A cache directory as a loader of ``pid`` leaves it."""
    (path / "sub").mkdir(parents=True)
    (path / "sub" / "weights.bin").write_bytes(b"plaintext of a loader")
    (path / MARKER).write_text(f"sealserve node cache of pid {pid}\n")
    return path


def test_process_cache_dir_is_a_fresh_private_dir_under_a_private_base(tmp_path: Path) -> None:
    base = tmp_path / "shm" / "sealserve"
    path = process_cache_dir(base, "loader")
    again = process_cache_dir(base, "loader")
    assert path.parent == base and path.name.startswith(f"loader-{os.getpid()}-")
    assert again != path and again.is_dir()
    assert base.stat().st_mode & 0o777 == 0o700
    assert path.stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize("mode", [0o755, 0o770, 0o701])
def test_process_cache_dir_refuses_a_base_open_to_others(tmp_path: Path, mode: int) -> None:
    base = tmp_path / "sealserve"
    base.mkdir()
    base.chmod(mode)
    stale = marked(base / f"loader-{DEAD_PID}", DEAD_PID)
    with pytest.raises(ConfigurationError, match="open to group or others"):
        process_cache_dir(base, "loader")
    # Refused, not repaired: no chmod, no sweep.
    assert base.stat().st_mode & 0o777 == mode
    assert stale.exists()


def test_process_cache_dir_refuses_a_symlinked_base(tmp_path: Path) -> None:
    # A local user plants /dev/shm/sealserve -> a directory of the service user on a persistent disk.
    target = tmp_path / "home" / "data"
    target.mkdir(parents=True, mode=0o755)
    target.chmod(0o755)
    (target / f"backup-{DEAD_PID}").mkdir()
    victim = marked(target / f"loader-{DEAD_PID}", DEAD_PID)
    base = tmp_path / "shm" / "sealserve"
    base.parent.mkdir()
    base.symlink_to(target)

    with pytest.raises(ConfigurationError, match="symbolic link"):
        process_cache_dir(base, "loader")

    assert target.stat().st_mode & 0o777 == 0o755
    assert victim.exists() and (target / f"backup-{DEAD_PID}").exists()
    assert sorted(p.name for p in target.iterdir()) == [f"backup-{DEAD_PID}", f"loader-{DEAD_PID}"]


def test_process_cache_dir_refuses_a_base_that_is_a_file(tmp_path: Path) -> None:
    base = tmp_path / "sealserve"
    base.write_bytes(b"")
    with pytest.raises(ConfigurationError, match="not a directory"):
        process_cache_dir(base, "loader")


def test_process_cache_dir_sweeps_only_marked_dirs_of_dead_processes(tmp_path: Path) -> None:
    base = tmp_path / "sealserve"
    base.mkdir(mode=0o700)
    dead = [marked(base / f"loader-{DEAD_PID}-abc", DEAD_PID), marked(base / "other-app-x", DEAD_PID)]
    keep = [
        marked(base / "loader-live", os.getppid()),  # a live process
        marked(base / "mine", os.getpid()),
        base / f"backup-{DEAD_PID}",  # looks like a dead loader's, but carries no marker
    ]
    keep[-1].mkdir()
    forged = base / "forged"  # a marker that is a link is not ours
    forged.mkdir()
    (forged / MARKER).symlink_to(base / "mine" / MARKER)
    stray_file = base / f"note-{DEAD_PID}"
    stray_file.write_bytes(b"x")

    mine = process_cache_dir(base, "loader")

    assert not any(path.exists() for path in dead)
    assert all(path.exists() for path in keep)
    assert forged.exists() and stray_file.exists()
    assert (mine / MARKER).read_text() == f"sealserve node cache of pid {os.getpid()}\n"


def test_process_cache_dir_refuses_a_base_owned_by_another_user(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = tmp_path / "sealserve"
    base.mkdir(mode=0o700)
    stale = marked(base / f"loader-{DEAD_PID}", DEAD_PID)
    real_uid = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: real_uid + 1)

    with pytest.raises(ConfigurationError, match="belongs to another user"):
        process_cache_dir(base, "loader")

    monkeypatch.undo()
    assert stale.exists()


def test_process_cache_dir_survives_a_marker_with_a_huge_number(tmp_path: Path) -> None:
    base = tmp_path / "sealserve"
    base.mkdir(mode=0o700)
    marked(base / "loader-x", 99999999999)
    process_cache_dir(base, "loader")
    assert not (base / "loader-x").exists()


# Keep the fakes importable for tests/unit/test_sealed_catalog.py.
__all__ = ["FINGERPRINT", "FOLDER", "FakeCdn", "FakeStore", "FakeStream", "all_names", "make_tar", "payload"]
