"""Patient age per scored image, so the drift watch can see a population shift.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("image_results") as batch:
        batch.add_column(sa.Column("patient_age_years", sa.Float, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("image_results") as batch:
        batch.drop_column("patient_age_years")
