"""The job queue: kinds (inference, training, evaluation, batch), priorities, cancel, progress and
logs of the jobs table (moorage.jobs).

Rows written before this revision are inference jobs of priority 0 with nothing to cancel; the
``cancelled`` status is a new value of the existing ``status`` column. A job's log lines live in
``job_logs``, numbered from 1 per job (``seq``), and go with their job.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("kind", sa.String(32), nullable=False, server_default="inference"))
        batch.add_column(sa.Column("priority", sa.Integer, nullable=False, server_default="0"))
        batch.add_column(sa.Column("progress", sa.JSON, nullable=True))
        batch.add_column(sa.Column("cancel_requested", sa.Boolean, nullable=False, server_default=sa.false()))
    # what a worker asks for: the unfinished jobs of its kinds, highest priority first, then oldest
    op.create_index("ix_jobs_queue", "jobs", ["kind", "status", "priority", "created_at"])
    op.create_table(
        "job_logs",
        sa.Column("job_id", sa.String(64), sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("seq", sa.Integer, primary_key=True),
        sa.Column("at", TS, nullable=False),
        sa.Column("line", sa.Text, nullable=False),
    )


def downgrade() -> None:
    jobs = sa.table("jobs", sa.column("status", sa.String), sa.column("error", sa.JSON))
    cancelled = {"code": "job_cancelled", "message": "the job was cancelled"}
    op.execute(jobs.update().where(jobs.c.status == "cancelled").values(status="failed", error=cancelled))
    op.drop_table("job_logs")
    op.drop_index("ix_jobs_queue", "jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("cancel_requested")
        batch.drop_column("progress")
        batch.drop_column("priority")
        batch.drop_column("kind")
