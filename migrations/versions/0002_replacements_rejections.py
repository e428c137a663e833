"""Audit tables: replaced resends and refused C-STOREs.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "replacements",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("instance_id", sa.Integer, sa.ForeignKey("instances.id"), nullable=False),
        sa.Column("old_relpath", sa.Text, nullable=False),
        sa.Column("old_sha256", sa.String(64), nullable=False),
        sa.Column("new_relpath", sa.Text, nullable=False),
        sa.Column("new_sha256", sa.String(64), nullable=False),
        sa.Column("replaced_at", sa.Float, nullable=False),
    )
    op.create_index("ix_replacements_instance_id", "replacements", ["instance_id"])
    op.create_table(
        "rejections",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("calling_ae", sa.String(16)),
        sa.Column("sop_class_uid", sa.String(64)),
        sa.Column("sop_uid_hash", sa.String(16)),
        sa.Column("status", sa.Integer, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
    )
    op.create_index("ix_rejections_at", "rejections", ["at"])


def downgrade() -> None:
    op.drop_table("rejections")
    op.drop_table("replacements")
