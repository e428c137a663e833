"""The few-shot prototype finding per scored image: the nearest class and its distance.

Both are NULL when no prototype file is configured (``model.prototypes``) and for
images that were not scored. They are an extra finding beside the probability;
no tier is computed from them.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-10
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMN, as in 0011 and 0012: a batch rebuild of "image_results" would
    # drop a table that result_objects' foreign key points at (SQLite).
    op.add_column("image_results", sa.Column("prototype_class", sa.String(64)))
    op.add_column("image_results", sa.Column("prototype_distance", sa.Float))


def downgrade() -> None:
    for col in ("prototype_distance", "prototype_class"):
        op.drop_column("image_results", col)
