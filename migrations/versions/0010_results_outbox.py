"""Results sent to the PACS: the DICOM objects each result produces, and the outbox.

``result_objects`` holds one row per object (a result's SR, an image's
overlay) with its UIDs, fixed when the result is recorded; ``outbox`` holds one
row per object and destination with its delivery state. ``results`` gains
where its thresholds came from.

Revision ID: 0010
Revises: 0006
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("results") as batch:
        batch.add_column(sa.Column("thresholds_source", sa.String(128), nullable=False,
                                   server_default="model card"))
    op.create_table(
        "result_objects",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("result_id", sa.Integer, sa.ForeignKey("results.id"), nullable=False),
        sa.Column("image_result_id", sa.Integer, sa.ForeignKey("image_results.id")),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("sop_class_uid", sa.String(64), nullable=False),
        sa.Column("series_uid", sa.String(64), nullable=False),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False, unique=True),
        sa.Column("series_number", sa.Integer, nullable=False),
        sa.Column("instance_number", sa.Integer, nullable=False),
        sa.Column("relpath", sa.Text),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_index("ix_result_objects_result_id", "result_objects", ["result_id"])
    op.create_table(
        "outbox",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("object_id", sa.Integer, sa.ForeignKey("result_objects.id"), nullable=False),
        sa.Column("destination", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("next_attempt_at", sa.Float, nullable=False),
        sa.Column("last_attempt_at", sa.Float),
        sa.Column("last_status", sa.Integer),
        sa.Column("last_error", sa.Text),
        sa.Column("sent_at", sa.Float),
        sa.UniqueConstraint("object_id", "destination", name="uq_outbox_object_destination"),
    )
    op.create_index("ix_outbox_object_id", "outbox", ["object_id"])
    op.create_index("ix_outbox_due", "outbox", ["state", "next_attempt_at"])


def downgrade() -> None:
    op.drop_table("outbox")
    op.drop_table("result_objects")
    with op.batch_alter_table("results") as batch:
        batch.drop_column("thresholds_source")
