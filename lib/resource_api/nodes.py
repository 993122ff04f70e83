"""Enrolled nodes and key-release nonces (docs/security-sealed.md, "Node enrollment").

A node enrolls its Ed25519 public key (``POST /nodes/enroll``, reader account): it is *pending*
until an operator approves it (``sealserve resource-api nodes approve ID``), and *revoked* for
good after ``revoke``. Every release (``POST /resources/get/{folder}``, ``POST /cdn``) carries a
single-use nonce the API handed out moments before (``POST /nodes/nonce``) and the node key's
signature over the request and that nonce; :meth:`NodeRegistry.check_release` accepts it only from
an approved node, for the fingerprint it enrolled with. Nonces live in the database, so every
replica of the API sees a nonce consumed by any other.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Integer, String, delete, select
from sqlalchemy.exc import IntegrityError as SqlIntegrityError
from sqlalchemy.orm import Mapped, mapped_column

from lib.db import database_errors
from lib.errors import NotFoundError, PermissionDeniedError, ValidationFailedError
from lib.resource_api.store import DATABASE, ResourceBase, ResourceStore
from lib.sealed.keywrap import b64decode, b64encode
from lib.sealed.signing import key_id, node_request_message, verify
from lib.sealed.wire import NodeInfo, NodeKeyRequest, NodeStatusName

log = logging.getLogger(__name__)

NONCE_TTL_SECONDS = 60
_DENIED = "this node may not receive keys (not enrolled, not approved, or a bad signature)"


class NodeRow(ResourceBase):
    __tablename__ = "resource_api_nodes"

    node_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    public_key: Mapped[str] = mapped_column(String(64))
    fingerprint: Mapped[str] = mapped_column(String(64))
    hostname: Mapped[str] = mapped_column(String(253), default="")
    status: Mapped[str] = mapped_column(String(16))
    enrolled_by: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column()
    updated_at: Mapped[datetime] = mapped_column()


class NonceRow(ResourceBase):
    __tablename__ = "resource_api_nonces"

    nonce: Mapped[str] = mapped_column(String(64), primary_key=True)
    expires_at: Mapped[datetime] = mapped_column()


@dataclass(frozen=True)
class NodeRecord:
    node_id: str
    public_key: bytes
    fingerprint: str
    hostname: str
    status: NodeStatusName
    created_at: datetime
    updated_at: datetime

    def info(self) -> NodeInfo:
        return NodeInfo(node_id=self.node_id, fingerprint=self.fingerprint, hostname=self.hostname,
                        status=self.status)


def _record(row: NodeRow) -> NodeRecord:
    status: NodeStatusName = row.status if row.status in ("approved", "revoked") else "pending"  # type: ignore[assignment]
    return NodeRecord(row.node_id, b64decode(row.public_key), row.fingerprint, row.hostname, status,
                      row.created_at, row.updated_at)


class NodeRegistry:
    """The nodes and nonces tables of a :class:`ResourceStore`'s database."""

    def __init__(self, store: ResourceStore) -> None:
        self._store = store
        with database_errors(DATABASE, "create the node tables"):
            ResourceBase.metadata.create_all(
                store.engine, tables=[NodeRow.__table__, NonceRow.__table__]  # type: ignore[list-item]
            )

    # -- enrollment ------------------------------------------------------------------------------

    def enroll(self, *, public_key: bytes, fingerprint: str, hostname: str, user_id: int) -> NodeRecord:
        """Record a node key as pending; an existing node keeps its status (re-enrolling is a no-op)."""
        node_id = key_id(public_key)
        now = self._store.now()
        try:
            with database_errors(DATABASE, "enroll a node"), self._store.sessions.begin() as session:
                row = session.get(NodeRow, node_id)
                if row is None:
                    row = NodeRow(node_id=node_id, public_key=b64encode(public_key), fingerprint=fingerprint,
                                  hostname=hostname, status="pending", enrolled_by=user_id,
                                  created_at=now, updated_at=now)
                    session.add(row)
                    log.info("node %s enrolled by user id %d (pending approval)", node_id[:16], user_id)
                elif row.fingerprint != fingerprint:
                    raise ValidationFailedError("this node key is enrolled with another fingerprint")
                record = _record(row)
        except SqlIntegrityError:  # enrolled twice at once: the first one stands
            found = self.node(node_id)
            assert found is not None
            return found
        return record

    def node(self, node_id: str) -> NodeRecord | None:
        with database_errors(DATABASE, "read a node"), self._store.sessions() as session:
            row = session.get(NodeRow, node_id)
            return _record(row) if row else None

    def list(self) -> list[NodeRecord]:
        with database_errors(DATABASE, "list nodes"), self._store.sessions() as session:
            return [_record(row) for row in session.scalars(select(NodeRow).order_by(NodeRow.created_at))]

    def set_status(self, node_id_or_prefix: str, status: NodeStatusName) -> NodeRecord:
        """Approve or revoke a node named by its id or a unique prefix (at least 8 characters)."""
        prefix = node_id_or_prefix.strip().lower()
        if len(prefix) < 8:
            raise ValidationFailedError("name a node by its id or at least its first 8 characters")
        with database_errors(DATABASE, "update a node"), self._store.sessions.begin() as session:
            rows = list(session.scalars(select(NodeRow).where(NodeRow.node_id.startswith(prefix))))
            if not rows:
                raise NotFoundError(f"no node {prefix!r}")
            if len(rows) > 1:
                raise ValidationFailedError(f"{prefix!r} names {len(rows)} nodes: give more of the id")
            row = rows[0]
            if row.status == "revoked" and status != "revoked":
                raise ValidationFailedError("a revoked node stays revoked: enroll a new node key")
            row.status = status
            row.updated_at = self._store.now()
            log.info("node %s %s", row.node_id[:16], status)
            return _record(row)

    # -- nonces and releases ---------------------------------------------------------------------

    def issue_nonce(self) -> str:
        nonce = secrets.token_urlsafe(32)
        now = self._store.now()
        with database_errors(DATABASE, "issue a nonce"), self._store.sessions.begin() as session:
            session.execute(delete(NonceRow).where(NonceRow.expires_at < now))
            session.add(NonceRow(nonce=nonce, expires_at=now + timedelta(seconds=NONCE_TTL_SECONDS)))
        return nonce

    def _consume(self, nonce: str) -> bool:
        """True once per issued, unexpired nonce (the delete is the single use)."""
        now = self._store.now()
        with database_errors(DATABASE, "use a nonce"), self._store.sessions.begin() as session:
            result = session.execute(
                delete(NonceRow).where(NonceRow.nonce == nonce, NonceRow.expires_at >= now)
            )
            return bool(getattr(result, "rowcount", 0) == 1)

    def check_release(
        self, request: NodeKeyRequest, *, kind: str, folder: str | None, name: str | None
    ) -> None:
        """:class:`PermissionDeniedError` unless an approved node signed this very request with a
        nonce that is fresh and used now for the first time."""
        node = self.node(request.node_id)
        message = node_request_message(
            kind=kind, folder=folder, name=name, public_key=request.public_key,
            fingerprint=request.fingerprint, nonce=request.nonce, node_id=request.node_id,
        )
        reason = None
        if node is None:
            reason = "unknown node"
        elif node.status != "approved":
            reason = f"node {node.status}"
        elif node.fingerprint != request.fingerprint:
            reason = "fingerprint differs from the enrolled one"
        elif not verify(node.public_key, request.signature, message):
            reason = "bad signature"
        # The nonce is spent whatever the outcome: a refused request cannot be tried again.
        if not self._consume(request.nonce) and reason is None:
            reason = "nonce unknown, expired or already used"
        if reason is not None:
            log.warning("release refused to node %s: %s", request.node_id[:16], reason)
            raise PermissionDeniedError(_DENIED)
