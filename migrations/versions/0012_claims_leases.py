"""Several daemons on one database: scoring claims and the leader's lease.

``studies`` gains who is scoring the current version and until when the claim
holds (a daemon killed mid-scoring loses it when it runs out). ``leases``
holds named leases with an expiry; the one named "leader" says which daemon
runs the completion sweep, the worklist render, the drift watch, the purge and
the outbox.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-08
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMN, as in 0011: a batch rebuild of "studies" would drop a
    # table that other tables' foreign keys point at (SQLite).
    op.add_column("studies", sa.Column("claimed_by", sa.String(128)))
    op.add_column("studies", sa.Column("claimed_until", sa.Float))
    op.create_table(
        "leases",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("holder", sa.String(128), nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
        sa.Column("acquired_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("leases")
    for col in ("claimed_until", "claimed_by"):
        op.drop_column("studies", col)
