"""The batch usage's details: cached input tokens and reasoning output tokens.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.add_column(sa.Column("cached_tokens", sa.BigInteger, nullable=False,
                                   server_default="0"))
        batch.add_column(sa.Column("reasoning_tokens", sa.BigInteger, nullable=False,
                                   server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.drop_column("reasoning_tokens")
        batch.drop_column("cached_tokens")
