"""When a radiologist marked a study reported (it then leaves the worklist for history).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        batch.add_column(sa.Column("reported_at", sa.Float))
        batch.create_index("ix_studies_reported_at", ["reported_at"])


def downgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        batch.drop_index("ix_studies_reported_at")
        batch.drop_column("reported_at")
