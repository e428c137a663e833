"""Study history and scoring failures.

``study_events`` records what happened to a study beyond its results: an
instance moved to or from it (a SOP Instance re-sent under a corrected
StudyInstanceUID), a demographic correction (the values it replaced), a
scoring failure. ``studies`` gains a note (e.g. "moved to study …"), the
scoring attempts and the time of the next one, the failure reason, and who
marked it reported.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMN (SQLite does it in place): a batch rebuild of "studies"
    # would drop a table that other tables' foreign keys point at.
    op.add_column("studies", sa.Column("note", sa.Text))
    op.add_column("studies", sa.Column("attempts", sa.Integer, nullable=False, server_default="0"))
    op.add_column("studies", sa.Column("retry_at", sa.Float))
    op.add_column("studies", sa.Column("failure", sa.Text))
    op.add_column("studies", sa.Column("reported_by", sa.String(64)))
    op.create_table(
        "study_events",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("study_id", sa.Integer, sa.ForeignKey("studies.id"), nullable=False),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("detail", sa.Text, nullable=False),
    )
    op.create_index("ix_study_events_study_id", "study_events", ["study_id"])


def downgrade() -> None:
    op.drop_table("study_events")
    for col in ("reported_by", "failure", "retry_at", "attempts", "note"):
        op.drop_column("studies", col)
