"""Publish a model sealed: seal it, put the big part on S3 and the small part and DEK on the resource API.

docs/sealed-format.md §6 ("Split between two stores") and docs/sealed-models.md. A model file is
published as it is; a model directory is first packed into a *deterministic* tar
(``lib.sealed.archive``), so that the model id — the sha256 of the plaintext file — depends on the
content only, not on file order, mtimes, owners or umask. Then::

    DEK = generate_key()
    sealed = seal(plaintext, DEK)               # streamed: the small part stays in memory,
    small, big = sealed[:cut], sealed[cut:]     # the big part goes to a temp file
    S3:           {folder}/{name}/{id}.big  <- big          (first)
    resource API: (folder, name)            <- small + manifest + DEK   (last)

The big part is uploaded (and its size checked) before the manifest, so a failure can leave at
most an orphan object on S3, never a manifest that points to a missing big part.

With a publisher signing key (``sealserve keygen --signing``) the manifest carries a commitment to
the DEK (``dek_commitment``) and the key's Ed25519 signature over the folder and every manifest
field (``signature``, :mod:`lib.sealed.signing`); nodes that trust the key refuse anything else.

Publishing is idempotent: when the resource API already lists (folder, name) with the same id and
sealing parameters, and the big object is on S3 with the size that manifest expects, nothing is
sealed or uploaded and the status is "unchanged".

Temporary files (the tar of a directory, the big part) live in a private directory under
``work_dir`` (default: the system temp dir) that is removed in every case. The tar is plaintext
of the publisher's own model, which is already on this disk; the DEK only ever exists in memory.
"""

from __future__ import annotations

import builtins
import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Protocol, get_args

from lib.digest import HashingIO, sha256_file
from lib.errors import IntegrityError, NotFoundError, PublishError
from lib.schemas import ModelKind
from lib.sealed.archive import pack_directory
from lib.sealed.format import (
    DEFAULT_SEGMENT_SIZE,
    MAX_SEGMENT_SIZE,
    generate_key,
    seal_stream,
    sealed_size,
    split_point,
)
from lib.sealed.signing import MANIFEST_SIGNATURE_FIELD, SigningKey, dek_commitment, sign_manifest
from lib.sealed.wire import NAME_PATTERN, ResourceManifest, UploadResponse, UploadStatus

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

log = logging.getLogger(__name__)

KINDS: tuple[str, ...] = get_args(ModelKind)
DEFAULT_SMALL_SIZE_KB = 1024
_CHUNK = 1 << 20


class ResourceStore(Protocol):
    """The part of :class:`lib.sealed.resource_client.ResourceClient` publishing uses."""

    def list(self, folder: str) -> builtins.list[ResourceManifest]: ...

    def upload(
        self, folder: str, name: str, small_part: bytes, manifest: ResourceManifest, dek: bytes
    ) -> UploadResponse: ...


class BigPartStore(Protocol):
    """The part of :class:`lib.sealed.cdn.CdnClient` publishing uses."""

    bucket: str

    def ensure_bucket(self) -> None: ...

    def object_size(self, key: str) -> int: ...

    def upload_file(self, path: Path, key: str) -> None: ...


@dataclass(frozen=True)
class PublishResult:
    id: str
    name: str
    folder: str
    status: UploadStatus
    plaintext_size: int
    sealed_size: int
    small_size: int
    big_key: str


def check_kind(kind: str) -> str:
    """``kind`` if it is one of :data:`KINDS`, else :class:`PublishError`."""
    if kind not in KINDS:
        raise PublishError(f"unknown model kind {kind!r}; expected one of {', '.join(KINDS)}")
    return kind


# -- sealing into two parts -----------------------------------------------------------------------


class _SplitSink:
    """The first ``cut`` bytes go to memory (the small part), the rest to the big-part file.

    Splitting while sealing avoids writing the whole sealed file and then copying it in two.
    """

    def __init__(self, cut: int, big: IO[bytes]) -> None:
        self._cut = cut
        self._big = big
        self.small = bytearray()

    def write(self, data: ReadableBuffer, /) -> int:
        view = memoryview(data).cast("B")
        room = self._cut - len(self.small)
        if room > 0:
            self.small += view[:room]  # copies: seal_stream reuses its buffer
            view = view[room:]
        if view:
            self._big.write(view)
        return memoryview(data).nbytes


def _seal_split(
    plaintext: Path, big_path: Path, dek: bytes, *, model_id: str, plaintext_size: int,
    segment_size: int, small_size_kb: int,
) -> tuple[bytes, int, int]:
    """Seal into a small part (memory) and a big part (``big_path``); return (small, sealed, big size)."""
    total = sealed_size(plaintext_size, segment_size)
    cut = split_point(total, small_size_kb)
    with plaintext.open("rb") as raw, big_path.open("wb") as big:
        reader = HashingIO(raw)
        sink = _SplitSink(cut, big)
        written = seal_stream(reader, sink, dek, segment_size=segment_size)
    if written != total or reader.size != plaintext_size or reader.hexdigest() != model_id:
        # The model file changed between hashing and sealing: its id would not match its content.
        raise PublishError(f"{plaintext} changed while it was being published; try again")
    return bytes(sink.small), total, total - cut


# -- publishing -----------------------------------------------------------------------------------


def big_key_for(folder: str, name: str, model_id: str) -> str:
    """The S3 key of a model's big part; the id in it keeps every version's big part apart."""
    return f"{folder}/{name}/{model_id}.big"


def _check_arguments(path: Path, name: str, folder: str, small_size_kb: int, segment_size: int) -> None:
    # Checked before any work: a name the resource API rejects must not cost a seal and an upload.
    for what, value in (("name", name), ("folder", folder)):
        if not re.fullmatch(NAME_PATTERN, value):
            raise PublishError(f"{what} {value!r} must match {NAME_PATTERN}")
    if small_size_kb < 0:
        raise PublishError("small_size_kb must not be negative")
    if not 1 <= segment_size <= MAX_SEGMENT_SIZE:
        raise PublishError(f"segment size must be between 1 and {MAX_SEGMENT_SIZE} bytes")
    if not path.exists():
        raise PublishError(f"{path} does not exist")
    if not (path.is_file() or path.is_dir()):
        raise PublishError(f"{path} is not a regular file or directory")


def _find(manifests: list[ResourceManifest], name: str) -> ResourceManifest | None:
    return next((m for m in manifests if m.name == name), None)


def _is_current(
    existing: ResourceManifest, *, model_id: str, kind: str, plaintext_size: int, segment_size: int,
    small_size_kb: int, is_directory: bool, big_key: str, signer: SigningKey | None = None,
) -> bool:
    """Whether ``existing`` is what publishing now would produce (bar the random DEK, salt, nonces)."""
    expected_sealed = sealed_size(plaintext_size, segment_size)
    signature = (existing.model_extra or {}).get(MANIFEST_SIGNATURE_FIELD)
    signed_by = signature.get("key") if isinstance(signature, dict) else None
    return (
        (signer is None or signed_by == signer.public_b64)
        and existing.id == model_id
        and existing.big_key == big_key
        and existing.kind == kind
        and existing.is_directory == is_directory
        and existing.segment_size == segment_size
        and existing.plaintext_size == plaintext_size
        and existing.sealed_size == expected_sealed
        and existing.small_size == split_point(expected_sealed, small_size_kb)
    )


def _manifest(folder: str, signer: SigningKey | None, dek: bytes, **fields: object) -> ResourceManifest:
    """The manifest; with a signing key, committed to the DEK and signed for ``folder``."""
    if signer is None:
        log.warning("publishing without a signing key: nodes that trust publishers will refuse it")
        return ResourceManifest.model_validate(fields)
    fields["dek_commitment"] = dek_commitment(dek, str(fields["id"]))
    unsigned = ResourceManifest.model_validate(fields).model_dump(mode="json")
    signature = sign_manifest(signer, folder, unsigned)
    return ResourceManifest.model_validate({**unsigned, MANIFEST_SIGNATURE_FIELD: signature})


def _big_part_intact(cdn: BigPartStore, key: str, expected_size: int) -> bool:
    try:
        return cdn.object_size(key) == expected_size
    except NotFoundError:
        return False


def publish_model(
    path: Path,
    *,
    name: str,
    folder: str,
    kind: str,
    resources: ResourceStore,
    cdn: BigPartStore,
    small_size_kb: int = DEFAULT_SMALL_SIZE_KB,
    segment_size: int = DEFAULT_SEGMENT_SIZE,
    work_dir: Path | None = None,
    signing_key: SigningKey | None = None,
) -> PublishResult:
    """Seal the model at ``path`` and publish it as (folder, name); see the module docstring.

    ``kind`` is one of :data:`KINDS`; ``sealserve publish`` recognises it from the model's files
    unless told (``detect_kind`` in lib/cli/publish.py). ``resources`` is a
    :class:`~lib.sealed.resource_client.ResourceClient` logged in as a publisher, ``cdn`` a
    :class:`~lib.sealed.cdn.CdnClient` for the bucket nodes download from. Network failures surface
    as the clients' errors (after their bounded retries); nothing partial is left that a node could
    mistake for a published model.
    """
    # resolve(): a model given as a link (a Hugging Face snapshot file) is published by content.
    path = Path(path).resolve()
    _check_arguments(path, name, folder, small_size_kb, segment_size)
    model_kind = check_kind(kind)
    is_directory = path.is_dir()
    # First, before any long packing or hashing: wrong credentials or an unreachable API fail fast.
    existing = _find(resources.list(folder), name)
    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
    # mkdtemp makes the directory 0700: the tar inside is the plaintext model.
    with tempfile.TemporaryDirectory(prefix=".sealserve-publish-", dir=work_dir) as tmp:
        work = Path(tmp)
        if is_directory:
            plaintext = work / "model.tar"
            log.info("packing %s into a deterministic tar", path)
            model_id, plaintext_size = pack_directory(path, plaintext)
        else:
            plaintext = path
            plaintext_size = path.stat().st_size
            model_id = sha256_file(path)
        big_key = big_key_for(folder, name, model_id)

        if existing is not None and _is_current(
            existing, model_id=model_id, kind=model_kind, plaintext_size=plaintext_size,
            segment_size=segment_size, small_size_kb=small_size_kb, is_directory=is_directory,
            big_key=big_key, signer=signing_key,
        ) and _big_part_intact(cdn, big_key, existing.sealed_size - existing.small_size):
            log.info("%s/%s is already published with id %s; nothing to do", folder, name, model_id)
            return PublishResult(
                id=model_id, name=name, folder=folder, status="unchanged", plaintext_size=plaintext_size,
                sealed_size=existing.sealed_size, small_size=existing.small_size, big_key=big_key,
            )
        if existing is not None and existing.id == model_id:
            # Same content, other parameters or a missing big part: the same key is rewritten, so
            # a node fetching between the two uploads gets an IntegrityError, never wrong weights.
            log.warning("re-sealing %s/%s (id %s): the published copy differs or is incomplete",
                        folder, name, model_id)

        dek = generate_key()
        big_path = work / "model.big"
        log.info("sealing %s (%d bytes, id %s)", path, plaintext_size, model_id)
        small, total, big_size = _seal_split(
            plaintext, big_path, dek, model_id=model_id, plaintext_size=plaintext_size,
            segment_size=segment_size, small_size_kb=small_size_kb,
        )
        if is_directory:
            plaintext.unlink()  # no need to keep the plaintext tar through the uploads

        cdn.ensure_bucket()
        log.info("uploading the big part (%d bytes) to s3://%s/%s", big_size, cdn.bucket, big_key)
        cdn.upload_file(big_path, big_key)
        # Proof the big part landed whole before a manifest may point at it.
        landed = cdn.object_size(big_key)
        if landed != big_size:
            raise IntegrityError(f"s3://{cdn.bucket}/{big_key} holds {landed} bytes after upload, "
                                 f"expected {big_size}")

        manifest = _manifest(
            folder, signing_key, dek, id=model_id, name=name, kind=model_kind, plaintext_size=plaintext_size,
            sealed_size=total, small_size=len(small), big_key=big_key, segment_size=segment_size,
            is_directory=is_directory,
        )
        response = resources.upload(folder, name, small, manifest, dek)
        log.info("published %s/%s: %s (id %s)", folder, name, response.status, model_id)
        return PublishResult(
            id=model_id, name=name, folder=folder, status=response.status, plaintext_size=plaintext_size,
            sealed_size=total, small_size=len(small), big_key=big_key,
        )
