"""Each engine worker's model loads: how long each model took to load when the worker
started (its warm pool), and the models that failed to load, with why.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("workers") as batch:
        batch.add_column(sa.Column("load_s", sa.JSON(none_as_null=True), nullable=True))
        batch.add_column(sa.Column("load_errors", sa.JSON(none_as_null=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("workers") as batch:
        batch.drop_column("load_errors")
        batch.drop_column("load_s")
