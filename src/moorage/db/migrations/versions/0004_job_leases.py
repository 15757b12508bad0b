"""Job leases: the runner holding a job and until when, and how many callback deliveries were made.

A runner that dies stops renewing its leases; once they expire another runner reclaims the jobs (see
`moorage.jobs.store`). Rows written before this revision carry no lease, so the upgrade marks what a
dead server may have left behind as expired at once: running jobs (they go back to the queue) and
finished jobs with a callback URL but no recorded callback outcome (their callback is delivered,
perhaps a second time: receivers deduplicate by the ``Idempotency-Key`` header, the job id).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("runner_id", sa.String(64), nullable=True))
        batch.add_column(sa.Column("lease_expires_at", TS, nullable=True))
        batch.add_column(sa.Column("callback_attempts", sa.Integer, nullable=False, server_default="0"))
    op.create_index("ix_jobs_lease_expires_at", "jobs", ["lease_expires_at"])
    jobs = sa.table(
        "jobs",
        sa.column("status", sa.String),
        sa.column("callback_url", sa.String),
        sa.column("callback_status", sa.String),
        sa.column("lease_expires_at", TS),
    )
    now = datetime.now(UTC)
    op.execute(jobs.update().where(jobs.c.status == "running").values(lease_expires_at=now))
    undelivered = (
        jobs.c.status.in_(("succeeded", "failed")),
        jobs.c.callback_url.is_not(None),
        jobs.c.callback_status.is_(None),
    )
    op.execute(jobs.update().where(*undelivered).values(callback_status="pending", lease_expires_at=now))


def downgrade() -> None:
    op.drop_index("ix_jobs_lease_expires_at", "jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("callback_attempts")
        batch.drop_column("lease_expires_at")
        batch.drop_column("runner_id")
