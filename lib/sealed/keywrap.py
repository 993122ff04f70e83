"""Node key release (docs/sealed-format.md §7): wrap a secret to one process on one machine.

The loader of a node makes an ephemeral X25519 key pair per process and sends its public key and
the node fingerprint. The resource API wraps a secret (a model's DEK, the CDN credentials) with:

    ephemeral sender key pair (e, E);  shared = X25519(e, recipient public key R)
    key  = HKDF-SHA256(ikm = shared, salt = E | R, info = INFO_PREFIX + context + "|" + fingerprint)
    body = AES-256-GCM(key, nonce = 12 random bytes, aad = the same info bytes)

so a captured response is useless to any other process (it lacks the private key), to the same
process claiming another machine (fingerprint in info and AAD), and for another purpose (context).
Wire form: :class:`WrappedSecret`, three base64 strings, JSON-serialisable.
"""

from __future__ import annotations

import base64
import binascii
import os
from typing import Any, NoReturn

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pydantic import BaseModel, ConfigDict, Field, field_validator

from lib.errors import IntegrityError

INFO_PREFIX = b"sealserve/keywrap/v1|"
PUBLIC_KEY_SIZE = 32
NONCE_SIZE = 12
KEY_SIZE = 32
TAG_SIZE = 16


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64decode(text: str) -> bytes:
    """Strict standard base64: anything that is not canonical base64 raises ``ValueError``."""
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise ValueError("not valid base64") from exc


def decode_public_key(text: str) -> bytes:
    """A base64 X25519 public key as 32 raw bytes, or ``ValueError``."""
    raw = b64decode(text)
    if len(raw) != PUBLIC_KEY_SIZE:
        raise ValueError(f"an X25519 public key is {PUBLIC_KEY_SIZE} bytes")
    return raw


def check_peer_public_key(raw: bytes) -> None:
    """``ValueError`` unless ``raw`` is an X25519 public key a shared secret can be made with.

    A low-order point (all zeros among them) makes X25519 output all zeros, whatever the other
    key: ``exchange`` refuses it, and so does this check, before any secret is touched.
    """
    if len(raw) != PUBLIC_KEY_SIZE:
        raise ValueError(f"an X25519 public key is {PUBLIC_KEY_SIZE} bytes")
    try:
        X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(raw))
    except ValueError:
        raise ValueError("the X25519 public key is a low-order point") from None


def _info(context: str, fingerprint: str) -> bytes:
    # A "|" inside the context would make two (context, fingerprint) pairs share one info string.
    if not context or "|" in context:
        raise ValueError("context must be non-empty and must not contain '|'")
    if not fingerprint:
        raise ValueError("fingerprint must be non-empty")
    return INFO_PREFIX + context.encode("utf-8") + b"|" + fingerprint.encode("utf-8")


def _derive_key(shared: bytes, sender_public: bytes, recipient_public: bytes, info: bytes) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(), length=KEY_SIZE, salt=sender_public + recipient_public, info=info
    ).derive(shared)


def _raw_public(key: X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


class WrappedSecret(BaseModel):
    """A secret wrapped to one node key pair; every field is standard base64."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ephemeral_public_key: str = Field(description="the sender's ephemeral X25519 public key (32 bytes)")
    nonce: str = Field(description="the AES-256-GCM nonce (12 bytes)")
    ciphertext: str = Field(description="AES-256-GCM ciphertext followed by its 16-byte tag")

    @field_validator("ephemeral_public_key")
    @classmethod
    def _check_public_key(cls, value: str) -> str:
        decode_public_key(value)
        return value

    @field_validator("nonce")
    @classmethod
    def _check_nonce(cls, value: str) -> str:
        if len(b64decode(value)) != NONCE_SIZE:
            raise ValueError(f"the nonce is {NONCE_SIZE} bytes")
        return value

    @field_validator("ciphertext")
    @classmethod
    def _check_ciphertext(cls, value: str) -> str:
        if len(b64decode(value)) < TAG_SIZE:
            raise ValueError("the ciphertext is shorter than its tag")
        return value


def wrap_for_node(
    secret: bytes, recipient_public_key: bytes, fingerprint: str, *, context: str
) -> WrappedSecret:
    """Wrap ``secret`` so only the holder of the matching private key, on ``fingerprint``, opens it."""
    info = _info(context, fingerprint)
    if len(recipient_public_key) != PUBLIC_KEY_SIZE:
        raise ValueError(f"an X25519 public key is {PUBLIC_KEY_SIZE} bytes")
    ephemeral = X25519PrivateKey.generate()
    ephemeral_public = _raw_public(ephemeral.public_key())
    # exchange() rejects low-order points (an all-zero shared secret) with ValueError.
    shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(recipient_public_key))
    key = _derive_key(shared, ephemeral_public, recipient_public_key, info)
    nonce = os.urandom(NONCE_SIZE)
    ciphertext = AESGCM(key).encrypt(nonce, secret, info)
    return WrappedSecret(
        ephemeral_public_key=b64encode(ephemeral_public),
        nonce=b64encode(nonce),
        ciphertext=b64encode(ciphertext),
    )


def _fail() -> NoReturn:
    # One message for every cause, so the error tells an attacker nothing about which input differed.
    raise IntegrityError(
        "wrapped secret failed verification (wrong key pair, fingerprint, context or tampered)"
    )


class NodeKeyPair:
    """An ephemeral X25519 key pair, one per process; it deliberately refuses to be pickled."""

    __slots__ = ("_private",)

    def __init__(self, private_key: X25519PrivateKey) -> None:
        self._private = private_key

    @classmethod
    def generate(cls) -> NodeKeyPair:
        return cls(X25519PrivateKey.generate())

    def public_bytes(self) -> bytes:
        return _raw_public(self._private.public_key())

    def public_key_b64(self) -> str:
        return b64encode(self.public_bytes())

    def unwrap(self, wrapped: WrappedSecret, fingerprint: str, *, context: str) -> bytes:
        """The secret, or :class:`IntegrityError` if anything differs from what it was wrapped for."""
        info = _info(context, fingerprint)
        try:
            sender_public = decode_public_key(wrapped.ephemeral_public_key)
            nonce = b64decode(wrapped.nonce)
            ciphertext = b64decode(wrapped.ciphertext)
            shared = self._private.exchange(X25519PublicKey.from_public_bytes(sender_public))
        except ValueError:
            _fail()
        if len(nonce) != NONCE_SIZE:
            _fail()
        key = _derive_key(shared, sender_public, self.public_bytes(), info)
        try:
            return AESGCM(key).decrypt(nonce, ciphertext, info)
        except InvalidTag:
            _fail()

    def __repr__(self) -> str:
        return f"NodeKeyPair(public_key={self.public_key_b64()!r})"

    def __reduce__(self) -> Any:
        # A private key that travels (through Ray, into a pickle on disk) is no longer per process.
        raise TypeError("NodeKeyPair holds a per-process private key and cannot be pickled")
