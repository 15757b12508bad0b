"""The config center: drafts, numbered releases, approvals, gray targets and instance reports
(moorage.configcenter).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "config_releases",
        sa.Column("number", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("scope", sa.String(100), nullable=False, index=True),
        sa.Column("values", sa.JSON, nullable=False),
        sa.Column("comment", sa.Text, nullable=False),
        sa.Column("author", sa.String(160), nullable=False),
        sa.Column("created_at", sa.String(40), nullable=False),
        sa.Column("state", sa.String(20), nullable=False),
        sa.Column("approved_by", sa.String(160), nullable=True),
        sa.Column("rolled_back_to", sa.Integer, nullable=True),
        sa.Column("gray", sa.JSON, nullable=True),
        sa.Column("checksum", sa.String(64), nullable=False),
        sa.Column("promoted_to", sa.Integer, nullable=True),
    )
    op.create_table(
        "config_drafts",
        sa.Column("scope", sa.String(100), primary_key=True),
        sa.Column("values", sa.JSON, nullable=False),
        sa.Column("updated_by", sa.String(160), nullable=False),
        sa.Column("updated_at", TS, nullable=False),
    )
    op.create_table(
        "config_reports",
        sa.Column("instance_id", sa.String(200), primary_key=True),
        sa.Column("group", sa.String(200), nullable=False),
        sa.Column("labels", sa.JSON, nullable=False),
        sa.Column("revision", sa.Integer, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("at", TS, nullable=False),
    )
    revision_table = op.create_table(
        "config_revision",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("revision", sa.Integer, nullable=False),
    )
    op.bulk_insert(revision_table, [{"id": 1, "revision": 0}])


def downgrade() -> None:
    op.drop_table("config_revision")
    op.drop_table("config_reports")
    op.drop_table("config_drafts")
    op.drop_table("config_releases")
