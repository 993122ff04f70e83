"""Rules and storage for secrets that both servers (the ingress and the resource API) share.

A secret comes from the environment; in development a missing one is generated once and kept in
the state directory (mode 0600). Placeholder values from examples never guard a deployment.
"""

from __future__ import annotations

import math
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
# Random hex of 32 characters estimates at about 120; 'a' * 32 at none, 'ab' * 16 at 32.
MIN_ESTIMATED_BITS = 96
# Development generates missing secrets and accepts placeholders; production refuses to start.
Environment = Literal["development", "production"]


def is_weak_secret(text: str) -> bool:
    """Whether ``text`` is plainly not random: a placeholder, a repeated pattern (``'ab' * 16``), or
    too few distinct characters for its length to hold :data:`MIN_ESTIMATED_BITS` (``'a' * 32``).

    A cheap upper bound on entropy, not a measure: it catches typed and patterned values, never
    vouches for a value being random.
    """
    value = text.strip()
    if value.lower() in PLACEHOLDER_SECRETS:
        return True
    distinct = len(set(value))
    if distinct < 2 or len(value) * math.log2(distinct) < MIN_ESTIMATED_BITS:
        return True
    # The smallest period of the string (prefix function): a repeated pattern has one of at most
    # half its length.
    border = [0] * len(value)
    for i in range(1, len(value)):
        k = border[i - 1]
        while k and value[i] != value[k]:
            k = border[k - 1]
        border[i] = k + 1 if value[i] == value[k] else k
    return len(value) - border[-1] <= len(value) // 2


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
