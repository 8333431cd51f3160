"""The native job API: endpoints, jobs, their batches, per-job worker states and logs;
deployments learn their endpoint, worker pool and source.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deployments") as batch:
        batch.add_column(sa.Column("endpoint", sa.String(64), nullable=True))
        batch.add_column(sa.Column("workers", sa.JSON(none_as_null=True), nullable=True))
        batch.add_column(sa.Column("source", sa.String(16), nullable=False,
                                   server_default="config"))
    op.create_table(
        "endpoints",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("default_deployment", sa.String(64), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_table(
        "jobs",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(64), nullable=False, unique=True),
        sa.Column("project", sa.String(128), nullable=False),
        sa.Column("endpoint", sa.String(64), nullable=False),
        sa.Column("deployment", sa.String(64), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("stage", sa.String(16), nullable=False),
        sa.Column("input", sa.JSON, nullable=False),
        sa.Column("options", sa.JSON, nullable=False),
        sa.Column("output_path", sa.String(1024), nullable=False),
        sa.Column("total_batch_count", sa.Integer, nullable=False, server_default="0"),
        sa.Column("total_items", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("items_succeeded", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("items_failed", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("batches_succeeded", sa.Integer, nullable=False, server_default="0"),
        sa.Column("failed_attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("dead_letters", sa.Integer, nullable=False, server_default="0"),
        sa.Column("batch_time_s", sa.Float, nullable=False, server_default="0"),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("enqueue_attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("started_at", sa.Float, nullable=True),
        sa.Column("ended_at", sa.Float, nullable=True),
        sa.Column("deadline", sa.Float, nullable=True),
        sa.Column("results_url", sa.String(1024), nullable=True),
        sa.Column("lease_owner", sa.String(128), nullable=True),
        sa.Column("lease_token", sa.String(64), nullable=True),
        sa.Column("lease_expires_at", sa.Float, nullable=True),
    )
    op.create_index("ix_jobs_project_seq", "jobs", ["project", "seq"])
    op.create_index("ix_jobs_stage", "jobs", ["stage"])
    op.create_table(
        "job_batches",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.String(64), nullable=False),
        sa.Column("idx", sa.Integer, nullable=False),
        sa.Column("segment_key", sa.String(512), nullable=False),
        sa.Column("start_offset", sa.BigInteger, nullable=False),
        sa.Column("end_offset", sa.BigInteger, nullable=False),
        sa.Column("first_item", sa.BigInteger, nullable=False),
        sa.Column("n_items", sa.Integer, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("not_before", sa.Float, nullable=True),
        sa.Column("lease_owner", sa.String(128), nullable=True),
        sa.Column("lease_token", sa.String(64), nullable=True),
        sa.Column("lease_expires_at", sa.Float, nullable=True),
        sa.Column("duration_s", sa.Float, nullable=True),
        sa.Column("out_key", sa.String(512), nullable=True),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.UniqueConstraint("job_id", "idx", name="uq_job_batches_job_idx"),
    )
    op.create_index("ix_job_batches_state_id", "job_batches", ["state", "id"])
    op.create_table(
        "job_workers",
        sa.Column("job_id", sa.String(64), primary_key=True),
        sa.Column("worker_id", sa.String(128), primary_key=True),
        sa.Column("host", sa.String(256), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("current_batch", sa.Integer, nullable=True),
        sa.Column("batches_done", sa.Integer, nullable=False, server_default="0"),
        sa.Column("started_at", sa.Float, nullable=False),
        sa.Column("last_heartbeat", sa.Float, nullable=False),
    )
    op.create_table(
        "job_logs",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.String(64), nullable=False),
        sa.Column("ts", sa.Float, nullable=False),
        sa.Column("level", sa.String(8), nullable=False),
        sa.Column("source", sa.String(128), nullable=False),
        sa.Column("message", sa.Text, nullable=False),
    )
    op.create_index("ix_job_logs_job_id", "job_logs", ["job_id", "id"])


def downgrade() -> None:
    for table in ("job_logs", "job_workers", "job_batches", "jobs", "endpoints"):
        op.drop_table(table)
    with op.batch_alter_table("deployments") as batch:
        batch.drop_column("source")
        batch.drop_column("workers")
        batch.drop_column("endpoint")
