"""Pull mode: what each PACS source last showed of a study, and what was retrieved from it.

One row per (source, StudyInstanceUID). ``remote_instances`` is the study's
NumberOfStudyRelatedInstances at the last poll, so a poll that sees the same
count does not query deeper; ``retrieved`` counts the instances of the pulled
modalities retrieved so far. A restart reads these and pulls nothing again.
``pull_sources`` holds each source's last poll, failures in a row and the error,
which ``triage status``, ``/healthz`` and ``/metrics`` show.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "pull_studies",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("source", sa.String(64), nullable=False),
        sa.Column("study_uid", sa.String(64), nullable=False),
        sa.Column("remote_instances", sa.Integer),
        sa.Column("retrieved", sa.Integer, nullable=False),
        sa.Column("first_seen_at", sa.Float, nullable=False),
        sa.Column("retrieved_at", sa.Float),
        sa.UniqueConstraint("source", "study_uid", name="uq_pull_studies_source_study"),
    )
    op.create_table(
        "pull_sources",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("last_poll_at", sa.Float),
        sa.Column("last_ok_at", sa.Float),
        sa.Column("failures", sa.Integer, nullable=False),
        sa.Column("last_error", sa.Text),
        sa.Column("next_try_at", sa.Float),
        sa.Column("retrieved_total", sa.Integer, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("pull_sources")
    op.drop_table("pull_studies")
