"""Encryption at rest under the server's master key (``RESOURCE_MASTER_KEY``).

Blob layout: version ``0x01`` | nonce (12 random bytes) | AES-256-GCM ciphertext and tag. The
associated data names what the blob is for (a DEK of one (folder, name), or the CDN config), so a
row copied onto another resource, or a DEK swapped into the CDN slot, fails to decrypt.
"""

from __future__ import annotations

import json
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from lib.errors import IntegrityError

_VERSION = b"\x01"
_NONCE_BYTES = 12
_AAD_PREFIX = b"sealserve/resource-api/at-rest/v1|"


def dek_aad(folder: str, name: str) -> bytes:
    # JSON keeps the pair unambiguous whatever characters the names hold.
    return _AAD_PREFIX + b"dek|" + json.dumps([folder, name]).encode("utf-8")


CDN_AAD = _AAD_PREFIX + b"cdn"


class MasterKeyCipher:
    """AES-256-GCM under the master key; repr never shows the key."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("the master key is 32 bytes")
        self._aead = AESGCM(key)

    def encrypt(self, plaintext: bytes, *, aad: bytes) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        return _VERSION + nonce + self._aead.encrypt(nonce, plaintext, aad)

    def decrypt(self, blob: bytes, *, aad: bytes) -> bytes:
        if blob[:1] != _VERSION or len(blob) < 1 + _NONCE_BYTES + 16:
            raise IntegrityError("a stored secret has an unknown format")
        try:
            return self._aead.decrypt(blob[1 : 1 + _NONCE_BYTES], blob[1 + _NONCE_BYTES :], aad)
        except InvalidTag:
            # Most often a changed RESOURCE_MASTER_KEY, else a tampered row.
            raise IntegrityError(
                "a stored secret failed to decrypt (wrong master key or tampered row)"
            ) from None

    def __repr__(self) -> str:
        return "MasterKeyCipher(<hidden>)"
