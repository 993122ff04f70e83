"""Password hashing for resource API users: scrypt (stdlib), per-user random salt.

Stored form: ``scrypt$<n>$<r>$<p>$<salt b64>$<hash b64>``. Parameters travel with each hash so
they can be raised later without invalidating existing users; :meth:`PasswordHasher.verify` only
accepts parameters inside sane bounds, so a tampered row cannot make a login allocate gigabytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from dataclasses import dataclass

MIN_PASSWORD_LENGTH = 12
MAX_PASSWORD_LENGTH = 1024
_SALT_BYTES = 16
_HASH_BYTES = 32
_MAX_N = 2**20
_MAX_R = 16
_MAX_P = 4


@dataclass(frozen=True)
class PasswordHasher:
    """scrypt with N=2**15, r=8, p=1 by default: ~32 MiB and tens of milliseconds per hash."""

    n: int = 2**15
    r: int = 8
    p: int = 1

    def hash(self, password: str) -> str:
        salt = os.urandom(_SALT_BYTES)
        digest = _scrypt(password, salt, self.n, self.r, self.p)
        return "$".join(
            ["scrypt", str(self.n), str(self.r), str(self.p), _b64(salt), _b64(digest)]
        )

    def verify(self, password: str, stored: str) -> bool:
        """True when ``password`` matches ``stored``; False for any mismatch or malformed hash."""
        try:
            scheme, n_text, r_text, p_text, salt_text, digest_text = stored.split("$")
            n, r, p = int(n_text), int(r_text), int(p_text)
            salt = base64.b64decode(salt_text, validate=True)
            expected = base64.b64decode(digest_text, validate=True)
        except (ValueError, binascii.Error):
            return False
        if scheme != "scrypt" or not (1 < n <= _MAX_N and n & (n - 1) == 0) or not 0 < r <= _MAX_R:
            return False
        if not 0 < p <= _MAX_P or len(expected) != _HASH_BYTES:
            return False
        actual = _scrypt(password, salt, n, r, p)
        return hmac.compare_digest(actual, expected)


def check_new_password(password: str) -> None:
    """Raise ``ValueError`` when a new password is too short or too long to accept."""
    if not MIN_PASSWORD_LENGTH <= len(password) <= MAX_PASSWORD_LENGTH:
        raise ValueError(
            f"a password must be {MIN_PASSWORD_LENGTH} to {MAX_PASSWORD_LENGTH} characters long"
        )


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int, dklen: int = _HASH_BYTES) -> bytes:
    # scrypt needs 128 * n * r * p bytes; the default maxmem (32 MiB) is too tight for n=2**15.
    maxmem = 128 * n * r * p + 16 * 1024 * 1024
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=maxmem, dklen=dklen)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
