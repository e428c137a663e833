"""One daemon on SQLite: claims left by a crashed run are released at the next start."""

from __future__ import annotations

from pathlib import Path

from pydicom.uid import generate_uid
from sqlalchemy import select, update

from dicom_io.spool import Spool
from tests.store.test_shared import _received
from triage.store import leases
from triage.store import schema as db
from triage.store.database import open_db
from triage.store.repository import Store
from triage.store.schema import Study


def test_release_all_frees_a_dead_predecessors_claims(tmp_path: Path) -> None:
    store = Store(open_db(f"sqlite:///{tmp_path / 'triage.sqlite'}"))
    spool = Spool(tmp_path / "spool", fsync=False)
    for k in range(3):
        store.record_instance(_received(spool, tmp_path, str(generate_uid()), k))
    with store.write() as s:
        s.execute(update(Study).values(state=db.COMPLETE, completed_at=1.0))
    assert len(leases.claim(store, "dead:1:aaaaaa", 10, 3600.0)) == 3
    assert leases.claim(store, "me:2:bbbbbb", 10, 60.0) == []  # the dead run's, for an hour
    assert leases.release_all(store) == 3
    with store.read() as s:
        every = sorted(s.scalars(select(Study.id)).all())
    assert sorted(leases.claim(store, "me:2:bbbbbb", 10, 60.0)) == every
    assert leases.release_all(store) == 3 and leases.release_all(store) == 0


def test_a_data_directory_whose_name_has_a_percent_sign_migrates(tmp_path: Path) -> None:
    """Alembic's ConfigParser would read '%' in the URL as interpolation."""
    root = tmp_path / "site 50%"
    root.mkdir()
    store = Store(open_db(f"sqlite:///{root / 'triage.sqlite'}"))
    with store.read() as s:
        assert s.scalars(select(Study.id)).all() == []
