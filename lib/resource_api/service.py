"""What the resource API does, as plain Python: the routes in :mod:`lib.resource_api.app` parse HTTP
and call one method here.

Authorization: any user may log in, list, enroll a node and ask for a nonce; a release (a DEK,
the CDN config) also needs the signature of an approved node key over the request and a fresh
nonce (:mod:`lib.resource_api.nodes`); uploads, ``PUT /cdn`` and fetch statistics need the
``publisher`` role. A user with a fingerprint allow-list gets nothing released to a node outside
it. The role is read from the database on every request, so a demotion takes effect before the
token expires. Logins are throttled per address and account (:mod:`lib.resource_api.throttle`).
"""

from __future__ import annotations

import hmac
import logging
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from lib.errors import (
    AuthenticationError,
    IntegrityError,
    NotFoundError,
    PermissionDeniedError,
    ValidationFailedError,
)
from lib.resource_api.master_key import CDN_AAD, MasterKeyCipher, dek_aad
from lib.resource_api.nodes import NONCE_TTL_SECONDS, NodeRegistry
from lib.resource_api.passwords import PasswordHasher, check_new_password
from lib.resource_api.settings import ResourceApiSettings
from lib.resource_api.store import NewResource, ResourceRecord, ResourceStore, UserRecord
from lib.resource_api.throttle import HashingSlots, LoginThrottle
from lib.schemas import TokenResponse
from lib.sealed.keywrap import wrap_for_node
from lib.sealed.wire import (
    EMAIL_PATTERN,
    FINGERPRINT_PATTERN,
    CdnConfig,
    CdnResponse,
    EnrollRequest,
    FetchCountResponse,
    FetchKind,
    GetRequest,
    GetResponse,
    ListResponse,
    LoginRequest,
    NodeInfo,
    NodeKeyRequest,
    NonceResponse,
    Role,
    UploadRequest,
    UploadResponse,
    plain_http_refusal,
)
from lib.tokens import TokenService

log = logging.getLogger(__name__)

_BAD_CREDENTIALS = "invalid email or password"
ROLES: tuple[Role, ...] = ("publisher", "reader")


@dataclass(frozen=True)
class ResourceCaller:
    """The authenticated caller of one request."""

    user_id: int
    email: str
    role: Role
    allowed_fingerprints: tuple[str, ...] | None


def normalize_email(email: str) -> str:
    return email.strip().lower()


def create_user(
    store: ResourceStore,
    *,
    email: str,
    password: str,
    role: Role,
    fingerprints: Sequence[str] = (),
    hasher: PasswordHasher | None = None,
) -> UserRecord:
    """Validate and add a user; the password is hashed here and never stored or logged."""
    email = normalize_email(email)
    if not re.fullmatch(EMAIL_PATTERN, email) or len(email) > 320:
        raise ValidationFailedError("the email address is not valid")
    if role not in ROLES:
        raise ValidationFailedError(f"role must be one of {', '.join(ROLES)}")
    if any(not re.fullmatch(FINGERPRINT_PATTERN, fp) for fp in fingerprints):
        raise ValidationFailedError("a fingerprint is 64 lowercase hex characters")
    try:
        check_new_password(password)
    except ValueError as exc:
        raise ValidationFailedError(str(exc)) from None
    password_hash = (hasher or PasswordHasher()).hash(password)
    user = store.create_user(
        email=email,
        password_hash=password_hash,
        role=role,
        allowed_fingerprints=sorted(set(fingerprints)) or None,
    )
    log.info("created %s user id %d", user.role, user.id)
    return user


class ResourceService:
    """Login, upload, key release and the CDN config, over a :class:`ResourceStore`."""

    def __init__(
        self,
        settings: ResourceApiSettings,
        *,
        store: ResourceStore | None = None,
        hasher: PasswordHasher | None = None,
        throttle: LoginThrottle | None = None,
    ) -> None:
        self.settings = settings
        self.store = store if store is not None else ResourceStore(settings.database_url)
        self.nodes = NodeRegistry(self.store)
        self._throttle = throttle or LoginThrottle()
        self._hashing = HashingSlots(settings.max_concurrent_logins)
        self._cipher = MasterKeyCipher(settings.master_key_bytes())
        # The project's one JWT implementation; the role travels as the single scope.
        self._tokens = TokenService(
            settings.jwt_secret.get_secret_value(),
            settings.jwt_issuer,
            settings.jwt_audience,
            settings.token_ttl_seconds,
            leeway_s=settings.token_leeway_seconds,
        )
        self._hasher = hasher or PasswordHasher()
        # Unknown users are checked against this, so they cost the same scrypt as a wrong password.
        self._dummy_hash = self._hasher.hash(secrets.token_urlsafe(24))

    # -- authentication --------------------------------------------------------------------------

    def login(self, request: LoginRequest, address: str = "-") -> TokenResponse:
        email = normalize_email(request.email)
        # A locked address or account is refused before any hashing: guessing costs us nothing.
        self._throttle.check(email, address)
        user = self.store.user_by_email(email)
        with self._hashing.slot():
            matches = self._hasher.verify(request.password, user.password_hash if user else self._dummy_hash)
        if user is None or not matches:
            self._throttle.failed(email, address)
            log.info("login failed (%s)", f"user id {user.id}" if user else "unknown account")
            raise AuthenticationError(_BAD_CREDENTIALS)
        self._throttle.succeeded(email, address)
        log.info("login ok: user id %d (%s)", user.id, user.role)
        issued = self._tokens.issue(str(user.id), [user.role])
        return TokenResponse(access_token=issued.token, expires_in=issued.expires_in, scope=user.role)

    def check_token(self, authorization: str | None) -> str:
        """The subject of a valid ``Authorization: Bearer <token>`` (signature and times only), else 401."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthenticationError("expected 'Authorization: Bearer <token>'")
        return self._tokens.verify(token.strip()).subject

    def authenticate(self, authorization: str | None) -> ResourceCaller:
        """The caller behind an ``Authorization: Bearer <token>`` header, else 401."""
        subject = self.check_token(authorization)
        user = self.store.user_by_id(int(subject)) if subject.isdigit() else None
        if user is None:
            raise AuthenticationError("invalid or expired token")
        return ResourceCaller(user.id, user.email, user.role, user.allowed_fingerprints)

    # -- resources -------------------------------------------------------------------------------

    def upload(self, principal: ResourceCaller, folder: str, request: UploadRequest) -> UploadResponse:
        """Store or replace (folder, name). Same id, small part, manifest and DEK: "unchanged".

        A re-upload with the same id but another sealing (new DEK, new small part) replaces the
        stored one: the big part on S3 was re-sealed with that DEK, so keeping the old key would
        strand it.
        """
        _require_publisher(principal)
        aad = dek_aad(folder, request.name)

        def is_unchanged(existing: ResourceRecord) -> bool:
            if existing.manifest != request.manifest or existing.small_part != request.small_part:
                return False
            try:
                stored_dek = self._cipher.decrypt(existing.dek_encrypted, aad=aad)
            except IntegrityError:
                return False
            return hmac.compare_digest(stored_dek, request.dek)

        status = self.store.put_resource(
            NewResource(
                folder=folder,
                name=request.name,
                model_id=request.manifest.id,
                manifest=request.manifest,
                small_part=request.small_part,
                dek_encrypted=self._cipher.encrypt(request.dek, aad=aad),
            ),
            is_unchanged=is_unchanged,
        )
        log.info("upload %s/%s by user id %d: %s", folder, request.name, principal.user_id, status)
        return UploadResponse(folder=folder, name=request.name, id=request.manifest.id, status=status)

    # -- nodes -----------------------------------------------------------------------------------

    def enroll(self, principal: ResourceCaller, request: EnrollRequest) -> NodeInfo:
        _check_node(principal, request.fingerprint)
        node = self.nodes.enroll(public_key=request.node_key, fingerprint=request.fingerprint,
                                 hostname=request.hostname, user_id=principal.user_id)
        return node.info()

    def nonce(self, principal: ResourceCaller) -> NonceResponse:
        return NonceResponse(nonce=self.nodes.issue_nonce(), expires_in=NONCE_TTL_SECONDS)

    def get(self, principal: ResourceCaller, folder: str, request: GetRequest) -> GetResponse:
        """The small part, manifest and DEK wrapped to the caller's key and node; logged."""
        _check_node(principal, request.fingerprint)
        self.nodes.check_release(request, kind="dek", folder=folder, name=request.name)
        record = self.store.resource(folder, request.name)
        if record is None:
            raise NotFoundError(f"no resource {request.name!r} in folder {folder!r}")
        dek = self._open(record.dek_encrypted, dek_aad(folder, request.name), f"{folder}/{request.name}")
        wrapped = wrap_for_node(dek, request.public_key, request.fingerprint, context="dek")
        # Logged before the response leaves: an unlogged release must not happen.
        self.store.log_fetch(
            user_id=principal.user_id, fingerprint=request.fingerprint, kind="dek",
            folder=folder, name=request.name,
        )
        log.info(
            "released DEK of %s/%s to user id %d, node %s",
            folder, request.name, principal.user_id, request.fingerprint[:16],
        )
        return GetResponse(manifest=record.manifest, small_part=record.small_part, wrapped_key=wrapped)

    def list(self, principal: ResourceCaller, folder: str) -> ListResponse:
        return ListResponse(folder=folder, resources=self.store.list_manifests(folder))

    # -- CDN config ------------------------------------------------------------------------------

    def set_cdn_config(self, principal: ResourceCaller, config: CdnConfig) -> None:
        _require_publisher(principal)
        self.check_cdn_endpoint(config)
        self.save_cdn_config(config)
        log.info("CDN config set by user id %d", principal.user_id)

    def save_cdn_config(self, config: CdnConfig) -> None:
        """Seal and store the CDN config; the operator's path (CLI), with no caller to check."""
        self.store.set_cdn_config(self._cipher.encrypt(config.plaintext_json(), aad=CDN_AAD))
        log.info("CDN config stored (bucket %s)", config.bucket)

    def check_cdn_endpoint(self, config: CdnConfig) -> None:
        """In production, a plain-HTTP storage endpoint other than loopback is refused."""
        if config.endpoint_url is None or self.settings.environment == "development":
            return
        refusal = plain_http_refusal(config.endpoint_url, "the storage endpoint")
        if refusal is not None:
            raise ValidationFailedError(refusal)

    def cdn_config(self, principal: ResourceCaller, request: NodeKeyRequest) -> CdnResponse:
        _check_node(principal, request.fingerprint)
        self.nodes.check_release(request, kind="cdn", folder=None, name=None)
        sealed = self.store.cdn_config()
        if sealed is None:
            raise NotFoundError("no CDN config has been set")
        plaintext = self._open(sealed, CDN_AAD, "the CDN config")
        wrapped = wrap_for_node(plaintext, request.public_key, request.fingerprint, context="cdn")
        self.store.log_fetch(user_id=principal.user_id, fingerprint=request.fingerprint, kind="cdn")
        log.info("released CDN config to user id %d, node %s", principal.user_id, request.fingerprint[:16])
        return CdnResponse(wrapped_config=wrapped)

    # -- statistics ------------------------------------------------------------------------------

    def fetch_count(
        self,
        principal: ResourceCaller,
        *,
        folder: str | None = None,
        name: str | None = None,
        kind: FetchKind | None = None,
        fingerprint: str | None = None,
    ) -> FetchCountResponse:
        _require_publisher(principal)
        count = self.store.count_fetches(folder=folder, name=name, kind=kind, fingerprint=fingerprint)
        return FetchCountResponse(count=count, folder=folder, name=name, kind=kind, fingerprint=fingerprint)

    def health(self) -> dict[str, str]:
        self.store.ping()
        return {"status": "ok"}

    def _open(self, sealed: bytes, aad: bytes, what: str) -> bytes:
        try:
            return self._cipher.decrypt(sealed, aad=aad)
        except IntegrityError:
            log.error("cannot decrypt %s: wrong RESOURCE_MASTER_KEY or a tampered row", what)
            raise


def _require_publisher(principal: ResourceCaller) -> None:
    if principal.role != "publisher":
        raise PermissionDeniedError("this action needs the publisher role")


def _check_node(principal: ResourceCaller, fingerprint: str) -> None:
    allowed = principal.allowed_fingerprints
    if allowed is not None and fingerprint not in allowed:
        log.warning(
            "user id %d denied for node %s (not in its allow-list)", principal.user_id, fingerprint[:16]
        )
        raise PermissionDeniedError("this account may not fetch keys for this node")
