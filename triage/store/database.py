"""Engines and migrations: :func:`open_db` opens the database and upgrades it to head.

The database is a SQLite file in the data directory (one daemon) or a
PostgreSQL server through psycopg 3 (several daemons; ``database.url``). The
Alembic revisions live in ``migrations/`` (found through
:mod:`triage.resources`, so an installed wheel migrates as a checkout does)
and run on both.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session

from triage import __version__, resources
from triage.core.errors import TriageError

log = logging.getLogger(__name__)

# Seconds a new PostgreSQL connection may take: a server that is away must cost a
# C-STORE, a health probe or a worker round seconds, not the TCP stack's minutes.
CONNECT_TIMEOUT_S = 5
# The longest wait between tries of a background loop (worker claims, outbox rounds)
# while the database is unavailable: the wait doubles up to it, so an outage costs a
# few log lines a minute, and the loop is back at most this long after the database.
OUTAGE_BACKOFF_MAX_S = 30.0


# SQLite result codes that mean "not now" (locked by another connection, the file's disk
# failing or full, the file not openable) rather than "wrong statement".
_SQLITE_AWAY = ("SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_IOERR", "SQLITE_CANTOPEN", "SQLITE_FULL",
                "SQLITE_PROTOCOL")
# Seconds a SQLite write waits for another connection's lock, unless the caller says.
SQLITE_BUSY_TIMEOUT_S = 30.0


def _sqlite_pragmas(busy_timeout_s: float) -> Any:
    def on_connect(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed row survives a power cut, not only a process crash.
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
        cur.close()
    return on_connect


def sqlite_path(target: Path | str) -> Path | None:
    """Return the SQLite file ``target`` names (a path or a ``sqlite:///`` URL), or None
    when it names a server database."""
    if isinstance(target, Path) or "://" not in target:
        return Path(target)
    url = make_url(target)
    return Path(url.database or "") if url.get_backend_name() == "sqlite" else None


def _server_url(target: str) -> Any:
    """The URL with psycopg 3 as its driver (``postgresql://`` alone would pick psycopg2)."""
    url = make_url(target)
    if url.get_backend_name() == "postgres":
        url = url.set(drivername="postgresql")
    if url.get_backend_name() != "postgresql":
        raise ValueError(f"unsupported database {url.get_backend_name()!r}")
    return url.set(drivername="postgresql+psycopg")


def make_engine(target: Path | str, busy_timeout_s: float = SQLITE_BUSY_TIMEOUT_S) -> Engine:
    """Return an engine on ``target``: a SQLite file (a path or ``sqlite:///`` URL; WAL,
    synchronous=FULL, foreign keys on, a write waiting ``busy_timeout_s`` for another
    connection's lock) or a PostgreSQL URL (psycopg 3, connections checked before use).
    Raises ValueError for another kind of database."""
    path = sqlite_path(target)
    if path is None:
        # pool_pre_ping: a server restart or a failover must not cost a scoring round.
        # After an outage the pool's old connections are dead: pre-ping finds that out
        # and SQLAlchemy invalidates the whole pool, so nothing here reconnects by hand.
        return create_engine(_server_url(str(target)), pool_pre_ping=True, pool_size=8,
                             max_overflow=8, connect_args={"connect_timeout": CONNECT_TIMEOUT_S})
    path.parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        f"sqlite:///{path}",
        connect_args={"check_same_thread": False, "timeout": busy_timeout_s},
    )
    event.listen(engine, "connect", _sqlite_pragmas(busy_timeout_s))
    return engine


def unavailable(e: BaseException) -> bool:
    """Whether ``e`` says the database cannot be used right now (the server stopped or
    restarting, the connection lost, a SQLite file locked past its busy timeout) rather
    than that the statement was wrong: trying again later is the remedy."""
    orig = getattr(e, "orig", None)
    if isinstance(orig, sqlite3.Error):
        # SQLite calls a misspelt table an OperationalError too: judge by its result code.
        return str(getattr(orig, "sqlite_errorname", "")).startswith(_SQLITE_AWAY)
    if isinstance(e, (OperationalError, InterfaceError)):
        return True
    return isinstance(e, DBAPIError) and bool(e.connection_invalidated)


def why_unavailable(e: BaseException) -> str:
    """One line saying why the database is unavailable (the driver's first line; it names
    the server and the failure, never a statement's parameters)."""
    orig = getattr(e, "orig", None) or e
    text_ = str(orig).strip().splitlines()
    return f"{type(orig).__name__}: {text_[0] if text_ else 'no detail'}"[:300]


def is_shared(engine: Engine) -> bool:
    """Whether several daemons may share this engine's database (anything but SQLite)."""
    return engine.dialect.name != "sqlite"


def insert_missing(session: Session, table: Any, **values: Any) -> bool:
    """INSERT a row unless one with the same unique key exists (ON CONFLICT DO NOTHING, so
    two daemons inserting at once never fail); return whether this call inserted it."""
    if session.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert  # type: ignore[assignment]
    t = table.__table__
    # RETURNING, not rowcount: a row comes back only when this statement inserted it.
    stmt = insert(t).values(**values).on_conflict_do_nothing().returning(*t.primary_key.columns)
    return session.execute(stmt).first() is not None


def db_now(session: Session) -> float:
    """Return the time now, in seconds since the epoch, as the database server sees it.

    Leases between daemons on several machines are judged by the one clock they
    share; SQLite has a single daemon, whose own clock is the database's.
    """
    if session.get_bind().dialect.name == "postgresql":
        return float(session.scalar(text("SELECT extract(epoch FROM clock_timestamp())")))
    import time

    return time.time()


def alembic_config(engine: Engine) -> Any:
    """Return an Alembic Config pointing at ``migrations/`` and this engine."""
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(resources.path("migrations")))
    # Alembic's config is a ConfigParser: '%' (as in a URL-quoted socket path or
    # certificate file, or a data directory named "50%") must be doubled. The
    # engine itself is what env.py uses; the URL (password masked) is informative.
    cfg.set_main_option("sqlalchemy.url", str(engine.url).replace("%", "%%"))
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


class UnknownRevision(TriageError):
    """The database was migrated by a newer triage than this one: its revision is unknown here."""


def known_revisions() -> tuple[set[str], str]:
    """Return (every revision this code ships, its head)."""
    from alembic.script import ScriptDirectory

    scripts = ScriptDirectory(str(resources.path("migrations")))
    return {r.revision for r in scripts.walk_revisions()}, str(scripts.get_current_head())


def check_revision(engine: Engine) -> str | None:
    """Return the database's revision (None when empty) after checking this code knows it.

    Raises UnknownRevision when a newer triage has migrated the database: Alembic cannot
    downgrade from a revision it has no script for, and running old code on a newer
    schema could lose what the newer code records.
    """
    current = current_revision(engine)
    known, head = known_revisions()
    if current is not None and current not in known:
        raise UnknownRevision(
            f"the database is at revision {current!r}, which triage {__version__} (newest "
            f"revision {head!r}) does not know: a newer triage has upgraded it; run that "
            "version, or restore a backup taken before the upgrade")
    return current


def open_db(target: Path | str, busy_timeout_s: float = SQLITE_BUSY_TIMEOUT_S) -> Engine:
    """Open the database (a SQLite path or URL, created if needed and readable by the
    daemon's user only; or a PostgreSQL URL) and upgrade it to head; return the engine
    (``busy_timeout_s``: see :func:`make_engine`).

    Raises ValueError for an unsupported URL, SQLAlchemy's OperationalError when the
    server cannot be reached, and UnknownRevision when a newer triage has migrated it."""
    path = sqlite_path(target)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Created 0600 before SQLite opens it: SQLite gives its -wal and -shm files the same mode.
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    engine = make_engine(path if path is not None else target, busy_timeout_s)
    try:
        before = check_revision(engine)
    except UnknownRevision:
        engine.dispose()
        raise
    upgrade(engine)
    after = current_revision(engine)
    if before != after:
        log.info("database migrated from %s to %s", before or "empty", after)
    return engine


def downgrade(engine: Engine, revision: str) -> None:
    """Migrate the database down to ``revision`` (tests and operators undoing an upgrade)."""
    from alembic import command

    command.downgrade(alembic_config(engine), revision)
