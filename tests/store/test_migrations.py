"""Alembic migrations, on SQLite and on a real PostgreSQL server: rows survive an upgrade, a
downgrade and upgrade again, and the ORM matches the migrated schema."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import text

from triage.store import database as dbm
from triage.store import schema as db

HEAD = "0014"


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Path | str:
    """A new, empty database: a SQLite file, or a database on the session's PostgreSQL."""
    if request.param == "sqlite":
        return tmp_path / "t.sqlite"
    return str(request.getfixturevalue("pg_url"))


def test_upgrade_from_first_revision_keeps_rows(target: Path | str) -> None:
    engine = dbm.make_engine(target)
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
    engine = dbm.open_db(target)  # what `serve` does at start
    with engine.connect() as c:
        assert dbm.current_revision(engine) == HEAD
        assert c.execute(text("SELECT study_uid, state, version, reported_at FROM studies")).all() == [
            ("1.2.3", "complete", 1, None)]
        assert c.execute(text("SELECT relpath FROM instances")).all() == [("aa/x.dcm",)]
        assert c.execute(text("SELECT count(*) FROM rejections")).scalar() == 0


def test_orm_matches_migrated_schema(target: Path | str) -> None:
    engine = dbm.open_db(target)
    with engine.connect() as c:
        diff = compare_metadata(MigrationContext.configure(c), db.Base.metadata)
    assert diff == []


def test_database_runs_in_wal_mode(tmp_path: Path) -> None:
    engine = dbm.open_db(tmp_path / "wal.sqlite")
    with engine.connect() as c:
        assert c.execute(text("PRAGMA journal_mode")).scalar() == "wal"


def test_outbox_revision_keeps_results_and_names_their_threshold_source(
        target: Path | str) -> None:
    engine = dbm.make_engine(target)
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
    assert dbm.current_revision(engine) == HEAD


def test_every_revision_downgrades_to_the_first_and_upgrades_again(target: Path | str) -> None:
    engine = dbm.open_db(target)
    with engine.begin() as c:
        c.execute(text("INSERT INTO studies (study_uid, state, version, n_instances, attempts,"
                       " first_received_at, last_received_at) VALUES ('1.2.9', 'scored', 2, 0, 0,"
                       " 1, 2)"))
    dbm.downgrade(engine, "0001")
    dbm.upgrade(engine)
    assert dbm.current_revision(engine) == HEAD
    with engine.connect() as c:
        assert c.execute(text("SELECT study_uid, version FROM studies")).all() == [("1.2.9", 2)]


def test_daemons_starting_together_migrate_once(pg_url: str) -> None:
    # Processes, as daemons are (Alembic's context is per process, not per thread).
    import subprocess
    import sys

    code = "import sys; from triage.store.database import open_db; open_db(sys.argv[1])"
    procs = [subprocess.Popen([sys.executable, "-c", code, pg_url], stderr=subprocess.PIPE,
                              text=True) for _ in range(3)]
    errors = [p.communicate(timeout=120)[1] for p in procs if p.wait(120) != 0]
    assert errors == []
    assert dbm.current_revision(dbm.make_engine(pg_url)) == HEAD


def test_prototype_revision_keeps_image_results_with_no_finding(target: Path | str) -> None:
    engine = dbm.make_engine(target)
    dbm.upgrade(engine, "0012")
    with engine.begin() as c:
        c.execute(text("INSERT INTO studies (study_uid, state, version, n_instances, attempts,"
                       " first_received_at, last_received_at) VALUES ('1.2.7', 'scored', 1, 1, 0,"
                       " 1, 2)"))
        c.execute(text("INSERT INTO instances (study_id, sop_instance_uid, sop_class_uid, series_uid,"
                       " transfer_syntax, relpath, sha256, size, received_at)"
                       " VALUES (1, '1.2.7.4', '1.2.840.10008.5.1.4.1.1.1', '1.2.7.5',"
                       " '1.2.840.10008.1.2.1', 'aa/x.dcm', 'ff', 10, 1.5)"))
        c.execute(text("INSERT INTO results (study_id, version, state, probability, tier,"
                       " model_name, model_sha256, thresholds, timings, created_at)"
                       " VALUES (1, 1, 'scored', 0.7, 'abnormal', 'm', 'ab', '{}', '{}', 3.0)"))
        c.execute(text("INSERT INTO image_results (result_id, instance_id, probability, scored_at)"
                       " VALUES (1, 1, 0.7, 3.0)"))
    dbm.upgrade(engine)
    assert dbm.current_revision(engine) == HEAD
    with engine.begin() as c:
        assert c.execute(text("SELECT probability, prototype_class, prototype_distance"
                              " FROM image_results")).all() == [(0.7, None, None)]
        c.execute(text("UPDATE image_results SET prototype_class = 'virus',"
                       " prototype_distance = 0.25"))
    dbm.downgrade(engine, "0012")
    with engine.connect() as c:
        assert c.execute(text("SELECT probability FROM image_results")).all() == [(0.7,)]
    dbm.upgrade(engine)
    with engine.connect() as c:
        assert c.execute(text("SELECT prototype_class FROM image_results")).all() == [(None,)]


def test_a_database_from_a_newer_triage_is_refused_and_left_alone(target: Path | str) -> None:
    engine = dbm.open_db(target)
    with engine.begin() as c:
        c.execute(text("UPDATE alembic_version SET version_num = '0099'"))
    engine.dispose()
    with pytest.raises(dbm.UnknownRevision, match="revision '0099', which triage .* does not "
                                                  "know: a newer triage has upgraded it"):
        dbm.open_db(target)
    engine = dbm.make_engine(target)
    assert dbm.current_revision(engine) == "0099"  # nothing was migrated or stamped
    engine.dispose()
