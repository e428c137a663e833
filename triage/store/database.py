"""Engines and migrations: :func:`open_db` opens the database and upgrades it to head.

The Alembic revisions live in ``migrations/`` (found through
:mod:`triage.resources`, so an installed wheel migrates as a checkout does).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine

from triage import resources

log = logging.getLogger(__name__)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    # FULL: a committed row survives a power cut, not only a process crash.
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def make_engine(db_path: Path) -> Engine:
    """Return an engine on ``db_path`` with WAL, synchronous=FULL and foreign keys on."""
    db_path.parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        f"sqlite:///{db_path}",
        connect_args={"check_same_thread": False, "timeout": 30},
    )
    event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def alembic_config(engine: Engine) -> Any:
    """Return an Alembic Config pointing at ``migrations/`` and this engine."""
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(resources.path("migrations")))
    cfg.set_main_option("sqlalchemy.url", str(engine.url))
    cfg.attributes["engine"] = engine
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Migrate the database to ``revision`` (head by default)."""
    from alembic import command

    command.upgrade(alembic_config(engine), revision)


def current_revision(engine: Engine) -> str | None:
    """Return the database's Alembic revision, or None for an empty database."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def open_db(db_path: Path) -> Engine:
    """Open (creating if needed, readable by the daemon's user only) the database and upgrade
    it to head; return the engine."""
    db_path = Path(db_path)
    db_path.parent.mkdir(parents=True, exist_ok=True)
    # Created 0600 before SQLite opens it: SQLite gives its -wal and -shm files the same mode.
    os.close(os.open(db_path, os.O_RDWR | os.O_CREAT, 0o600))
    engine = make_engine(db_path)
    before = current_revision(engine)
    upgrade(engine)
    after = current_revision(engine)
    if before != after:
        log.info("database migrated from %s to %s", before or "empty", after)
    return engine


def downgrade(engine: Engine, revision: str) -> None:
    """Migrate the database down to ``revision`` (tests and operators undoing an upgrade)."""
    from alembic import command

    command.downgrade(alembic_config(engine), revision)
