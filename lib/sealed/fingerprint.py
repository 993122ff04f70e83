"""The node's hardware fingerprint, bound into every key the resource API releases.

The fingerprint (docs/sealed-format.md §7) is an HMAC, keyed with an app-specific constant, over
the machine-id, the hostname and the sorted GPU UUIDs. It identifies a node to the resource API
(allow-lists, the fetch log) without ever sending the raw machine-id, which other software uses as
a stable secret-ish handle. Every input can be injected so tests never depend on the machine they
run on.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import shutil
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

# Not a secret: it only keeps sealserve fingerprints unlinkable to hashes other tools derive
# from the same machine-id.
APP_FINGERPRINT_KEY = b"sealserve/node-fingerprint/v1"
DEFAULT_MACHINE_ID_PATHS: tuple[Path, ...] = (Path("/etc/machine-id"), Path("/var/lib/dbus/machine-id"))
NVIDIA_SMI_TIMEOUT_S = 5.0


def read_machine_id(path: str | Path | None = None) -> str:
    """The machine-id from ``path``, or from the first standard location that exists; "" if none."""
    candidates = (Path(path),) if path is not None else DEFAULT_MACHINE_ID_PATHS
    for candidate in candidates:
        try:
            return candidate.read_text(encoding="utf-8").strip()
        except OSError:
            continue
    # Containers often lack a machine-id; the hostname and GPUs still tell nodes apart.
    log.warning("no machine-id found; the node fingerprint uses hostname and GPU UUIDs only")
    return ""


def read_gpu_uuids(*, timeout: float = NVIDIA_SMI_TIMEOUT_S) -> list[str]:
    """GPU UUIDs reported by ``nvidia-smi``, or ``[]`` where it is absent, fails or hangs.

    nvidia-smi lists every GPU of the node whatever ``CUDA_VISIBLE_DEVICES`` says, so all
    processes on one node agree on the fingerprint.
    """
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        result = subprocess.run(  # noqa: S603 - fixed argv, no shell
            [exe, "--query-gpu=uuid", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=timeout, check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("nvidia-smi failed (%s); fingerprinting without GPU UUIDs", type(exc).__name__)
        return []
    if result.returncode != 0:
        log.warning("nvidia-smi exited %d; fingerprinting without GPU UUIDs", result.returncode)
        return []
    return [line.strip() for line in result.stdout.splitlines() if line.strip()]


def _length_prefixed(value: str) -> bytes:
    # Length prefixes keep the encoding unambiguous: ("ab", "c") and ("a", "bc") differ.
    raw = value.encode("utf-8")
    return len(raw).to_bytes(4, "big") + raw


def node_fingerprint(
    *,
    app_key: bytes = APP_FINGERPRINT_KEY,
    machine_id_path: str | Path | None = None,
    hostname: str | None = None,
    gpu_uuids: Sequence[str] | None = None,
) -> str:
    """Hex HMAC-SHA256 over machine-id, hostname and sorted GPU UUIDs (64 lowercase hex chars)."""
    machine_id = read_machine_id(machine_id_path)
    host = socket.gethostname() if hostname is None else hostname
    gpus = sorted(read_gpu_uuids() if gpu_uuids is None else gpu_uuids)
    message = b"".join(
        [
            _length_prefixed("machine-id"), _length_prefixed(machine_id),
            _length_prefixed("hostname"), _length_prefixed(host),
            _length_prefixed("gpus"), len(gpus).to_bytes(4, "big"),
            *(_length_prefixed(uuid) for uuid in gpus),
        ]
    )
    return hmac.new(app_key, message, hashlib.sha256).hexdigest()
