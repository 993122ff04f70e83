"""A real resource API for tests and benchmarks: ``sealserve resource-api serve`` run as a separate process.

``start_resource_api_server(workdir)`` picks a free loopback port, gives the process its own
SQLite file and random secrets (production mode, so nothing is generated behind the test's back),
waits for ``/health`` with a deadline and returns a handle. Users and the CDN config are added
through the same CLI an operator uses, passwords and keys passed in environment variables.
Nodes are enrolled and approved the same way (``approve_node``: the node's key enrolls over
HTTP, the operator's ``nodes approve`` approves it). ``stop()`` ends the process by its PID.
:class:`RecordingSession`, given to a ``ResourceClient``, records every request it makes, so a
test can assert exactly what went over the wire.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests

from lib.sealed.resource_client import ResourceClient
from lib.sealed.signing import SigningKey
from lib.sealed.wire import CdnConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
START_DEADLINE_S = 30.0
# The real console entry point (`sealserve = lib.cli:main`), without depending on the script's path.
SEALSERVE_CLI = [sys.executable, "-c", "import sys; from lib.cli import main; sys.exit(main())"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RecordingSession(requests.Session):
    """Records (method, path, status or exception name) of every request the client makes."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, str, Any]] = []

    def request(self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any) -> requests.Response:
        path = urlsplit(str(url)).path
        try:
            response = super().request(method, url, *args, **kwargs)
        except requests.RequestException as exc:
            self.calls.append((str(method), path, type(exc).__name__))
            raise
        self.calls.append((str(method), path, response.status_code))
        return response


@dataclass
class ResourceApiServer:
    url: str
    process: subprocess.Popen[bytes]
    env: dict[str, str]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def cli(self, *argv: str, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``sealserve resource-api ARGV`` against this server's database; raise on failure."""
        result = subprocess.run(
            [*SEALSERVE_CLI, "resource-api", *argv], cwd=REPO_ROOT, env={**self.env, **(extra_env or {})},
            capture_output=True, text=True, timeout=60, check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"resource-api {argv[:2]} failed ({result.returncode}): {result.stderr[-2000:]}"
            )
        return result

    def create_user(self, email: str, password: str, role: str, fingerprints: Sequence[str] = ()) -> None:
        args = ["users", "create", "--email", email, "--password-env", "TEST_USER_PASSWORD", "--role", role]
        for fingerprint in fingerprints:
            args += ["--fingerprint", fingerprint]
        self.cli(*args, extra_env={"TEST_USER_PASSWORD": password})

    def approve_node(self, account: tuple[str, str], node_key: SigningKey, fingerprint: str) -> str:
        """Enroll ``node_key`` as ``account`` (email, password) would, then approve it; its id."""
        client = ResourceClient(self.url, *account, node_key=node_key)
        try:
            node = client.enroll(fingerprint)
        finally:
            client.close()
        self.cli("nodes", "approve", node.node_id)
        return node.node_id

    def set_cdn(self, config: CdnConfig, *, signing_key_file: Path | None = None) -> None:
        args = ["cdn", "set", "--bucket", config.bucket, "--region", config.region,
                "--access-key-env", "TEST_S3_ACCESS", "--secret-key-env", "TEST_S3_SECRET"]
        if config.endpoint_url:
            args += ["--endpoint-url", config.endpoint_url]
        if signing_key_file is not None:
            args += ["--signing-key", str(signing_key_file)]
        self.cli(*args, extra_env={"TEST_S3_ACCESS": config.access_key_id,
                                   "TEST_S3_SECRET": config.secret_access_key.get_secret_value()})

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM by PID, then SIGKILL if it has not exited within 10 s."""
        if self.process.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.process.wait(timeout=10)


def start_resource_api_server(
    workdir: Path,
    *,
    token_ttl_seconds: int = 900,
    token_leeway_seconds: int = 0,
    max_upload_bytes: int | None = None,
) -> ResourceApiServer:
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {
        **os.environ,
        "RESOURCE_MASTER_KEY": secrets.token_hex(32),
        "RESOURCE_JWT_SECRET": secrets.token_urlsafe(48),
        "RESOURCE_API_ENV": "production",
        "RESOURCE_API_DATABASE_URL": f"sqlite:///{workdir / 'resource-api.db'}",
    }
    argv = [*SEALSERVE_CLI, "resource-api", "serve", "--host", "127.0.0.1", "--port", str(port),
            "--token-ttl", str(token_ttl_seconds), "--token-leeway", str(token_leeway_seconds)]
    if max_upload_bytes is not None:
        argv += ["--max-upload-bytes", str(max_upload_bytes)]
    log_path = workdir / "resource-api.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    server = ResourceApiServer(url=f"http://127.0.0.1:{port}", process=process, env=env, log_path=log_path)
    deadline = time.monotonic() + START_DEADLINE_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"resource API exited with {process.returncode}:\n{server.log_tail()}")
        try:
            if requests.get(f"{server.url}/health", timeout=1).status_code == 200:
                return server
        except requests.RequestException:
            pass
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"resource API not healthy within {START_DEADLINE_S}s:\n{server.log_tail()}")
