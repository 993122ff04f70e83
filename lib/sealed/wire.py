"""Wire schemas of the resource API, shared by the server and :mod:`lib.sealed.resource_client`.

Every body is JSON; bytes travel as standard base64 strings (:data:`B64Bytes`). Request bodies
forbid unknown fields. A manifest requires the fields below and keeps any others the publisher
adds (a manifest is a document the loader reads, and the format may grow).

:class:`CdnConfig` is the S3 connection the resource API releases to nodes (``POST /cdn``). Its
secret key is a :class:`~pydantic.SecretStr`, so a repr, a log line or a plain
``model_dump_json()`` shows ``**********``. Only :meth:`CdnConfig.plaintext_json` reveals it, and
its bytes are meant for encryption (at rest under the master key, in transit wrapped to a node).
"""

from __future__ import annotations

import ipaddress
import json
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    SecretStr,
    model_validator,
)

from lib.sealed.keywrap import PUBLIC_KEY_SIZE, WrappedSecret, b64decode, b64encode, check_peer_public_key

Role = Literal["publisher", "reader"]
FetchKind = Literal["dek", "cdn"]
UploadStatus = Literal["created", "unchanged", "replaced"]

# Folder and resource names are path segments and S3-key fragments: keep them boring.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
FINGERPRINT_PATTERN = r"^[0-9a-f]{64}$"
SHA256_PATTERN = r"^[0-9a-f]{64}$"
EMAIL_PATTERN = r"^[^@\s]+@[^@\s]+$"
DEK_BYTES = 32


def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` and loopback addresses: the only hosts where plain HTTP is fine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def plain_http_refusal(url: str, what: str) -> str | None:
    """Why ``url`` may not be used (plain HTTP to a host other than loopback), or None."""
    parts = urlsplit(url)
    if parts.scheme == "https" or (parts.scheme == "http" and is_loopback_host(parts.hostname or "")):
        return None
    if parts.scheme == "http":
        return (f"{what} {parts.scheme}://{parts.hostname} is plain HTTP to another host: secrets and "
                "keys would travel unencrypted; use https:// (or allow_plain_http in development)")
    return f"{what} must be an http(s) URL"


def _from_b64(value: Any) -> Any:
    return b64decode(value) if isinstance(value, str) else value


B64Bytes = Annotated[
    bytes,
    BeforeValidator(_from_b64),
    PlainSerializer(b64encode, return_type=str, when_used="json"),
]
Name = Annotated[str, Field(pattern=NAME_PATTERN, description="a folder or resource name")]
Fingerprint = Annotated[
    str, Field(pattern=FINGERPRINT_PATTERN, description="node fingerprint: 64 lowercase hex chars")
]
NODE_ID_PATTERN = r"^[0-9a-f]{64}$"
NONCE_PATTERN = r"^[A-Za-z0-9_-]{32,64}$"
NodeStatusName = Literal["pending", "approved", "revoked"]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)


class LoginRequest(_Request):
    email: str = Field(min_length=3, max_length=320, pattern=EMAIL_PATTERN)
    password: str = Field(min_length=1, max_length=1024)


class ResourceManifest(BaseModel):
    """What the loader needs to fetch, join, verify and open a sealed model."""

    model_config = ConfigDict(extra="allow", frozen=True)

    id: str = Field(pattern=SHA256_PATTERN, description="sha256 hex of the plaintext file")
    name: Name
    kind: str = Field(min_length=1, max_length=64, description="e.g. text-to-image")
    plaintext_size: int = Field(ge=0)
    sealed_size: int = Field(ge=0)
    small_size: int = Field(ge=0, description="bytes of the small part held by the resource API")
    big_key: str = Field(min_length=1, max_length=1024, description="S3 object key of the big part")
    segment_size: int = Field(gt=0)
    is_directory: bool = Field(description="a tar of a model directory, unpacked after opening")

    @model_validator(mode="after")
    def _check_sizes(self) -> ResourceManifest:
        if self.small_size > self.sealed_size:
            raise ValueError("small_size exceeds sealed_size")
        return self


class UploadRequest(_Request):
    name: Name
    small_part: B64Bytes = Field(description="base64 of the small part")
    manifest: ResourceManifest
    dek: B64Bytes = Field(description="base64 of the 32-byte data key")

    @model_validator(mode="after")
    def _check_consistency(self) -> UploadRequest:
        if len(self.dek) != DEK_BYTES:
            raise ValueError(f"dek must be {DEK_BYTES} bytes")
        if self.manifest.name != self.name:
            raise ValueError("manifest.name differs from name")
        if self.manifest.small_size != len(self.small_part):
            raise ValueError("manifest.small_size differs from the length of small_part")
        return self


class UploadResponse(BaseModel):
    folder: str
    name: str
    id: str
    status: UploadStatus = Field(
        description="created; unchanged (same id, small part, manifest and DEK); replaced"
    )


class NodeKeyRequest(_Request):
    """Who a secret is released to: one process's public key on one approved node.

    ``signature`` is the node key's Ed25519 signature of
    :func:`lib.sealed.signing.node_request_message` over this request and a fresh ``nonce``
    from ``POST /nodes/nonce`` (single use, short-lived).
    """

    public_key: B64Bytes = Field(description="base64 of the caller's ephemeral X25519 public key")
    fingerprint: Fingerprint
    node_id: str = Field(pattern=NODE_ID_PATTERN, description="SHA-256 hex of the node's Ed25519 key")
    nonce: str = Field(pattern=NONCE_PATTERN, description="a fresh nonce from POST /nodes/nonce")
    signature: B64Bytes = Field(description="base64 of the node key's Ed25519 signature (64 bytes)")

    @model_validator(mode="after")
    def _check_key(self) -> NodeKeyRequest:
        if len(self.public_key) != PUBLIC_KEY_SIZE:
            raise ValueError(f"public_key must be {PUBLIC_KEY_SIZE} bytes")
        # A low-order point (all zeros, ...) would make every shared secret the same.
        check_peer_public_key(self.public_key)
        if len(self.signature) != 64:
            raise ValueError("signature must be 64 bytes")
        return self


class GetRequest(NodeKeyRequest):
    name: Name


class NonceResponse(BaseModel):
    nonce: str
    expires_in: int = Field(description="seconds the nonce stays valid; it is valid once")


class EnrollRequest(_Request):
    """A node introducing its key; it releases nothing until an operator approves it."""

    node_key: B64Bytes = Field(description="base64 of the node's Ed25519 public key (32 bytes)")
    fingerprint: Fingerprint
    hostname: str = Field("", max_length=253, pattern=r"^[A-Za-z0-9._-]*$")

    @model_validator(mode="after")
    def _check_key(self) -> EnrollRequest:
        if len(self.node_key) != 32:
            raise ValueError("node_key must be 32 bytes")
        return self


class NodeInfo(BaseModel):
    node_id: str
    fingerprint: str
    hostname: str
    status: NodeStatusName


class GetResponse(BaseModel):
    manifest: ResourceManifest
    small_part: B64Bytes
    wrapped_key: WrappedSecret = Field(description="the DEK, wrapped with context 'dek'")


class ListResponse(BaseModel):
    folder: str
    resources: list[ResourceManifest]


class CdnConfig(BaseModel):
    """Where the big parts of sealed models live, and the credentials to read them."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    endpoint_url: str | None = Field(
        default=None,
        max_length=2048,
        description="S3-compatible endpoint (MinIO, R2, a local test server); None means AWS S3",
    )
    bucket: str = Field(min_length=1, max_length=255, description="bucket holding the big parts")
    region: str = Field(default="us-east-1", min_length=1, max_length=64, description="bucket region")
    access_key_id: str = Field(min_length=1, max_length=256, description="S3 access key id")
    secret_access_key: SecretStr = Field(description="S3 secret access key")
    signature: dict[str, str] | None = Field(
        default=None, description="a publisher's signature of the rest (lib.sealed.signing.cdn_message)"
    )

    def plaintext_json(self) -> bytes:
        """The config as JSON with the secret revealed: only ever encrypt these bytes."""
        data = self.model_dump(mode="json")
        data["secret_access_key"] = self.secret_access_key.get_secret_value()
        return json.dumps(data, sort_keys=True, separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_plaintext_json(cls, raw: bytes) -> CdnConfig:
        return cls.model_validate_json(raw)


class CdnResponse(BaseModel):
    wrapped_config: WrappedSecret = Field(description="CdnConfig JSON, wrapped with context 'cdn'")


class FetchCountResponse(BaseModel):
    count: int
    folder: str | None = None
    name: str | None = None
    kind: FetchKind | None = None
    fingerprint: str | None = None
