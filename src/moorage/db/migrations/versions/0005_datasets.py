"""Datasets: registered, versioned, content-hashed datasets, their splits and which model versions
used them (moorage.training.datasets).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "datasets",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("created_by", sa.String(128), nullable=False),
    )
    op.create_table(
        "dataset_versions",
        sa.Column("dataset_name", sa.String(64), primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("label_map", sa.JSON, nullable=False),
        sa.Column("split", sa.JSON, nullable=False),
        sa.Column("splits", sa.JSON, nullable=False),
        sa.Column("stats", sa.JSON, nullable=False),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("path", sa.String(256), nullable=False),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("created_by", sa.String(128), nullable=False),
        sa.ForeignKeyConstraint(["dataset_name"], ["datasets.name"], ondelete="CASCADE"),
    )
    op.create_index("ix_dataset_versions_digest", "dataset_versions", ["digest"])
    op.create_table(
        "dataset_uses",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("dataset_name", sa.String(64), nullable=False),
        sa.Column("dataset_version", sa.Integer, nullable=False),
        sa.Column("model_name", sa.String(64), nullable=False),
        sa.Column("model_version", sa.Integer, nullable=False),
        sa.Column("role", sa.String(32), nullable=False),
        sa.Column("at", TS, nullable=False),
        sa.ForeignKeyConstraint(
            ["dataset_name", "dataset_version"],
            ["dataset_versions.dataset_name", "dataset_versions.version"],
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["model_name", "model_version"],
            ["model_versions.model_name", "model_versions.version"],
            ondelete="CASCADE",
        ),
        sa.UniqueConstraint("dataset_name", "dataset_version", "model_name", "model_version", "role"),
    )
    op.create_index("ix_dataset_uses_model", "dataset_uses", ["model_name", "model_version"])


def downgrade() -> None:
    op.drop_index("ix_dataset_uses_model", "dataset_uses")
    op.drop_table("dataset_uses")
    op.drop_index("ix_dataset_versions_digest", "dataset_versions")
    op.drop_table("dataset_versions")
    op.drop_table("datasets")
