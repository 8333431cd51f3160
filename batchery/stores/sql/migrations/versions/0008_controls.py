"""Controls beyond the hosted APIs: pause and resume, retries of what failed, priorities,
spend ceilings, idempotent creates and deployment prices.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.add_column(sa.Column("priority", sa.Integer, nullable=False, server_default="0"))
        batch.add_column(sa.Column("paused_at", sa.BigInteger, nullable=True))
        batch.add_column(sa.Column("retry_of", sa.String(64), nullable=True))
        batch.add_column(sa.Column("max_cost", sa.Float, nullable=True))
        batch.add_column(sa.Column("max_total_tokens", sa.BigInteger, nullable=True))
        batch.add_column(sa.Column("cost", sa.Float, nullable=False, server_default="0"))
        batch.add_column(sa.Column("warnings", sa.JSON(none_as_null=True), nullable=True))
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("priority", sa.Integer, nullable=False, server_default="0"))
        batch.add_column(sa.Column("paused_at", sa.Float, nullable=True))
        batch.add_column(sa.Column("retry_of", sa.String(64), nullable=True))
        batch.add_column(sa.Column("warnings", sa.JSON(none_as_null=True), nullable=True))
    with op.batch_alter_table("deployments") as batch:
        batch.add_column(sa.Column("prices", sa.JSON(none_as_null=True), nullable=True))
    op.create_table(
        "idempotency_keys",
        sa.Column("project", sa.String(128), primary_key=True),
        sa.Column("kind", sa.String(32), primary_key=True),
        sa.Column("key", sa.String(256), primary_key=True),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("object_id", sa.String(64), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_index("ix_idempotency_keys_created_at", "idempotency_keys", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_idempotency_keys_created_at", "idempotency_keys")
    op.drop_table("idempotency_keys")
    with op.batch_alter_table("deployments") as batch:
        batch.drop_column("prices")
    with op.batch_alter_table("jobs") as batch:
        for name in ("warnings", "retry_of", "paused_at", "priority"):
            batch.drop_column(name)
    with op.batch_alter_table("batches") as batch:
        for name in ("warnings", "cost", "max_total_tokens", "max_cost", "retry_of",
                     "paused_at", "priority"):
            batch.drop_column(name)
