"""The registry's tables in the catalog (SQLAlchemy 2). The schema is created and upgraded by Alembic
migrations; `Base` and the time helpers come from `moorage.db`."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, ForeignKeyConstraint, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from ..db import Base, utcnow


class Model(Base):
    __tablename__ = "models"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    task: Mapped[str] = mapped_column(String(32))
    description: Mapped[str] = mapped_column(Text, default="")
    tags: Mapped[dict] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str] = mapped_column(String(128), default="")


class ModelVersion(Base):
    __tablename__ = "model_versions"
    __table_args__ = (ForeignKeyConstraint(["model_name"], ["models.name"], ondelete="CASCADE"),)

    model_name: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    # 'pending' while its files are being written, 'ready' once the manifest is stored.
    status: Mapped[str] = mapped_column(String(16), default="pending")
    task: Mapped[str] = mapped_column(String(32))
    framework: Mapped[str] = mapped_column(String(32), default="")
    path: Mapped[str] = mapped_column(String(256))
    manifest: Mapped[dict] = mapped_column(default=dict)
    manifest_sha256: Mapped[str] = mapped_column(String(64), default="")
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    description: Mapped[str] = mapped_column(Text, default="")
    tags: Mapped[dict] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str] = mapped_column(String(128), default="")


class Alias(Base):
    __tablename__ = "aliases"
    __table_args__ = (
        ForeignKeyConstraint(
            ["model_name", "version"],
            ["model_versions.model_name", "model_versions.version"],
        ),
    )

    model_name: Mapped[str] = mapped_column(String(64), primary_key=True)
    alias: Mapped[str] = mapped_column(String(32), primary_key=True)
    version: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_by: Mapped[str] = mapped_column(String(128), default="")


class AliasEvent(Base):
    """One alias move. Rows are only ever appended."""

    __tablename__ = "alias_history"
    __table_args__ = (ForeignKeyConstraint(["model_name"], ["models.name"], ondelete="CASCADE"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_name: Mapped[str] = mapped_column(String(64), index=True)
    alias: Mapped[str] = mapped_column(String(32))
    action: Mapped[str] = mapped_column(String(16))  # set | rollback | remove
    from_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    to_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    actor: Mapped[str] = mapped_column(String(128), default="")
    reason: Mapped[str] = mapped_column(Text, default="")
    at: Mapped[datetime] = mapped_column(default=utcnow)


class ArtifactKey(Base):
    """The data key of an encrypted version, wrapped (encrypted) by a master key. `rekey` rewrites
    this row only: the artifact's ciphertext never changes."""

    __tablename__ = "artifact_keys"
    __table_args__ = (
        ForeignKeyConstraint(
            ["model_name", "version"], ["model_versions.model_name", "model_versions.version"], ondelete="CASCADE"
        ),
    )

    model_name: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    master_key_id: Mapped[str] = mapped_column(String(32))
    wrapped_key: Mapped[str] = mapped_column(Text)  # base64(nonce | AES-GCM(master, data key))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
