"""Studies and their acknowledged instances.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "studies",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("study_uid", sa.String(64), nullable=False, unique=True),
        sa.Column("accession_number", sa.String(64)),
        sa.Column("patient_name", sa.String(324)),
        sa.Column("patient_id", sa.String(64)),
        sa.Column("patient_sex", sa.String(16)),
        sa.Column("study_date", sa.String(8)),
        sa.Column("study_time", sa.String(16)),
        sa.Column("study_description", sa.String(64)),
        sa.Column("modality", sa.String(16)),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("version", sa.Integer, nullable=False, server_default="1"),
        sa.Column("n_instances", sa.Integer, nullable=False, server_default="0"),
        sa.Column("first_received_at", sa.Float, nullable=False),
        sa.Column("last_received_at", sa.Float, nullable=False),
        sa.Column("completed_at", sa.Float),
    )
    op.create_index("ix_studies_state", "studies", ["state"])
    op.create_table(
        "instances",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("study_id", sa.Integer, sa.ForeignKey("studies.id"), nullable=False),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False, unique=True),
        sa.Column("sop_class_uid", sa.String(64), nullable=False),
        sa.Column("series_uid", sa.String(64), nullable=False),
        sa.Column("transfer_syntax", sa.String(64), nullable=False),
        sa.Column("relpath", sa.Text, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.Integer, nullable=False),
        sa.Column("calling_ae", sa.String(16)),
        sa.Column("received_at", sa.Float, nullable=False),
        sa.Column("state", sa.String(16), nullable=False, server_default="received"),
    )
    op.create_index("ix_instances_study_id", "instances", ["study_id"])


def downgrade() -> None:
    op.drop_table("instances")
    op.drop_table("studies")
