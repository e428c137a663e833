"""Alembic environment for triage: runs revisions on the engine triage hands in."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, text

config = context.config


def run_migrations_online() -> None:
    """Run migrations on the engine in ``config.attributes`` (or one built from the URL)."""
    engine = config.attributes.get("engine") or create_engine(
        config.get_main_option("sqlalchemy.url")
    )
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            # Daemons starting together migrate one after the other (DDL is transactional
            # there, so the second finds the database at head and does nothing).
            connection.execute(text("SELECT pg_advisory_xact_lock(7170017)"))
        # render_as_batch lets later revisions alter SQLite tables safely.
        context.configure(connection=connection, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    raise SystemExit("offline migrations are not supported; run against a database")
run_migrations_online()
