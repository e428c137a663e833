"""Data integrity at the edges: studies split or merged by the PACS, demographic corrections.

Real daemon, real pynetdicom sender, real SQLite migrated by Alembic, real scoring.
"""

from __future__ import annotations

from pydicom.uid import generate_uid
from sqlalchemy import select

from tests import synth
from tests.conftest import send, wait_for
from triage.service.daemon import Daemon
from triage.store import schema as db
from triage.store.schema import ImageResult, Instance, Result, Study, StudyEvent

SPEC = synth.SynthSpec(rows=96, columns=96)


def _study(d: Daemon, study_uid: str) -> Study | None:
    with d.store.read() as s:
        return s.scalar(select(Study).where(Study.study_uid == study_uid))


def _latest(d: Daemon, study_uid: str) -> Result | None:
    with d.store.read() as s:
        sid = s.scalar(select(Study.id).where(Study.study_uid == study_uid))
        return s.scalar(select(Result).where(Result.study_id == sid)
                        .order_by(Result.version.desc()).limit(1))


def _scored(d: Daemon, study_uid: str, version: int = 1) -> Study | None:
    st = _study(d, study_uid)
    return st if st is not None and st.state == db.SCORED and st.version == version else None


def _both_scored(d: Daemon, study_uid: str) -> Study | None:
    """The study, once scored with its two images (whatever its version)."""
    st = _study(d, study_uid)
    res = _latest(d, study_uid)
    done = st is not None and st.state == db.SCORED and st.n_instances == 2
    return st if done and res is not None and st is not None and res.version == st.version \
        else None


def _events(d: Daemon, study_id: int) -> list[StudyEvent]:
    with d.store.read() as s:
        return list(s.scalars(select(StudyEvent).where(StudyEvent.study_id == study_id)))


def _image_instances(d: Daemon, result_id: int) -> list[int]:
    with d.store.read() as s:
        return list(s.scalars(select(ImageResult.instance_id).where(ImageResult.result_id == result_id)))


def _resent(ds, study_uid: str, accession: str):  # type: ignore[no-untyped-def]
    """The same SOP instance re-sent under another StudyInstanceUID (the PACS split the study)."""
    again = synth.make_dataset(synth.SynthSpec(rows=96, columns=96, accession_number=accession),
                               study_uid=study_uid, series_uid=generate_uid(),
                               sop_uid=ds.SOPInstanceUID)
    return again


def test_sop_resent_under_a_corrected_study_uid_moves_and_old_study_is_rescored(daemon: Daemon) -> None:
    old_uid, new_uid = generate_uid(), generate_uid()
    a = synth.make_dataset(SPEC, study_uid=old_uid)
    b = synth.make_dataset(SPEC, study_uid=old_uid)
    assert send(daemon.dicom_port, [a, b]) == [0, 0]
    # Both images scored; on a busy machine b may arrive after the 0.3 s quiet period and
    # reopen the study, so its first result may be version 2.
    first = wait_for(lambda: _both_scored(daemon, old_uid), timeout=60)

    assert send(daemon.dicom_port, [_resent(a, new_uid, "ACC-SPLIT")]) == [0]
    new = wait_for(lambda: _scored(daemon, new_uid), timeout=60)
    assert new.n_instances == 1
    res = _latest(daemon, new_uid)
    assert res is not None and res.state == db.SCORED and res.probability is not None
    with daemon.store.read() as s:
        inst = s.scalar(select(Instance).where(Instance.sop_instance_uid == a.SOPInstanceUID))
    assert inst is not None and inst.study_id == new.id
    assert _image_instances(daemon, res.id) == [inst.id]

    # The old study is rescored without the image: version 2, one image left.
    old = wait_for(lambda: _scored(daemon, old_uid, version=first.version + 1), timeout=60)
    assert old.n_instances == 1 and old.reported_at is None
    old_res = _latest(daemon, old_uid)
    assert old_res is not None and old_res.version == first.version + 1
    assert inst.id not in _image_instances(daemon, old_res.id)
    assert len(_image_instances(daemon, old_res.id)) == 1
    # Both studies' history says what happened.
    assert [e.kind for e in _events(daemon, old.id)] == ["moved-out"]
    assert "ACC-SPLIT" in _events(daemon, old.id)[0].detail
    assert [e.kind for e in _events(daemon, new.id)] == ["moved-in"]
    page = daemon.pages.study_page(old.id)
    assert page is not None and "moved to study ACC-SPLIT" in page


def test_study_left_empty_by_a_move_leaves_the_worklist_with_a_note(daemon: Daemon) -> None:
    old_uid, new_uid = generate_uid(), generate_uid()
    a = synth.make_dataset(synth.SynthSpec(rows=96, columns=96, accession_number="ACC-OLD"),
                           study_uid=old_uid)
    assert send(daemon.dicom_port, [a]) == [0]
    wait_for(lambda: _scored(daemon, old_uid), timeout=60)

    assert send(daemon.dicom_port, [_resent(a, new_uid, "ACC-MERGED")]) == [0]
    wait_for(lambda: _scored(daemon, new_uid), timeout=60)
    old = _study(daemon, old_uid)
    assert old is not None
    assert (old.state, old.n_instances, old.note) == (db.MOVED, 0, "moved to study ACC-MERGED")
    assert old.reported_at is not None
    placed = daemon.pages.render_worklist()
    assert [p.row.accession_number for p in placed] == ["ACC-MERGED"]
    history = daemon.pages.history_page()
    assert "ACC-OLD" in history and "moved to study ACC-MERGED" in history
    new = _study(daemon, new_uid)
    assert new is not None
    new_page = daemon.pages.study_page(new.id)
    assert new_page is not None and "moved here from study ACC-OLD" in new_page


def test_demographic_corrections_reach_the_worklist_and_old_values_stay_in_history(
        daemon: Daemon) -> None:
    study_uid = generate_uid()
    first = synth.make_dataset(synth.SynthSpec(rows=96, columns=96, patient_name="WRONG^PATIENT",
                                               patient_id="P-WRONG", accession_number="ACC-1"),
                               study_uid=study_uid)
    assert send(daemon.dicom_port, [first]) == [0]
    wait_for(lambda: _scored(daemon, study_uid), timeout=60)
    fixed = synth.make_dataset(synth.SynthSpec(rows=96, columns=96, patient_name="RIGHT^PATIENT",
                                               patient_id="P-RIGHT", accession_number="ACC-1B"),
                               study_uid=study_uid, sop_uid=first.SOPInstanceUID,
                               series_uid=first.SeriesInstanceUID)
    assert send(daemon.dicom_port, [fixed]) == [0]
    st = wait_for(lambda: _scored(daemon, study_uid, version=2), timeout=60)
    assert (st.patient_name, st.patient_id, st.accession_number) == (
        "RIGHT^PATIENT", "P-RIGHT", "ACC-1B")
    [row] = [p.row for p in daemon.pages.render_worklist()]
    assert (row.patient_name, row.accession_number) == ("RIGHT^PATIENT", "ACC-1B")
    [ev] = _events(daemon, st.id)
    assert ev.kind == "corrected"
    assert "'WRONG^PATIENT'" in ev.detail and "'P-WRONG'" in ev.detail and "'ACC-1'" in ev.detail
    page = daemon.pages.study_page(st.id)
    assert page is not None and "WRONG^PATIENT" in page  # autoescaped, in the study history


def test_a_study_that_keeps_failing_is_retried_with_backoff_then_shown_failed_while_others_flow(
        daemon_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from dicom_io.ids import uid_key
    from triage.service.overview import gather, render
    from triage.web.pages import load_rows

    d = daemon_factory(tmp_path / "var", **{"worker.max_attempts": 3,
                                            "worker.retry_backoff_s": 0.2})
    bad_uid, good_uid = generate_uid(), generate_uid()
    # A real failure while writing this study's overlays: a file sits where its directory goes.
    key = uid_key(bad_uid)
    blocker = d.worker.heatmap_dir / key[:2] / key
    blocker.parent.mkdir(parents=True)
    blocker.write_text("not a directory")
    assert send(d.dicom_port, [synth.make_dataset(SPEC, study_uid=bad_uid)]) == [0]
    assert send(d.dicom_port, [synth.make_dataset(SPEC, study_uid=good_uid)]) == [0]
    wait_for(lambda: _scored(d, good_uid), timeout=60)
    bad = wait_for(lambda: (st := _study(d, bad_uid)) is not None and st.state == db.FAILED and st,
                   timeout=60)
    assert bad.attempts == 3 and bad.failure and "could not write" in bad.failure
    assert [e.kind for e in _events(d, bad.id)] == ["failed"] * 3
    assert _latest(d, bad_uid) is None
    [row] = [r for r in load_rows(d.store) if r.study_id == bad.id]
    assert row.state == db.FAILED and row.tier == "unscored"
    assert row.reason is not None and row.reason.startswith("scoring failed: could not write")
    assert "Error" not in row.reason  # words, not an exception class
    st = gather(d.cfg)
    assert st["studies"][db.FAILED] == 1 and "failed 1" in render(st)
