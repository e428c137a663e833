"""Scoring results (versioned per study), per-image results, drift checks and alerts.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "results",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("study_id", sa.Integer, sa.ForeignKey("studies.id"), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("probability", sa.Float),
        sa.Column("tier", sa.String(32), nullable=False),
        sa.Column("previous_tier", sa.String(32)),
        sa.Column("tier_change", sa.String(8)),
        sa.Column("reasons", sa.Text),
        sa.Column("model_name", sa.String(128), nullable=False),
        sa.Column("model_sha256", sa.String(64), nullable=False),
        sa.Column("thresholds", sa.Text, nullable=False),
        sa.Column("timings", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.UniqueConstraint("study_id", "version", name="uq_results_study_version"),
    )
    op.create_index("ix_results_study_id", "results", ["study_id"])
    op.create_table(
        "image_results",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("result_id", sa.Integer, sa.ForeignKey("results.id"), nullable=False),
        sa.Column("instance_id", sa.Integer, sa.ForeignKey("instances.id"), nullable=False),
        sa.Column("probability", sa.Float),
        sa.Column("reason", sa.Text),
        sa.Column("heatmap_path", sa.Text),
        sa.Column("thumb_path", sa.Text),
        sa.Column("manufacturer", sa.String(64)),
        sa.Column("photometric", sa.String(16)),
        sa.Column("bits_stored", sa.Integer),
        sa.Column("rows", sa.Integer),
        sa.Column("columns", sa.Integer),
        sa.Column("pixel_spacing", sa.String(64)),
        sa.Column("view_position", sa.String(16)),
        sa.Column("transfer_syntax", sa.String(64)),
        sa.Column("scored_at", sa.Float, nullable=False),
    )
    op.create_index("ix_image_results_result_id", "image_results", ["result_id"])
    op.create_index("ix_image_results_scored_at", "image_results", ["scored_at"])
    op.create_table(
        "drift_checks",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("n", sa.Integer, nullable=False),
        sa.Column("psi", sa.Float),
        sa.Column("ks", sa.Float),
        sa.Column("unseen", sa.Text),
        sa.Column("alert", sa.Boolean, nullable=False),
        sa.Column("summary", sa.Text, nullable=False),
    )
    op.create_table(
        "alerts",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("active", sa.Boolean, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("alerts")
    op.drop_table("drift_checks")
    op.drop_table("image_results")
    op.drop_table("results")
