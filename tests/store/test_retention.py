"""Retention: only studies reported long ago lose their files and rows; unread ones never do."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from tests import synth
from tests.conftest import send, wait_for
from triage.service.daemon import Daemon
from triage.store import schema as db
from triage.store.database import make_engine, open_db
from triage.store.repository import Store
from triage.store.retention import purge_reported
from triage.store.schema import (
    Delivery,
    ImageResult,
    Instance,
    Replacement,
    Result,
    ResultObject,
    Study,
)

DAY = 86400.0
NOW = 100 * DAY
SPEC = synth.SynthSpec(rows=160, columns=160)


def _template_db() -> Path:
    path = Path(tempfile.mkdtemp(prefix="triage-ret-")) / "t.sqlite"
    open_db(path).dispose()
    return path


TEMPLATE = _template_db()


def make_store(root: Path) -> Store:
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(TEMPLATE, root / "triage.sqlite")
    return Store(make_engine(root / "triage.sqlite"), clock=lambda: NOW)


def add(store: Store, root: Path, uid: str, state: str, reported_at: float | None) -> list[Path]:
    """Insert a study with one instance (replaced once), one result, one overlay and one SR in
    the outbox; write the files."""
    files = [root / "spool" / f"{uid}/a.dcm", root / "spool" / f"{uid}/old.dcm",
             root / "heatmaps" / f"{uid}/h.png", root / "outbox" / f"{uid}/sr.dcm"]
    for f in files:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"x")
    with store.write() as s:
        study = Study(study_uid=uid, state=state, version=1, n_instances=1, first_received_at=1.0,
                      last_received_at=1.0, reported_at=reported_at)
        inst = Instance(study=study, sop_instance_uid=uid + ".1", sop_class_uid="1.2", series_uid="1.3",
                        transfer_syntax="1.2.840.10008.1.2.1", relpath=f"{uid}/a.dcm", sha256="f",
                        size=1, received_at=1.0)
        s.add_all([study, inst])
        s.flush()
        s.add(Replacement(instance_id=inst.id, old_relpath=f"{uid}/old.dcm", old_sha256="e",
                          new_relpath=f"{uid}/a.dcm", new_sha256="f", replaced_at=1.0))
        res = Result(study_id=study.id, version=1, state=db.SCORED, probability=0.5, tier="routine",
                     model_name="m", model_sha256="0", thresholds="{}", timings="{}", created_at=1.0)
        s.add(res)
        s.flush()
        s.add(ImageResult(result_id=res.id, instance_id=inst.id, probability=0.5,
                          heatmap_path=f"heatmaps/{uid}/h.png",
                          scored_at=1.0))
        obj = ResultObject(result_id=res.id, kind=db.SR, sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34",
                           series_uid=uid + ".8", sop_instance_uid=uid + ".9", series_number=9001,
                           instance_number=1, relpath=f"outbox/{uid}/sr.dcm", created_at=1.0)
        s.add(Delivery(object=obj, destination="PACS", state=db.SENT, attempts=1,
                       next_attempt_at=1.0, sent_at=1.0))
    return files


def _uids(store: Store) -> set[str]:
    with store.read() as s:
        return set(s.scalars(select(Study.study_uid)))


def test_purge_removes_old_reported_studies_and_keeps_everything_else(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    old = add(store, tmp_path, "old", db.SCORED, NOW - 40 * DAY)
    recent = add(store, tmp_path, "recent", db.SCORED, NOW - 1 * DAY)
    unread = add(store, tmp_path, "unread", db.SCORED, None)
    queued = add(store, tmp_path, "queued", db.COMPLETE, NOW - 40 * DAY)
    out = purge_reported(store, tmp_path / "spool", tmp_path, 30 * DAY, NOW)
    assert (out.studies, out.files) == (1, 4)
    assert not any(f.exists() for f in old)
    assert all(f.exists() for f in recent + unread + queued)
    assert _uids(store) == {"recent", "unread", "queued"}
    with store.read() as s:
        for table in (Instance, Replacement, Result, ImageResult, ResultObject, Delivery):
            assert s.scalar(select(func.count()).select_from(table)) == 3
    # a second run finds nothing more
    assert purge_reported(store, tmp_path / "spool", tmp_path, 30 * DAY, NOW).studies == 0


def test_purge_finishes_after_a_crash_between_files_and_rows(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    for f in add(store, tmp_path, "half", db.SCORED, NOW - 40 * DAY):
        f.unlink()  # the files went, the rows did not commit
    out = purge_reported(store, tmp_path / "spool", tmp_path, 30 * DAY, NOW)
    assert (out.studies, out.files) == (1, 0) and _uids(store) == set()


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([db.RECEIVING, db.COMPLETE, db.SCORED, db.UNSCORED, db.FAILED]),
                          st.one_of(st.none(), st.floats(0, NOW))), max_size=6),
       st.floats(0, 60 * DAY))
def test_an_unread_or_unfinished_study_is_never_purged(studies: list[tuple[str, float | None]],
                                                        keep_s: float) -> None:
    root = Path(tempfile.mkdtemp(prefix="triage-ret-"))
    try:
        store = make_store(root)
        for i, (state, reported) in enumerate(studies):
            add(store, root, f"s{i}", state, reported)
        purge_reported(store, root / "spool", root, keep_s, NOW)
        expected = {f"s{i}" for i, (state, reported) in enumerate(studies)
                    if reported is None or reported >= NOW - keep_s
                    or state in (db.RECEIVING, db.COMPLETE)}
        assert _uids(store) == expected
        for uid in expected:
            assert (root / "spool" / uid / "a.dcm").exists()
        store.engine.dispose()
    finally:
        shutil.rmtree(root)


def test_the_daemon_purges_a_study_reported_long_ago_through_its_scheduled_job(
        daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory(**{"worklist.retention_days": 30})
    assert "purge-reported" in d.jobs.job_names()
    kept, old = synth.make_dataset(SPEC), synth.make_dataset(SPEC)
    assert send(d.dicom_port, [kept, old]) == [0, 0]

    def studies() -> dict[str, Study]:
        with d.store.read() as s:
            return {st.study_uid: st for st in s.scalars(select(Study))}

    wait_for(lambda: {st.state for st in studies().values()} == {db.SCORED}, timeout=90)
    with d.store.read() as s:
        old_files = [d.spool.root / p for p in s.scalars(
            select(Instance.relpath).join(Study).where(Study.study_uid == old.StudyInstanceUID))]
    assert old_files and all(f.exists() for f in old_files)
    with d.store.write() as s:  # reported 31 days ago
        s.scalar(select(Study).where(Study.study_uid == old.StudyInstanceUID)).reported_at = \
            d.store.clock() - 31 * DAY
    assert d.purge().studies == 1
    assert set(studies()) == {kept.StudyInstanceUID} and not any(f.exists() for f in old_files)
