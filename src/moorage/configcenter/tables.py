"""Config center tables in the catalog database (migration 0007): releases, drafts, instance reports
and the one-row revision counter every change bumps."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from ..db import Base, utcnow


class ConfigRelease(Base):
    __tablename__ = "config_releases"

    number: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    scope: Mapped[str] = mapped_column(String(100), index=True)
    values: Mapped[dict] = mapped_column(JSON)
    comment: Mapped[str] = mapped_column(Text, default="")
    author: Mapped[str] = mapped_column(String(160))
    created_at: Mapped[str] = mapped_column(String(40))  # ISO 8601 UTC, as the release shows it
    state: Mapped[str] = mapped_column(String(20))
    approved_by: Mapped[str | None] = mapped_column(String(160), nullable=True)
    rolled_back_to: Mapped[int | None] = mapped_column(Integer, nullable=True)
    gray: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    checksum: Mapped[str] = mapped_column(String(64))
    promoted_to: Mapped[int | None] = mapped_column(Integer, nullable=True)


class ConfigDraft(Base):
    __tablename__ = "config_drafts"

    scope: Mapped[str] = mapped_column(String(100), primary_key=True)
    values: Mapped[dict] = mapped_column(JSON)
    updated_by: Mapped[str] = mapped_column(String(160))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class ConfigReport(Base):
    """The last word of one instance: the revision it applied or rejected, and when it last reported."""

    __tablename__ = "config_reports"

    instance_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    group: Mapped[str] = mapped_column(String(200))
    labels: Mapped[dict] = mapped_column(JSON)
    revision: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text, default="")
    at: Mapped[datetime] = mapped_column(default=utcnow)


class ConfigRevision(Base):
    """One row (id 1): the config center's revision; writers lock it, so numbers and revisions never race."""

    __tablename__ = "config_revision"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    revision: Mapped[int] = mapped_column(Integer)
