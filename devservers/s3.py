"""A real S3-compatible server for tests and benchmarks: moto's standalone server, run as a separate process.

``start_s3_server()`` starts ``moto_server`` (from the venv that runs the tests) on a free port
and puts a small counting reverse proxy in front of it, in this process. ``endpoint_url`` is the
proxy; ``direct_endpoint_url`` is moto itself, for callers that want no extra hop.

Why a proxy: moto's server has no request counter. Its "recorder" logs requests to a file, but
it also logs every request body (base64) and appends each entry in two writes, so parallel
multipart uploads can interleave entries and corrupt the log. A proxy sees every request exactly
as the client sent it, so it can count per key and per ``Range``.

How downloads are counted (``download_count``): a download is a *successful GET of the object
that starts at byte 0* — a GET with no ``Range`` header (one streamed GET) or with
``Range: bytes=0-...`` (the first range of parallel ranged GETs). Every download fetches byte 0
exactly once, however many ranges it uses, and HEAD requests (``exists``, ``object_size``) do not
count. Failed responses (4xx/5xx, or 502 when moto is unreachable) are not counted, so a first
range retried after an error still counts once; a fetch that resumes after a broken body asks
from a later byte, so it does not count again.

Faults, for the tests of what a client does when the store misbehaves: ``cut_responses`` makes
the proxy break the body of the next GETs of an object after a number of bytes (the headers
announced the full length, so the client sees a connection dropped mid-stream), optionally
taking the store down right after; ``set_down`` makes it drop every request unanswered, as a
dead server would. Bodies are relayed as they arrive (1 MiB at a time), never held whole.
"""

from __future__ import annotations

import dataclasses
import http.client
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from urllib.parse import unquote, urlsplit

from pydantic import SecretStr

from devservers.resource_api import free_port
from lib.sealed.wire import CdnConfig

START_DEADLINE_S = 20.0
# Headers that describe one connection, not the message: never forwarded as they are.
_HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "expect", "content-length",
})


RELAY_CHUNK = 1 << 20


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the proxy forwarded it; ``path`` is percent-decoded and has no query.

    ``sent`` is the body bytes relayed to the client so far; ``cut`` whether the proxy broke the
    body off on purpose (:meth:`S3Server.cut_responses`); status 0: dropped unanswered (down).
    """

    method: str
    path: str
    query: str
    range: str | None
    status: int
    sent: int = 0
    cut: bool = False
    if_match: str | None = None


@dataclass
class _Cut:
    path: str
    after_bytes: int
    times: int
    then_down: bool


class _CountingProxy(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, upstream_port: int) -> None:
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.upstream_port = upstream_port
        self.lock = threading.Lock()
        self.records: list[RecordedRequest] = []
        self.cuts: list[_Cut] = []
        self.down = False

    def record(self, entry: RecordedRequest) -> int:
        with self.lock:
            self.records.append(entry)
            return len(self.records) - 1

    def update(self, index: int, **changes: object) -> None:
        with self.lock:
            if index < len(self.records):  # reset_counts may have cleared it meanwhile
                self.records[index] = dataclasses.replace(self.records[index], **changes)  # type: ignore[arg-type]

    def take_cut(self, method: str, path: str) -> _Cut | None:
        """The cut rule for this response, if any; each rule cuts ``times`` responses."""
        with self.lock:
            for rule in self.cuts:
                if method == "GET" and rule.path == path and rule.times > 0:
                    rule.times -= 1
                    return rule
        return None


class _ProxyHandler(BaseHTTPRequestHandler):
    # HTTP/1.1 keeps client connections alive and answers "Expect: 100-continue" (botocore sends
    # it before large upload parts).
    protocol_version = "HTTP/1.1"
    server: _CountingProxy

    def log_message(self, format: str, *args: object) -> None:
        pass  # one line per request on stderr would drown the test output

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers: dropped, the body is forwarded with a Content-Length
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _drop(self) -> None:
        """Close the client's connection at once: no answer, or the rest of a body never comes."""
        self.close_connection = True
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _forward(self) -> None:
        body = self._read_body()
        split = urlsplit(self.path)
        path = unquote(split.path)
        entry = RecordedRequest(
            method=self.command, path=path, query=split.query, range=self.headers.get("Range"), status=0,
            if_match=self.headers.get("If-Match"),
        )
        if self.server.down:
            self.server.record(entry)
            self._drop()
            return
        upstream = http.client.HTTPConnection("127.0.0.1", self.server.upstream_port, timeout=60)
        try:
            try:
                response = self._ask_upstream(upstream, body)
            except OSError:
                index = self.server.record(dataclasses.replace(entry, status=502))
                self._answer(502, "Bad Gateway", [("Content-Type", "text/plain")], b"moto server unreachable")
                self.server.update(index, sent=len(b"moto server unreachable"))
                return
            index = self.server.record(dataclasses.replace(entry, status=response.status))
            self._relay(response, index, path)
        finally:
            upstream.close()

    def _ask_upstream(self, upstream: http.client.HTTPConnection, body: bytes) -> http.client.HTTPResponse:
        # skip_host: keep the client's Host header, which its SigV4 signature covers.
        upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
        for name, value in self.headers.items():
            if name.lower() not in _HOP_BY_HOP:
                upstream.putheader(name, value)
        if body or self.command in ("PUT", "POST"):
            upstream.putheader("Content-Length", str(len(body)))
        upstream.endheaders(body or None)
        return upstream.getresponse()

    def _answer(self, status: int, reason: str, headers: list[tuple[str, str]], data: bytes) -> None:
        self.send_response_only(status, reason)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _relay(self, response: http.client.HTTPResponse, index: int, path: str) -> None:
        headers = response.getheaders()
        length = response.getheader("Content-Length")
        self.send_response_only(response.status, response.reason)
        for name, value in headers:
            if name.lower() not in _HOP_BY_HOP:
                self.send_header(name, value)
        if self.command == "HEAD":
            # A HEAD answer announces the object's length but carries no body: keep moto's figure.
            self.send_header("Content-Length", length or "0")
            self.end_headers()
            return
        if length is None:  # moto chunked it: relay it whole, with a length
            data = response.read()
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self._write(data, index, 0)
            return
        self.send_header("Content-Length", length)
        self.end_headers()
        cut = self.server.take_cut(self.command, path) if 200 <= response.status < 300 else None
        sent = 0
        while True:
            chunk = response.read(RELAY_CHUNK if cut is None else min(RELAY_CHUNK, cut.after_bytes - sent))
            if not chunk:
                return
            if not self._write(chunk, index, sent):
                return
            sent += len(chunk)
            if cut is not None and sent >= cut.after_bytes:
                if cut.then_down:
                    self.server.down = True
                self.server.update(index, sent=sent, cut=True)
                self._drop()
                return

    def _write(self, data: bytes, index: int, sent: int) -> bool:
        try:
            self.wfile.write(data)
        except OSError:  # the client went away (it closed a stream it no longer needed)
            self.close_connection = True
            return False
        self.server.update(index, sent=sent + len(data))
        return True

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward


def _answers(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
    try:
        conn.request("GET", "/moto-api/data.json")
        conn.getresponse().read()
        return True
    except OSError:
        return False
    finally:
        conn.close()


class S3Server:
    """A running moto server process and the counting proxy in front of it."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
        self._process = process
        self._log_path = log_path
        self.pid = process.pid
        self.direct_endpoint_url = f"http://127.0.0.1:{port}"
        self._proxy = _CountingProxy(port)
        self._proxy_thread = threading.Thread(
            target=self._proxy.serve_forever, name="s3-counting-proxy", daemon=True
        )
        self._proxy_thread.start()
        self.endpoint_url = f"http://127.0.0.1:{self._proxy.server_address[1]}"
        self._stopped = False

    def config(self, bucket: str, *, direct: bool = False) -> CdnConfig:
        """A CdnConfig for ``bucket``: through the counting proxy, or straight to moto (benchmarks)."""
        return CdnConfig(
            endpoint_url=self.direct_endpoint_url if direct else self.endpoint_url,
            bucket=bucket, region="us-east-1",
            access_key_id="testing", secret_access_key=SecretStr("testing"),
        )

    def requests(self) -> list[RecordedRequest]:
        """Every request the proxy forwarded since the start or the last ``reset_counts``."""
        with self._proxy.lock:
            return list(self._proxy.records)

    def reset_counts(self) -> None:
        with self._proxy.lock:
            self._proxy.records.clear()

    def cut_responses(self, bucket: str, key: str, after_bytes: int, *, times: int = 1,
                      then_down: bool = False) -> None:
        """Break the body of the next ``times`` successful GETs of ``bucket/key`` after ``after_bytes``
        bytes, by closing the connection; with ``then_down``, go down (``set_down``) right after."""
        if after_bytes < 1 or times < 1:
            raise ValueError("after_bytes and times must be at least 1")
        with self._proxy.lock:
            self._proxy.cuts.append(_Cut(f"/{bucket}/{key}", after_bytes, times, then_down))

    def set_down(self, down: bool = True) -> None:
        """While down, every request's connection is closed unanswered (recorded with status 0)."""
        self._proxy.down = down

    def clear_faults(self) -> None:
        with self._proxy.lock:
            self._proxy.cuts.clear()
        self._proxy.down = False

    def request_count(self, method: str, path_prefix: str) -> int:
        """Requests with this method whose decoded path (``/bucket/key``) starts with the prefix."""
        method = method.upper()
        return sum(1 for r in self.requests() if r.method == method and r.path.startswith(path_prefix))

    def download_count(self, bucket: str, key: str) -> int:
        """Completed downloads of ``bucket/key``: successful GETs that start at byte 0 (see module doc)."""
        return sum(
            1 for r in self.requests()
            if r.method == "GET" and r.path == f"/{bucket}/{key}" and 200 <= r.status < 300
            and (r.range is None or r.range.replace(" ", "").startswith("bytes=0-"))
        )

    def stderr_tail(self, max_bytes: int = 4000) -> str:
        try:
            return self._log_path.read_bytes()[-max_bytes:].decode(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop the proxy, then the moto process by its PID (terminate, then kill if it lingers)."""
        if self._stopped:
            return
        self._stopped = True
        self._proxy.shutdown()
        self._proxy.server_close()
        self._process.terminate()
        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout=5)
        self._log_path.unlink(missing_ok=True)

    def __enter__(self) -> S3Server:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _moto_server_executable() -> Path:
    executable = Path(sys.executable).parent / "moto_server"
    if not executable.exists():
        raise RuntimeError(f"moto_server not found next to {sys.executable}; install moto[server]")
    return executable


def _launch(port: int, log_path: Path, extra_env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    env = dict(os.environ, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", **(extra_env or {}))
    with log_path.open("wb") as log:
        # stderr to a file, not a pipe: werkzeug logs every request, and an unread pipe would fill
        # and freeze the server.
        return subprocess.Popen(
            [str(_moto_server_executable()), "-H", "127.0.0.1", "-p", str(port)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
        )


def start_s3_server(deadline_s: float = START_DEADLINE_S, *, extra_env: dict[str, str] | None = None
                    ) -> S3Server:
    """Start moto's server on a free port and return once it answers HTTP.

    ``extra_env`` goes to moto's process: ``INITIAL_NO_AUTH_ACTION_COUNT=N`` makes it enforce IAM
    users and policies after its first N requests (tests of least privilege)."""
    failures: list[str] = []
    # The free port can be taken between probing and binding; a fresh port usually fixes that.
    for _ in range(3):
        port = free_port()
        fd, log_name = tempfile.mkstemp(prefix="moto-server-", suffix=".log")
        os.close(fd)
        log_path = Path(log_name)
        process = _launch(port, log_path, extra_env)
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline and process.poll() is None:
            if _answers(port):
                return S3Server(process, port, log_path)
            time.sleep(0.1)
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
            tail = log_path.read_bytes()[-4000:].decode(errors="replace")
            log_path.unlink(missing_ok=True)
            raise RuntimeError(f"moto_server did not answer on port {port} within {deadline_s:.0f}s; "
                               f"output tail:\n{tail}")
        tail = log_path.read_bytes()[-4000:].decode(errors="replace")
        log_path.unlink(missing_ok=True)
        failures.append(f"port {port}: exited with {process.returncode}; output tail:\n{tail}")
        if "in use" not in tail:
            break
    raise RuntimeError("moto_server failed to start:\n" + "\n".join(failures))
