"""The client of the resource API (docs/sealed-models.md), used by ``sealserve publish`` and the ModelLoader.

It logs in on first use and again on a 401 only, once per attempt: a 401 means the token expired
or the server rotated its secret, while a 403 is a denial that another login cannot change
(:class:`~lib.errors.PermissionDeniedError`, never retried). Connection errors, timeouts and 5xx
answers are retried with exponential backoff and jitter (:mod:`lib.retry`); when the attempts run
out the client raises :class:`~lib.errors.UpstreamError` naming the method and path. No message
or log line carries the password, a token or a key.

A node's client holds the node key (``node_key``): every release (``get``, ``cdn_config``) first
asks for a fresh nonce and signs the request with it (:mod:`lib.sealed.signing`); the first one
also enrolls the node key, and until an operator approves it the release is refused, naming the
command to run. Plain HTTP to a host other than loopback is refused unless ``allow_plain_http``.
"""

from __future__ import annotations

import builtins
import logging
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeVar
from urllib.parse import quote, urlsplit

import requests
from pydantic import BaseModel, SecretStr, ValidationError

from lib.errors import (
    ERRORS_BY_STATUS,
    AuthenticationError,
    ConfigurationError,
    IntegrityError,
    PermissionDeniedError,
    UpstreamError,
    ValidationFailedError,
)
from lib.retry import RetryPolicy, call_with_retries
from lib.schemas import TokenResponse
from lib.sealed.keywrap import NodeKeyPair
from lib.sealed.signing import SigningKey, node_request_message
from lib.sealed.wire import (
    DEK_BYTES,
    FINGERPRINT_PATTERN,
    CdnConfig,
    CdnResponse,
    FetchCountResponse,
    FetchKind,
    GetRequest,
    GetResponse,
    ListResponse,
    NodeInfo,
    NodeKeyRequest,
    NonceResponse,
    ResourceManifest,
    UploadRequest,
    UploadResponse,
    is_loopback_host,
    plain_http_refusal,
)

log = logging.getLogger(__name__)

_T = TypeVar("_T", bound=BaseModel)

DEFAULT_TIMEOUT: tuple[float, float] = (3.05, 30.0)
DEFAULT_RETRY = RetryPolicy()


@dataclass(frozen=True)
class FetchedResource:
    """A resource as a node receives it: the DEK is unwrapped and never shown in a repr."""

    manifest: ResourceManifest
    small_part: bytes = field(repr=False)
    dek: bytes = field(repr=False)


class _ServerError(Exception):
    """A 5xx answer, raised inside an attempt so the retry loop treats it like a dropped connection."""

    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


_TRANSIENT = (
    requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError, _ServerError
)


def _is_transient(exc: BaseException) -> bool:
    return isinstance(exc, _TRANSIENT)


class ResourceClient:
    """A logged-in session with the resource API at ``base_url``; safe to share between threads.

    Public API, one method per route: nodes use ``get``, ``list`` and ``cdn_config``; publishing
    uses ``list``, ``upload`` and ``cdn_config``; ``set_cdn_config`` (``PUT /cdn``) and
    ``fetch_count`` (``GET /stats/fetches``, the audit of key releases) are there for a
    publisher's own scripts.
    """

    def __init__(
        self,
        base_url: str,
        email: str,
        password: str | SecretStr,
        *,
        timeout: tuple[float, float] = DEFAULT_TIMEOUT,
        retry: RetryPolicy = DEFAULT_RETRY,
        session: requests.Session | None = None,
        sleep: Callable[[float], None] = time.sleep,
        node_key: SigningKey | None = None,
        allow_plain_http: bool = False,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("base_url must be an http(s) URL")
        refusal = plain_http_refusal(base_url, "the resource API")
        if refusal is not None and not allow_plain_http:
            raise ConfigurationError(refusal)
        self._node_key = node_key
        self._approved = False
        self._base_url = base_url.rstrip("/")
        # Messages name the origin without any user:password@ part of the URL.
        self._origin = f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        self.email = email
        self._password = password if isinstance(password, SecretStr) else SecretStr(password)
        self._timeout = timeout
        self._retry = retry
        self._session = session if session is not None else requests.Session()
        self._sleep = sleep
        self._token: str | None = None
        self._token_lock = threading.Lock()
        if parts.scheme == "http" and not is_loopback_host(parts.hostname):
            log.warning("resource API at %s is plain HTTP (allowed by allow_plain_http): passwords and "
                        "keys travel unencrypted", self._origin)

    def __repr__(self) -> str:
        return f"ResourceClient(base_url={self._origin!r}, email={self.email!r})"

    def close(self) -> None:
        self._session.close()

    # -- API -------------------------------------------------------------------------------------

    def upload(
        self, folder: str, name: str, small_part: bytes, manifest: ResourceManifest, dek: bytes
    ) -> UploadResponse:
        """Store the small part, manifest and DEK of (folder, name); see ``UploadResponse.status``."""
        body = _validated(
            UploadRequest, {"name": name, "small_part": small_part, "manifest": manifest, "dek": dek}
        )
        data = self._request("POST", f"/resources/{_segment(folder)}", json_body=body)
        return _parse(UploadResponse, data, "POST /resources/{folder}")

    def get(self, folder: str, name: str, keypair: NodeKeyPair, fingerprint: str) -> FetchedResource:
        """Fetch (folder, name) and unwrap its DEK; :class:`IntegrityError` if the key does not open."""
        signed = self._signed("dek", folder, name, keypair, fingerprint)
        body = _validated(GetRequest, {"name": name, **signed})
        path = f"/resources/get/{_segment(folder)}"
        response = _parse(GetResponse, self._request("POST", path, json_body=body), f"POST {path}")
        dek = keypair.unwrap(response.wrapped_key, fingerprint, context="dek")
        if len(dek) != DEK_BYTES:
            raise IntegrityError(f"the data key of {folder}/{name} has the wrong length")
        if len(response.small_part) != response.manifest.small_size or response.manifest.name != name:
            raise IntegrityError(f"the small part of {folder}/{name} does not match its manifest")
        return FetchedResource(manifest=response.manifest, small_part=response.small_part, dek=dek)

    def list(self, folder: str) -> builtins.list[ResourceManifest]:
        """The manifests in ``folder`` (no keys, no small parts)."""
        path = f"/resources/{_segment(folder)}"
        return _parse(ListResponse, self._request("GET", path), f"GET {path}").resources

    def cdn_config(self, keypair: NodeKeyPair, fingerprint: str) -> CdnConfig:
        body = _validated(NodeKeyRequest, self._signed("cdn", None, None, keypair, fingerprint))
        response = _parse(CdnResponse, self._request("POST", "/cdn", json_body=body), "POST /cdn")
        plaintext = keypair.unwrap(response.wrapped_config, fingerprint, context="cdn")
        try:
            return CdnConfig.from_plaintext_json(plaintext)
        except ValidationError:
            raise UpstreamError("resource API POST /cdn released a malformed CDN config") from None

    def enroll(self, fingerprint: str, hostname: str | None = None) -> NodeInfo:
        """Introduce this node's key (idempotent); its status says whether it may receive keys."""
        if self._node_key is None:
            raise ConfigurationError("enrolling needs this node's key (node_key)")
        host = hostname if hostname is not None else socket.gethostname()
        host = re.sub(r"[^A-Za-z0-9._-]", "-", host)[:253]
        body = {"node_key": self._node_key.public_b64, "fingerprint": fingerprint, "hostname": host}
        return _parse(NodeInfo, self._request("POST", "/nodes/enroll", json_body=body), "POST /nodes/enroll")

    def _signed(
        self, kind: str, folder: str | None, name: str | None, keypair: NodeKeyPair, fingerprint: str
    ) -> dict[str, Any]:
        """The node part of a release request: a fresh nonce and the node key's signature over it all."""
        key = self._node_key
        if key is None:
            raise ConfigurationError("a key release needs this node's key (node_key)")
        if not re.fullmatch(FINGERPRINT_PATTERN, fingerprint):
            raise ValidationFailedError("fingerprint: must be 64 lowercase hex characters")
        if not self._approved:
            node = self.enroll(fingerprint)
            if node.status == "revoked":
                raise PermissionDeniedError(f"node {node.node_id[:16]} is revoked: it receives no keys")
            if node.status != "approved":
                raise PermissionDeniedError(
                    f"node {node.node_id[:16]} is {node.status}: an operator approves it with "
                    f"`sealserve resource-api nodes approve {node.node_id}`"
                )
            self._approved = True
        nonce = _parse(NonceResponse, self._request("POST", "/nodes/nonce"), "POST /nodes/nonce").nonce
        public_key = keypair.public_bytes()
        message = node_request_message(kind=kind, folder=folder, name=name, public_key=public_key,
                                       fingerprint=fingerprint, nonce=nonce, node_id=key.id)
        return {"public_key": public_key, "fingerprint": fingerprint, "node_id": key.id, "nonce": nonce,
                "signature": key.sign(message)}

    def set_cdn_config(self, config: CdnConfig) -> None:
        """Store the CDN config (publisher only); the secret key travels in the body: use HTTPS."""
        body = config.model_dump(mode="json")
        body["secret_access_key"] = config.secret_access_key.get_secret_value()
        self._request("PUT", "/cdn", json_body=body)

    def fetch_count(
        self,
        folder: str | None = None,
        name: str | None = None,
        kind: FetchKind | None = None,
        *,
        fingerprint: str | None = None,
    ) -> int:
        """How many secrets were released, filtered by folder, name, kind and node (publisher only)."""
        filters = {"folder": folder, "name": name, "kind": kind, "fingerprint": fingerprint}
        params = {key: value for key, value in filters.items() if value is not None}
        data = self._request("GET", "/stats/fetches", params=params)
        return _parse(FetchCountResponse, data, "GET /stats/fetches").count

    # -- transport -------------------------------------------------------------------------------

    def _request(
        self, method: str, path: str, *, json_body: Any = None, params: dict[str, str] | None = None
    ) -> Any:
        what = f"resource API {method} {path}"

        def attempt() -> requests.Response:
            token = self._current_token()
            response = self._send(method, path, json_body, params, token)
            if response.status_code == 401:
                self._login(stale=token)
                response = self._send(method, path, json_body, params, self._token)
            if response.status_code >= 500:
                raise _ServerError(response.status_code)
            return response

        return _decode(self._with_retries(attempt, what), what)

    def _with_retries(self, attempt: Callable[[], requests.Response], what: str) -> requests.Response:
        try:
            return call_with_retries(
                attempt, policy=self._retry, retry_on=_is_transient, what=what, sleep=self._sleep
            )
        except _ServerError as exc:
            raise UpstreamError(
                f"{what} failed at {self._origin}: HTTP {exc.status} after {self._retry.attempts} attempts"
            ) from None
        except _TRANSIENT as exc:
            raise UpstreamError(
                f"{what} failed: {self._origin} unreachable after {self._retry.attempts} attempts "
                f"({type(exc).__name__})"
            ) from None

    def _send(
        self, method: str, path: str, json_body: Any, params: dict[str, str] | None, token: str | None
    ) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return self._session.request(
            method, self._base_url + path, json=json_body, params=params, headers=headers,
            timeout=self._timeout,
        )

    def _current_token(self) -> str | None:
        if self._token is None:
            self._login(stale=None)
        return self._token

    def _login(self, *, stale: str | None) -> None:
        """Log in unless another thread already replaced the ``stale`` token meanwhile."""
        with self._token_lock:
            if self._token is not None and self._token != stale:
                return
            body = {"email": self.email, "password": self._password.get_secret_value()}
            response = self._send("POST", "/login", body, None, None)
            if response.status_code >= 500:
                raise _ServerError(response.status_code)
            if response.status_code == 401:
                raise AuthenticationError(
                    f"resource API at {self._origin} rejected the credentials of {self.email}"
                )
            data = _decode(response, "resource API POST /login")
            self._token = _parse(TokenResponse, data, "POST /login").access_token
            log.debug("logged in to the resource API at %s as %s", self._origin, self.email)


def _decode(response: requests.Response, what: str) -> Any:
    """The JSON of a 2xx answer, else the error it stands for, with the server's (safe) message."""
    if 200 <= response.status_code < 300:
        try:
            return response.json()
        except ValueError:
            raise UpstreamError(f"{what} returned a body that is not JSON") from None
    _raise_for(response, what)


def _raise_for(response: requests.Response, what: str) -> NoReturn:
    try:
        message = str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        message = f"HTTP {response.status_code}"
    # A client error is the caller's to see as such; anything else is the upstream failing.
    status = response.status_code
    error_class = ERRORS_BY_STATUS.get(status, UpstreamError) if 400 <= status < 500 else UpstreamError
    raise error_class(f"{what}: {message}")


def _validated(model: type[BaseModel], values: dict[str, Any]) -> Any:
    """``values`` checked against the request schema, as a JSON-ready dict; bad input never leaves."""
    try:
        return model.model_validate(values).model_dump(mode="json")
    except ValidationError as exc:
        first = exc.errors()[0]
        location = ".".join(str(part) for part in first["loc"]) or model.__name__
        raise ValidationFailedError(f"{location}: {first['msg']}") from None


def _parse(model: type[_T], data: Any, what: str) -> _T:
    try:
        return model.model_validate(data)
    except ValidationError:
        raise UpstreamError(f"resource API {what} returned an unexpected body") from None


def _segment(value: str) -> str:
    return quote(value, safe="")
