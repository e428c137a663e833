"""Drop what nothing reads (instance state, thumbnail paths); keep the patient's age per study.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("state")
    with op.batch_alter_table("image_results") as batch:
        batch.drop_column("thumb_path")
    with op.batch_alter_table("studies") as batch:
        batch.add_column(sa.Column("patient_age", sa.String(16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        batch.drop_column("patient_age")
    with op.batch_alter_table("image_results") as batch:
        batch.add_column(sa.Column("thumb_path", sa.Text, nullable=True))
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("state", sa.String(16), nullable=False,
                                   server_default="received"))
