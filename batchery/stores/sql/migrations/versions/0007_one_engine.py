"""One lease engine: expiries apart from attempts, bounded phases, and chunk progress
committed in parts while a chunk runs.

- `chunks.expiries`, `job_batches.expiries`: leases that ran out in a row without progress
  (a worker died); they cost no attempt, and decide when work is split or isolated.
- `batches.phase_attempts` / `phase_error`, `jobs.phase_attempts` / `phase_error`: failed
  tries of batch- or job-level work; bounded, so nothing waits forever.
- `chunk_parts`: the lines of a chunk committed so far (their part files, counts and the
  byte offsets of the lines they answer). Existing chunks keep their own part keys, which
  are still read; they need no rows here.
- an index to read job logs in time order.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ("chunks", "job_batches"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("expiries", sa.Integer, nullable=False,
                                       server_default="0"))
    for table in ("batches", "jobs"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("phase_attempts", sa.Integer, nullable=False,
                                       server_default="0"))
            batch.add_column(sa.Column("phase_error", sa.Text, nullable=True))
    op.create_table(
        "chunk_parts",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("batch_id", sa.String(64), nullable=False),
        sa.Column("chunk_id", sa.Integer, nullable=False),
        sa.Column("lo", sa.BigInteger, nullable=False),
        sa.Column("hi", sa.BigInteger, nullable=False),
        sa.Column("offsets", sa.JSON, nullable=False),
        sa.Column("n_ok", sa.Integer, nullable=False),
        sa.Column("n_err", sa.Integer, nullable=False),
        sa.Column("out_key", sa.String(512), nullable=True),
        sa.Column("err_key", sa.String(512), nullable=True),
    )
    op.create_index("ix_chunk_parts_batch_lo", "chunk_parts", ["batch_id", "lo"])
    # Job logs are read in time order, whichever worker wrote them.
    op.create_index("ix_job_logs_job_ts", "job_logs", ["job_id", "ts", "id"])


def downgrade() -> None:
    op.drop_index("ix_job_logs_job_ts", "job_logs")
    op.drop_index("ix_chunk_parts_batch_lo", "chunk_parts")
    op.drop_table("chunk_parts")
    for table in ("batches", "jobs"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("phase_error")
            batch.drop_column("phase_attempts")
    for table in ("chunks", "job_batches"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("expiries")
