"""One fetch of one sealed model onto a node (docs/sealed-models.md, docs/sealed-format.md).

``SealedFetcher.fetch`` does it in one pass: key release and small part from the resource API,
the big part streamed from S3 (one GET or parallel ranges, :class:`TransferPlan`), every segment
verified and decrypted as it arrives and written to a hidden file in the tmpfs cache while
another thread hashes it (:mod:`lib.sealed.stream`, :mod:`lib.sealed.plaintext`). With the
listed manifest as a hint, the first GET is sent while the key is still being released, so the
store's time to first byte and the key release overlap. Making a fetch happen once per node is
:class:`~lib.sealed.node_cache.SealedModelCache`'s job.

Nothing is published before the final segment verified and the SHA-256 matched the model id:
only then is the file renamed to its final name (or unpacked, for a directory model). On any
failure the hidden file is removed, so a path handed out always holds verified bytes.
"""

from __future__ import annotations

import builtins
import json
import logging
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from lib.errors import IntegrityError
from lib.observability import metrics
from lib.retry import RetryPolicy
from lib.sealed.archive import unpack_archive
from lib.sealed.format import HEADER_SIZE, SegmentOpener, parse_header
from lib.sealed.keywrap import NodeKeyPair
from lib.sealed.layout import SealedLayout
from lib.sealed.plaintext import PlaintextFile
from lib.sealed.resource_client import FetchedResource
from lib.sealed.signing import PublisherTrust
from lib.sealed.stream import ObjectStream, RangeSource, SegmentStreamer, read_head, stream_all
from lib.sealed.transfer import MiB
from lib.sealed.wire import CdnConfig, ResourceManifest

log = logging.getLogger(__name__)

# Big parts up to this size are one streamed GET, larger ones parallel ranged GETs. Measured with
# bench/transfer_choice.py, whole sealed fetches from this project's S3 server (moto, loopback,
# 2 cores), best of 2: one GET / 4 ranges of size/4 / 4 workers on 8 MiB ranges took
# 0.034 / 0.052 / 0.046 s at 8 MB, 0.072 / 0.096 / 0.102 s at 32 MB, 0.25 / 0.42 / 1.42 s at
# 128 MB, 0.92 / 1.66 s / (skipped) at 512 MB: one GET won at every size (moto reads the whole
# object for every ranged GET). The default keeps one GET up to 1 GiB, twice the largest size
# measured; above it the figures say nothing, and ranges keep each request (and a resume)
# bounded. A store that caps one connection (AWS S3: tens of MB/s) wants ranges from a few parts
# up: measure it the same way and lower ``single_get_max_mb``.
DEFAULT_SINGLE_GET_MAX = 1024 * MiB
# Bytes per ranged GET (rounded to whole segments) and GETs at once: the settings' defaults
# (``part_size_mb``, ``download_workers``), not tuned here, since ranges never won on moto;
# 8 MiB is AWS's guidance for byte-range fetches (8-16 MB).
DEFAULT_RANGE_SIZE = 8 * MiB
DEFAULT_WORKERS = 4


@dataclass(frozen=True)
class SealedRef:
    """A sealed model: where it is, and the id it must have (None: whatever is published)."""

    folder: str
    name: str
    id: str | None = None

    @property
    def location(self) -> tuple[str, str]:
        return (self.folder, self.name)

    @property
    def key(self) -> tuple[str, str, str | None]:
        # The id is part of the key: a model republished under the same name is another entry.
        return (self.folder, self.name, self.id)


class ResourceSource(Protocol):
    """The part of :class:`~lib.sealed.resource_client.ResourceClient` a node needs."""

    def get(self, folder: str, name: str, keypair: NodeKeyPair, fingerprint: str) -> FetchedResource: ...

    def list(self, folder: str) -> builtins.list[ResourceManifest]: ...

    def cdn_config(self, keypair: NodeKeyPair, fingerprint: str) -> CdnConfig: ...


BigPartSource = RangeSource
"""The part of :class:`~lib.sealed.cdn.CdnClient` a node needs: ranged GETs, answered as streams."""


@dataclass(frozen=True)
class TransferPlan:
    """How a big part travels: one streamed GET up to ``single_get_max_bytes``, else ``workers``
    parallel ranged GETs of about ``range_bytes`` each, in order; ``retry`` bounds each one."""

    single_get_max_bytes: int = DEFAULT_SINGLE_GET_MAX
    range_bytes: int = DEFAULT_RANGE_SIZE
    workers: int = DEFAULT_WORKERS
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    def batches(self, layout: SealedLayout, big_size: int) -> tuple[builtins.list[tuple[int, int]], int]:
        """The segment batches of one fetch (one per request) and how many run at once."""
        if big_size <= self.single_get_max_bytes or self.workers == 1:
            return [(0, layout.count - 1)], 1
        return layout.batches(max(1, self.range_bytes // layout.stride)), self.workers


@dataclass(frozen=True)
class FetchOutcome:
    path: Path
    manifest: ResourceManifest
    downloaded_bytes: int
    seconds: float
    # Where the time went and what the transfer cost (requests, resumes): for logs and bench/.
    details: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class _Prepared:
    """What the key release brought, checked, and the file the plaintext will go to."""

    fetched: FetchedResource
    prefix: bytes
    opener: SegmentOpener
    plaintext: PlaintextFile
    stem: str
    released: float


@dataclass(frozen=True)
class _Early:
    """A GET sent from the listed manifest before the key release answered."""

    hint: ResourceManifest
    layout: SealedLayout
    request: tuple[int, int, bool] | None
    stream: ObjectStream

    def matches(self, manifest: ResourceManifest, layout: SealedLayout,
                request: tuple[int, int, bool] | None) -> bool:
        """Whether it is the very request the released manifest calls for."""
        fields = ("id", "big_key", "sealed_size", "small_size", "segment_size")
        same = all(getattr(self.hint, name) == getattr(manifest, name) for name in fields)
        return same and self.layout == layout and self.request == request


class SealedFetcher:
    """One node's way to the sealed stores: a per-process key pair and the node fingerprint.

    ``cdn_factory`` makes the S3 client from the config the resource API releases; it is called
    once, on the first fetch, so a node that lists but never fetches gets no S3 credentials.
    ``trust`` holds the publishers' public keys: a released manifest, data key or storage config
    that none of them signed is refused before any byte is fetched with it.
    """

    def __init__(
        self,
        resources: ResourceSource,
        *,
        fingerprint: str,
        cdn_factory: Callable[[CdnConfig], BigPartSource],
        keypair: NodeKeyPair | None = None,
        plan: TransferPlan | None = None,
        sleep: Callable[[float], None] = time.sleep,
        trust: PublisherTrust | None = None,
    ) -> None:
        self._resources = resources
        self.trust = trust or PublisherTrust()
        self._fingerprint = fingerprint
        self._keypair = keypair or NodeKeyPair.generate()
        self._cdn_factory = cdn_factory
        self._cdn: BigPartSource | None = None
        self._cdn_lock = threading.Lock()
        self.plan = plan or TransferPlan()
        self._sleep = sleep

    def list(self, folder: str) -> list[ResourceManifest]:
        return self._resources.list(folder)

    def _cdn_client(self) -> BigPartSource:
        with self._cdn_lock:
            if self._cdn is None:
                config = self._resources.cdn_config(self._keypair, self._fingerprint)
                self.trust.check_cdn(json.loads(config.plaintext_json()))
                self._cdn = self._cdn_factory(config)
            return self._cdn

    def _streamer(self, manifest: ResourceManifest, prefix: bytes, layout: SealedLayout) -> SegmentStreamer:
        return SegmentStreamer(layout, prefix, manifest.small_size, manifest.big_key, self._cdn_client(),
                               policy=self.plan.retry, sleep=self._sleep)

    def _send_early(self, ref: SealedRef, hint: ResourceManifest | None) -> _Early | None:
        """The first GET as the listed manifest describes it, sent before the key arrives."""
        if hint is None or (ref.id is not None and hint.id != ref.id):
            return None  # nothing listed, or not the version asked for: that fetch fails anyway
        if hint.small_size < HEADER_SIZE:
            return None  # the header is not all in the small part: a rare layout, no head start
        try:
            layout = SealedLayout.of(hint.segment_size, hint.sealed_size)
            streamer = self._streamer(hint, bytes(hint.small_size), layout)
            first, last = self.plan.batches(layout, hint.sealed_size - hint.small_size)[0][0]
            request = streamer.request_for(first, last)
            stream = streamer.open(first, last)
        except Exception as exc:  # only a head start: the fetch proper retries and reports
            log.debug("early GET for %s not sent: %s", hint.name, type(exc).__name__)
            return None
        return None if stream is None else _Early(hint, layout, request, stream)

    def fetch(self, ref: SealedRef, root: Path, *, hint: ResourceManifest | None = None) -> FetchOutcome:
        """Fetch, verify and open ``ref`` into ``root``; returns the verified plaintext path.

        ``hint`` is the manifest the listing returned for ``ref``: with it the download starts
        while the key is released; the released manifest decides, and a different one discards
        the early request.
        """
        started = time.monotonic()
        early: _Early | None = None
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="key-release") as pool:
            ready = pool.submit(self._release, ref, root)
            try:
                early = self._send_early(ref, hint)
                prepared = ready.result()
            except BaseException:
                if early is not None:
                    early.stream.close()
                if ready.done() and not ready.cancelled() and ready.exception() is None:
                    ready.result().plaintext.discard()
                raise
        try:
            return self._open(ref, prepared, early, started)
        finally:
            if early is not None:
                early.stream.close()  # harmless if the streamer used and closed it

    def _release(self, ref: SealedRef, root: Path) -> _Prepared:
        """Key release and small part; then, while the first GET still waits for its answer (a
        store reads a big object before its first byte), the checks and the plaintext file,
        preallocated: the stream writes into memory that is already there."""
        fetched = self._resources.get(ref.folder, ref.name, self._keypair, self._fingerprint)
        released = time.monotonic()
        metrics.key_released()
        manifest = fetched.manifest
        self.trust.check_manifest(ref.folder, manifest.model_dump(mode="json"), dek=fetched.dek,
                                  what=f"sealed model {ref.folder}/{ref.name}")
        if ref.id is not None and manifest.id != ref.id:
            raise IntegrityError(
                f"sealed model {ref.name} has id {manifest.id[:12]}, configuration pins {ref.id[:12]}"
            )
        if len(fetched.small_part) != manifest.small_size:
            raise IntegrityError(f"small part of {ref.name} has the wrong size")
        prefix = self._prefix(manifest, fetched.small_part)
        header = parse_header(prefix)
        layout = SealedLayout.of(header.segment_size, manifest.sealed_size)
        if layout.plaintext_size != manifest.plaintext_size:
            raise IntegrityError(f"sealed model {ref.name}: the manifest's sizes do not match its header")
        # Names carry the id and the resource name: the same bytes published under two names are
        # two entries with two files, so evicting one never pulls the file from under the other.
        stem = f"{manifest.id}.{ref.folder}.{ref.name}"
        plaintext = PlaintextFile(root, layout, name_hint=stem, preallocate=True)
        return _Prepared(fetched, prefix, SegmentOpener(fetched.dek, header), plaintext, stem, released)

    def _open(
        self, ref: SealedRef, prepared: _Prepared, early: _Early | None, started: float
    ) -> FetchOutcome:
        manifest, layout = prepared.fetched.manifest, prepared.plaintext.layout
        ready = time.monotonic()
        with prepared.plaintext as plaintext:
            streamer = self._streamer(manifest, prepared.prefix, layout)
            batches, workers = self.plan.batches(layout, manifest.sealed_size - manifest.small_size)
            first_request = streamer.request_for(*batches[0])
            head_start = early is not None and early.matches(manifest, layout, first_request)
            if head_start:
                streamer.stats.add(requests=1)
            # Otherwise fetch() closes it, and the first batch sends its own request.
            streamer.opener, streamer.sink = prepared.opener, plaintext
            stream_all(streamer, batches, workers=workers,
                       early=early.stream if early is not None and head_start else None)
            streamed = time.monotonic()
            if plaintext.digest() != manifest.id:
                raise IntegrityError(f"plaintext of sealed model {ref.name} does not match its id")
            hashed = time.monotonic()
            final = plaintext.path.parent / prepared.stem
            if manifest.is_directory:
                unpacked = plaintext.path.parent / f".{prepared.stem}.dir.part"
                try:
                    unpack_archive(plaintext.path, unpacked)
                    unpacked.rename(final)
                finally:
                    shutil.rmtree(unpacked, ignore_errors=True)
            else:
                plaintext.publish(final)
        done = time.monotonic()
        details = {
            "key_release_s": prepared.released - started,
            # The first GET's answer and the file's preallocation overlap the key release.
            "ready_s": ready - started, "stream_s": streamed - ready,
            "hash_tail_s": hashed - streamed, "publish_s": done - hashed,
            "requests": streamer.stats.requests, "resumes": streamer.stats.resumes,
            "workers": workers, "early_get": head_start,
        }
        return FetchOutcome(final, manifest, manifest.sealed_size, done - started, details)

    def _prefix(self, manifest: ResourceManifest, small: bytes) -> bytes:
        """The small part, completed to a whole header from the big part if it is shorter."""
        if len(small) >= HEADER_SIZE or manifest.sealed_size <= len(small):
            return small
        missing = min(HEADER_SIZE, manifest.sealed_size) - len(small)
        return small + read_head(self._cdn_client(), manifest.big_key, missing,
                                 policy=self.plan.retry, sleep=self._sleep)
