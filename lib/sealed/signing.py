"""Ed25519 signatures of the sealed supply chain (docs/security-sealed.md).

Two kinds of keys sign, over canonical JSON with a domain label, so a signature made for one
purpose never verifies for another:

- a **publisher signing key** (``sealserve keygen --signing``) signs every manifest it publishes
  (with the folder and a commitment to the data key) and the storage config; nodes configured
  with the publishers' public keys (``sealed.trusted_publishers``) refuse anything else;
- a **node key** (made on a node's first start, private key 0600 on the node, never sent) signs
  every key release request: the route, the resource, the ephemeral X25519 public key, the
  fingerprint and a single-use nonce from the resource API. Only an approved node key releases.

Keys travel as standard base64 of their 32 raw bytes; a key's id is the SHA-256 hex of those bytes.
Private keys are PKCS#8 PEM files, created with ``O_CREAT | O_EXCL`` and mode 0600.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from lib.errors import ConfigurationError, IntegrityError
from lib.sealed.keywrap import b64decode, b64encode

ED25519_KEY_SIZE = 32
ED25519_SIGNATURE_SIZE = 64
NODE_REQUEST_LABEL = b"sealserve/node-request/v1\n"
MANIFEST_LABEL = b"sealserve/manifest/v1\n"
CDN_LABEL = b"sealserve/storage-config/v1\n"
DEK_COMMITMENT_LABEL = b"sealserve/dek-commitment/v1|"
MANIFEST_SIGNATURE_FIELD = "signature"


def canonical(document: Mapping[str, Any]) -> bytes:
    """The one byte form of a JSON document that is signed: sorted keys, no spaces, UTF-8."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def key_id(public_key: bytes) -> str:
    """The id of an Ed25519 public key: SHA-256 hex of its 32 raw bytes."""
    return hashlib.sha256(public_key).hexdigest()


def decode_ed25519_public_key(text: str) -> bytes:
    """A base64 Ed25519 public key as 32 raw bytes, or ``ValueError``."""
    raw = b64decode(text.strip())
    if len(raw) != ED25519_KEY_SIZE:
        raise ValueError(f"an Ed25519 public key is {ED25519_KEY_SIZE} bytes")
    Ed25519PublicKey.from_public_bytes(raw)
    return raw


def verify(public_key: bytes, signature: bytes, message: bytes) -> bool:
    """Whether ``signature`` is ``public_key``'s Ed25519 signature of ``message``."""
    if len(public_key) != ED25519_KEY_SIZE or len(signature) != ED25519_SIGNATURE_SIZE:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


class SigningKey:
    """An Ed25519 private key; its repr shows only the public key, and it refuses to be pickled."""

    __slots__ = ("_private",)

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private = private_key

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: Path) -> SigningKey:
        """The key in the PEM file at ``path``; refuses a file that others may read."""
        path = Path(path)
        try:
            info = path.stat()
            data = path.read_bytes()
        except OSError as exc:
            raise ConfigurationError(f"cannot read the key file {path}: {exc.strerror or exc}") from None
        if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigurationError(f"key file {path} is readable by others: chmod 600 it")
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError):
            raise ConfigurationError(f"{path} is not an unencrypted PEM private key") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigurationError(f"{path} does not hold an Ed25519 key")
        return cls(key)

    def save(self, path: Path) -> None:
        """Write the key to a new file (mode 0600); an existing file is never overwritten."""
        pem = self._private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(pem)

    @property
    def public_bytes(self) -> bytes:
        return self._private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @property
    def public_b64(self) -> str:
        return b64encode(self.public_bytes)

    @property
    def id(self) -> str:
        return key_id(self.public_bytes)

    def sign(self, message: bytes) -> bytes:
        return self._private.sign(message)

    def __repr__(self) -> str:
        return f"SigningKey(public_key={self.public_b64!r})"

    def __reduce__(self) -> Any:
        raise TypeError("a SigningKey holds a private key and cannot be pickled")


def load_or_create_node_key(path: Path) -> SigningKey:
    """This node's key: read from ``path``, or made there (0600, in a 0700 directory) on first start."""
    path = Path(path).expanduser()
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = SigningKey.generate()
        try:
            key.save(path)
            return key
        except FileExistsError:
            pass  # another process of this node made it first: use theirs
    return SigningKey.load(path)


# -- node requests --------------------------------------------------------------------------------


def node_request_message(
    *, kind: str, folder: str | None, name: str | None, public_key: bytes, fingerprint: str, nonce: str,
    node_id: str,
) -> bytes:
    """What a node signs to ask for a key release (``kind`` 'dek') or the storage config ('cdn')."""
    document = {
        "kind": kind, "folder": folder, "name": name, "public_key": b64encode(public_key),
        "fingerprint": fingerprint, "nonce": nonce, "node_id": node_id,
    }
    return NODE_REQUEST_LABEL + canonical(document)


# -- publisher signatures -------------------------------------------------------------------------


def dek_commitment(dek: bytes, model_id: str) -> str:
    """A commitment to a data key that reveals nothing about it: HMAC-SHA256(dek, label | id)."""
    return b64encode(hmac.new(dek, DEK_COMMITMENT_LABEL + model_id.encode("ascii"), hashlib.sha256).digest())


def manifest_message(folder: str, manifest: Mapping[str, Any]) -> bytes:
    """What a publisher signs: the folder and every field of the manifest but its signature."""
    fields = {key: value for key, value in manifest.items() if key != MANIFEST_SIGNATURE_FIELD}
    return MANIFEST_LABEL + canonical({"folder": folder, "manifest": fields})


def sign_manifest(key: SigningKey, folder: str, manifest: Mapping[str, Any]) -> dict[str, str]:
    """The ``signature`` field of a manifest (which must already hold its ``dek_commitment``)."""
    return {"key": key.public_b64, "value": b64encode(key.sign(manifest_message(folder, manifest)))}


def cdn_message(config: Mapping[str, Any]) -> bytes:
    fields = {key: value for key, value in config.items() if key != MANIFEST_SIGNATURE_FIELD}
    return CDN_LABEL + canonical(fields)


class PublisherTrust:
    """The publishers a node trusts; with none configured, everything passes (and a warning says so)."""

    def __init__(self, public_keys: Iterable[str] = ()) -> None:
        self._keys = {decode_ed25519_public_key(text) for text in public_keys}

    @property
    def enforced(self) -> bool:
        return bool(self._keys)

    def _signed(self, signature: Any, message: bytes) -> bool:
        if not isinstance(signature, Mapping):
            return False
        try:
            public_key = b64decode(str(signature.get("key", "")))
            value = b64decode(str(signature.get("value", "")))
        except ValueError:
            return False
        return public_key in self._keys and verify(public_key, value, message)

    def check_manifest(
        self, folder: str, manifest: Mapping[str, Any], *, dek: bytes | None = None, what: str
    ) -> None:
        """:class:`IntegrityError` unless a trusted publisher signed ``manifest`` for ``folder``
        (and, given ``dek``, committed to that data key)."""
        if not self.enforced:
            return
        if not self._signed(manifest.get(MANIFEST_SIGNATURE_FIELD), manifest_message(folder, manifest)):
            raise IntegrityError(f"{what}: manifest not signed by a trusted publisher")
        if dek is not None:
            expected = dek_commitment(dek, str(manifest.get("id", "")))
            if not hmac.compare_digest(str(manifest.get("dek_commitment", "")), expected):
                raise IntegrityError(f"{what}: the released data key is not the one the publisher signed")

    def check_cdn(self, config: Mapping[str, Any]) -> None:
        if self.enforced and not self._signed(config.get(MANIFEST_SIGNATURE_FIELD), cdn_message(config)):
            raise IntegrityError("the storage config is not signed by a trusted publisher")
