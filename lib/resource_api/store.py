"""The resource database: users, resources (small part, manifest, DEK sealed at rest), the fetch
log and the CDN config, through SQLAlchemy (SQLite by default, PostgreSQL for a cluster).

The store never sees a plaintext DEK or CDN secret: the service seals them under the master key
first. Rows never leave this module; callers get frozen records (no lazy loads from a closed
session). Tables carry a ``resource_api_`` prefix so they can share a database with the accounts
store without clashing.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    func,
    select,
    text,
)
from sqlalchemy.exc import IntegrityError as SqlIntegrityError
from sqlalchemy.orm import Mapped, mapped_column, sessionmaker

from lib.clock import utc_now
from lib.db import UtcBase, create_database_engine, database_errors, redact_url
from lib.errors import ValidationFailedError
from lib.sealed.wire import FetchKind, ResourceManifest, Role, UploadStatus

log = logging.getLogger(__name__)

# How the database is named in a 503 and a log line.
DATABASE = "resource"


class ResourceBase(UtcBase):
    __abstract__ = True
    metadata = MetaData()


class ResourceUserRow(ResourceBase):
    __tablename__ = "resource_api_users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    password_hash: Mapped[str] = mapped_column(String(256))
    role: Mapped[str] = mapped_column(String(16))
    # None: any node may fetch; a list: only these fingerprints.
    allowed_fingerprints: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utc_now)


class ResourceRow(ResourceBase):
    __tablename__ = "resource_api_resources"
    __table_args__ = (UniqueConstraint("folder", "name", name="uq_resource_api_folder_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    folder: Mapped[str] = mapped_column(String(128))
    name: Mapped[str] = mapped_column(String(128))
    model_id: Mapped[str] = mapped_column(String(64))
    manifest: Mapped[str] = mapped_column(Text)
    small_part: Mapped[bytes] = mapped_column(LargeBinary)
    dek_encrypted: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(default=utc_now)
    updated_at: Mapped[datetime] = mapped_column(default=utc_now)


class FetchRow(ResourceBase):
    __tablename__ = "resource_api_fetches"
    __table_args__ = (Index("ix_resource_api_fetches_resource", "folder", "name", "kind"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("resource_api_users.id"))
    fingerprint: Mapped[str] = mapped_column(String(64))
    folder: Mapped[str | None] = mapped_column(String(128), nullable=True)
    name: Mapped[str | None] = mapped_column(String(128), nullable=True)
    kind: Mapped[str] = mapped_column(String(8))
    created_at: Mapped[datetime] = mapped_column(default=utc_now)


class CdnConfigRow(ResourceBase):
    __tablename__ = "resource_api_cdn_config"

    # One row, id 1: there is one CDN per resource API.
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    config_encrypted: Mapped[bytes] = mapped_column(LargeBinary)
    updated_at: Mapped[datetime] = mapped_column(default=utc_now)


@dataclass(frozen=True)
class UserRecord:
    id: int
    email: str
    role: Role
    allowed_fingerprints: tuple[str, ...] | None
    created_at: datetime
    password_hash: str = field(repr=False)


@dataclass(frozen=True)
class ResourceRecord:
    folder: str
    name: str
    model_id: str
    manifest: ResourceManifest
    created_at: datetime
    updated_at: datetime
    small_part: bytes = field(repr=False)
    dek_encrypted: bytes = field(repr=False)


@dataclass(frozen=True)
class NewResource:
    """What an upload writes; the DEK is already sealed under the master key."""

    folder: str
    name: str
    model_id: str
    manifest: ResourceManifest
    small_part: bytes = field(repr=False)
    dek_encrypted: bytes = field(repr=False)


class ResourceStore:
    """The resource API's tables in the database at ``url``; created on first start."""

    def __init__(self, url: str, *, clock: Callable[[], datetime] = utc_now) -> None:
        self._engine = create_database_engine(url)
        self._sessions = sessionmaker(self._engine, expire_on_commit=False)
        self._clock = clock
        with database_errors(DATABASE, "create the schema"):
            ResourceBase.metadata.create_all(self._engine)
        log.info("resource store ready at %s", redact_url(url))

    def close(self) -> None:
        self._engine.dispose()

    # For the tables of other modules of this package (lib/resource_api/nodes.py).
    @property
    def engine(self) -> Any:
        return self._engine

    @property
    def sessions(self) -> sessionmaker[Any]:
        return self._sessions

    def now(self) -> datetime:
        return self._clock()

    def ping(self) -> None:
        with database_errors(DATABASE, "check the database"), self._engine.connect() as connection:
            connection.execute(text("SELECT 1"))

    # -- users -----------------------------------------------------------------------------------

    def create_user(
        self, *, email: str, password_hash: str, role: Role, allowed_fingerprints: Sequence[str] | None
    ) -> UserRecord:
        row = ResourceUserRow(
            email=email,
            password_hash=password_hash,
            role=role,
            allowed_fingerprints=list(allowed_fingerprints) if allowed_fingerprints else None,
            created_at=self._clock(),
        )
        try:
            with database_errors(DATABASE, "create a user"), self._sessions.begin() as session:
                session.add(row)
        except SqlIntegrityError:
            raise ValidationFailedError("a user with this email already exists") from None
        return _user_record(row)

    def user_by_email(self, email: str) -> UserRecord | None:
        with database_errors(DATABASE, "look up a user"), self._sessions() as session:
            row = session.scalar(select(ResourceUserRow).where(ResourceUserRow.email == email))
            return _user_record(row) if row else None

    def user_by_id(self, user_id: int) -> UserRecord | None:
        with database_errors(DATABASE, "look up a user"), self._sessions() as session:
            row = session.get(ResourceUserRow, user_id)
            return _user_record(row) if row else None

    def list_users(self) -> list[UserRecord]:
        with database_errors(DATABASE, "list users"), self._sessions() as session:
            rows = session.scalars(select(ResourceUserRow).order_by(ResourceUserRow.email))
            return [_user_record(row) for row in rows]

    # -- resources -------------------------------------------------------------------------------

    def put_resource(
        self, new: NewResource, *, is_unchanged: Callable[[ResourceRecord], bool]
    ) -> UploadStatus:
        """Insert or replace (folder, name) in one transaction; ``is_unchanged`` may veto the write."""
        try:
            return self._put_resource(new, is_unchanged)
        except SqlIntegrityError:
            # Two publishers inserted the same (folder, name) at once: the loser replaces.
            return self._put_resource(new, is_unchanged)

    def _put_resource(
        self, new: NewResource, is_unchanged: Callable[[ResourceRecord], bool]
    ) -> UploadStatus:
        now = self._clock()
        manifest_json = _manifest_json(new.manifest)
        with database_errors(DATABASE, "store a resource"), self._sessions.begin() as session:
            row = session.scalar(
                select(ResourceRow)
                .where(ResourceRow.folder == new.folder, ResourceRow.name == new.name)
                .with_for_update()
            )
            if row is None:
                session.add(
                    ResourceRow(
                        folder=new.folder, name=new.name, model_id=new.model_id, manifest=manifest_json,
                        small_part=new.small_part, dek_encrypted=new.dek_encrypted,
                        created_at=now, updated_at=now,
                    )
                )
                return "created"
            if is_unchanged(_resource_record(row)):
                return "unchanged"
            row.model_id = new.model_id
            row.manifest = manifest_json
            row.small_part = new.small_part
            row.dek_encrypted = new.dek_encrypted
            row.updated_at = now
            return "replaced"

    def resource(self, folder: str, name: str) -> ResourceRecord | None:
        with database_errors(DATABASE, "read a resource"), self._sessions() as session:
            row = session.scalar(
                select(ResourceRow).where(ResourceRow.folder == folder, ResourceRow.name == name)
            )
            return _resource_record(row) if row else None

    def list_manifests(self, folder: str) -> list[ResourceManifest]:
        # Only the manifest column: listing must not load small parts or sealed keys.
        with database_errors(DATABASE, "list resources"), self._sessions() as session:
            manifests = session.scalars(
                select(ResourceRow.manifest).where(ResourceRow.folder == folder).order_by(ResourceRow.name)
            )
            return [ResourceManifest.model_validate_json(manifest) for manifest in manifests]

    # -- fetch log -------------------------------------------------------------------------------

    def log_fetch(
        self, *, user_id: int, fingerprint: str, kind: FetchKind, folder: str | None = None,
        name: str | None = None,
    ) -> None:
        with database_errors(DATABASE, "log a fetch"), self._sessions.begin() as session:
            session.add(
                FetchRow(
                    user_id=user_id, fingerprint=fingerprint, folder=folder, name=name, kind=kind,
                    created_at=self._clock(),
                )
            )

    def count_fetches(
        self,
        *,
        folder: str | None = None,
        name: str | None = None,
        kind: FetchKind | None = None,
        fingerprint: str | None = None,
    ) -> int:
        query = select(func.count()).select_from(FetchRow)
        if folder is not None:
            query = query.where(FetchRow.folder == folder)
        if name is not None:
            query = query.where(FetchRow.name == name)
        if kind is not None:
            query = query.where(FetchRow.kind == kind)
        if fingerprint is not None:
            query = query.where(FetchRow.fingerprint == fingerprint)
        with database_errors(DATABASE, "count fetches"), self._sessions() as session:
            return int(session.scalar(query) or 0)

    # -- CDN config ------------------------------------------------------------------------------

    def set_cdn_config(self, config_encrypted: bytes) -> None:
        with database_errors(DATABASE, "store the CDN config"), self._sessions.begin() as session:
            session.merge(CdnConfigRow(id=1, config_encrypted=config_encrypted, updated_at=self._clock()))

    def cdn_config(self) -> bytes | None:
        with database_errors(DATABASE, "read the CDN config"), self._sessions() as session:
            row = session.get(CdnConfigRow, 1)
            return row.config_encrypted if row else None


def _user_record(row: ResourceUserRow) -> UserRecord:
    fingerprints = row.allowed_fingerprints
    return UserRecord(
        id=row.id,
        email=row.email,
        # Anything but an exact "publisher" gets the lesser role.
        role="publisher" if row.role == "publisher" else "reader",
        allowed_fingerprints=tuple(fingerprints) if fingerprints else None,
        created_at=row.created_at,
        password_hash=row.password_hash,
    )


def _resource_record(row: ResourceRow) -> ResourceRecord:
    return ResourceRecord(
        folder=row.folder,
        name=row.name,
        model_id=row.model_id,
        manifest=ResourceManifest.model_validate_json(row.manifest),
        created_at=row.created_at,
        updated_at=row.updated_at,
        small_part=row.small_part,
        dek_encrypted=row.dek_encrypted,
    )


def _manifest_json(manifest: ResourceManifest) -> str:
    # Sorted keys: the stored text of a manifest does not depend on the order a publisher sent.
    return json.dumps(manifest.model_dump(mode="json"), sort_keys=True)
