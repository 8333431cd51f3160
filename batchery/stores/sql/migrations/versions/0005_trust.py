"""The trust model: endpoints and deployments learn the project that owns them (those made
over the API) and the config file's allow-list of projects. Rows made before keep both
empty: they stay usable by every project, as they were.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ("deployments", "endpoints"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("project", sa.String(128), nullable=True))
            batch.add_column(sa.Column("projects", sa.JSON(none_as_null=True), nullable=True))


def downgrade() -> None:
    for table in ("endpoints", "deployments"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("projects")
            batch.drop_column("project")
