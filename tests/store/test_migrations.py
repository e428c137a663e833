"""Alembic migrations: rows survive an upgrade, and the ORM matches the migrated schema."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import text

from triage.store import database as dbm
from triage.store import schema as db


def test_upgrade_from_first_revision_keeps_rows(tmp_path: Path) -> None:
    engine = dbm.make_engine(tmp_path / "old.sqlite")
    dbm.upgrade(engine, "0001")
    assert dbm.current_revision(engine) == "0001"
    with engine.begin() as c:
        c.execute(text("INSERT INTO studies (study_uid, state, first_received_at, last_received_at)"
                       " VALUES ('1.2.3', 'complete', 1.0, 2.0)"))
        c.execute(text("INSERT INTO instances (study_id, sop_instance_uid, sop_class_uid, series_uid,"
                       " transfer_syntax, relpath, sha256, size, received_at)"
                       " VALUES (1, '1.2.3.4', '1.2.840.10008.5.1.4.1.1.1', '1.2.3.5',"
                       " '1.2.840.10008.1.2.1', 'aa/x.dcm', 'ff', 10, 1.5)"))
    engine.dispose()
    engine = dbm.open_db(tmp_path / "old.sqlite")  # what `serve` does at start
    with engine.connect() as c:
        assert dbm.current_revision(engine) == "0011"
        assert c.execute(text("SELECT study_uid, state, version, reported_at FROM studies")).all() == [
            ("1.2.3", "complete", 1, None)]
        assert c.execute(text("SELECT relpath FROM instances")).all() == [("aa/x.dcm",)]
        assert c.execute(text("SELECT count(*) FROM rejections")).scalar() == 0


def test_orm_matches_migrated_schema(tmp_path: Path) -> None:
    engine = dbm.open_db(tmp_path / "head.sqlite")
    with engine.connect() as c:
        diff = compare_metadata(MigrationContext.configure(c), db.Base.metadata)
    assert diff == []


def test_database_runs_in_wal_mode(tmp_path: Path) -> None:
    engine = dbm.open_db(tmp_path / "wal.sqlite")
    with engine.connect() as c:
        assert c.execute(text("PRAGMA journal_mode")).scalar() == "wal"


def test_outbox_revision_keeps_results_and_names_their_threshold_source(tmp_path: Path) -> None:
    engine = dbm.make_engine(tmp_path / "r.sqlite")
    dbm.upgrade(engine, "0006")
    with engine.begin() as c:
        c.execute(text("INSERT INTO studies (study_uid, state, version, n_instances,"
                       " first_received_at, last_received_at) VALUES ('1.2.3', 'scored', 1, 0, 1, 2)"))
        c.execute(text("INSERT INTO results (study_id, version, state, tier, model_name,"
                       " model_sha256, thresholds, timings, created_at)"
                       " VALUES (1, 1, 'scored', 'routine', 'm', 'ab', '{}', '{}', 3.0)"))
    dbm.upgrade(engine)
    with engine.connect() as c:
        assert c.execute(text("SELECT tier, thresholds_source FROM results")).all() == [
            ("routine", "model card")]
        assert c.execute(text("SELECT count(*) FROM outbox")).scalar() == 0
    dbm.downgrade(engine, "0006")
    with engine.connect() as c:
        assert c.execute(text("SELECT tier FROM results")).all() == [("routine",)]
    dbm.upgrade(engine)
    assert dbm.current_revision(engine) == "0011"
