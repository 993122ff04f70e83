"""Rules and storage for secrets that both servers (the ingress and the resource API) share.

A secret comes from the environment; in development a missing one is generated once and kept in
the state directory (mode 0600). Placeholder values from examples never guard a deployment.
"""

from __future__ import annotations

import os
import secrets as pysecrets
import time
from pathlib import Path
from typing import Literal

from lib.errors import ConfigurationError

# Values that ship in examples and must never guard a production deployment.
PLACEHOLDER_SECRETS = frozenset(
    {"", "secret", "changeme", "change-me", "your-secure-secret-key", "dev", "development"}
)
MIN_SECRET_BYTES = 32
# Development generates missing secrets and accepts placeholders; production refuses to start.
Environment = Literal["development", "production"]


def read_or_create_secret(path: Path) -> str:
    """Return the secret stored at ``path``, creating it (mode 0600) exactly once.

    Several processes may race here (replicas starting together): ``O_EXCL`` makes one of them
    the writer, and the others read what it wrote.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        for _ in range(50):
            value = path.read_text().strip()
            if value:
                return value
            time.sleep(0.05)  # the creator has opened but not yet written the file
        raise ConfigurationError(f"{path} exists but is empty") from None
    value = pysecrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as handle:
        handle.write(value + "\n")
    return value
