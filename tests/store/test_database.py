"""What counts as "the database is unavailable" (retry later) rather than a wrong statement."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from triage.store.database import make_engine, unavailable, why_unavailable


def test_a_locked_sqlite_file_is_unavailable_with_a_one_line_reason(tmp_path: Path) -> None:
    path = tmp_path / "t.sqlite"
    engine = make_engine(path, busy_timeout_s=0.2)
    with engine.begin() as c:
        c.execute(text("CREATE TABLE t (x INTEGER PRIMARY KEY)"))
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN EXCLUSIVE")
        with pytest.raises(OperationalError) as info, engine.begin() as c:
            c.execute(text("INSERT INTO t VALUES (1)"))
    finally:
        other.close()
        engine.dispose()
    assert unavailable(info.value)
    assert why_unavailable(info.value) == "OperationalError: database is locked"


def test_a_broken_statement_or_a_constraint_is_not_an_outage(tmp_path: Path) -> None:
    engine = make_engine(tmp_path / "t.sqlite")
    with engine.begin() as c:
        c.execute(text("CREATE TABLE t (x INTEGER PRIMARY KEY)"))
        c.execute(text("INSERT INTO t VALUES (1)"))
    with pytest.raises(IntegrityError) as dup, engine.begin() as c:
        c.execute(text("INSERT INTO t VALUES (1)"))
    with pytest.raises(OperationalError) as misspelt, engine.begin() as c:
        c.execute(text("SELECT x FROM no_such_table"))
    engine.dispose()
    assert not unavailable(dup.value)
    assert not unavailable(misspelt.value)  # SQLite's OperationalError, but no outage
    assert not unavailable(ValueError("not a database error"))
    lost = DBAPIError("SELECT 1", None, Exception("server closed the connection"),
                      connection_invalidated=True)
    assert unavailable(lost)
