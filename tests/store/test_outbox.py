"""The outbox's bookkeeping on a real migrated SQLite: planning, attempts, dead letters, retry."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select

from triage.config import ResultsConfig, from_dict
from triage.service.sender import OutboxSender
from triage.store import outbox
from triage.store import schema as db
from triage.store.database import open_db
from triage.store.repository import Store
from triage.store.schema import Delivery, ImageResult, Instance, Result, ResultObject, Study

WANTS = {db.SR: ["PACS", "ARCHIVE"], db.OVERLAY: ["PACS"]}


def _store(tmp_path: Path) -> Store:
    return Store(open_db(tmp_path / "t.sqlite"))


def _result(store: Store, wants: dict[str, list[str]] = WANTS) -> list[ResultObject]:
    """Record a study, three instances, a result with three image rows (two with a heatmap),
    and plan its objects in the same transaction, as the worker does."""
    with store.write() as s:
        study = Study(study_uid="1.2.3", state=db.SCORED, version=1, n_instances=3,
                      first_received_at=1.0, last_received_at=1.0)
        s.add(study)
        s.flush()
        res = Result(study_id=study.id, version=1, state=db.SCORED, probability=0.5, tier="routine",
                     model_name="m", model_sha256="0" * 64, thresholds="{}", timings="{}",
                     created_at=1.0)
        instances = [Instance(study=study, sop_instance_uid=f"1.2.3.{i}", sop_class_uid="1.2",
                              series_uid="1.2.3.9", transfer_syntax="1.2", relpath=f"x{i}",
                              sha256="f", size=1, received_at=1.0) for i in range(3)]
        s.add_all([res, *instances])
        s.flush()
        images = [ImageResult(result=res, instance_id=inst.id, probability=0.5,
                              heatmap_path=f"h{i}.png" if i < 2 else None, scored_at=1.0)
                  for i, inst in enumerate(instances)]
        s.add_all(images)
        return outbox.plan(s, res, images, wants, now=10.0)


def test_plan_fixes_unique_uids_and_one_row_per_destination(tmp_path: Path) -> None:
    store = _store(tmp_path)
    objects = _result(store)
    kinds = sorted(o.kind for o in objects)
    assert kinds == [db.OVERLAY, db.OVERLAY, db.SR]  # overlays only for images with a heatmap
    with store.read() as s:
        rows = list(s.scalars(select(ResultObject)))
        uids = [o.sop_instance_uid for o in rows]
        assert len(set(uids)) == 3 and all(u.startswith("2.25.") for u in uids)
        sr = next(o for o in rows if o.kind == db.SR)
        overlays = [o for o in rows if o.kind == db.OVERLAY]
        assert (sr.series_number, sr.instance_number) == (9001, 1)
        assert {o.series_uid for o in overlays} != {sr.series_uid} and len({
            o.series_uid for o in overlays}) == 1
        assert sorted(o.instance_number for o in overlays) == [1, 2]
        dests = sorted((d.object.kind, d.destination, d.state, d.attempts)
                       for d in s.scalars(select(Delivery)))
    assert dests == [(db.OVERLAY, "PACS", db.PENDING, 0)] * 2 + [
        (db.SR, "ARCHIVE", db.PENDING, 0), (db.SR, "PACS", db.PENDING, 0)]


def test_nothing_wanted_plans_nothing(tmp_path: Path) -> None:
    store = _store(tmp_path)
    assert _result(store, wants={db.SR: [], db.OVERLAY: []}) == []


def test_attempts_back_off_then_dead_letter_then_retry(tmp_path: Path) -> None:
    store = _store(tmp_path)
    _result(store, wants={db.SR: ["PACS"]})
    [item] = outbox.due(store, now=10.0, limit=10)
    assert outbox.due(store, now=9.0, limit=10) == []  # not due before it was planned
    outbox.begin_attempt(store, [item.delivery_id], 10.0, lambda n: 5.0 * n)
    assert outbox.due(store, now=14.9, limit=10) == []  # backing off
    assert outbox.record_failure(store, [item.delivery_id], "refused", None, max_attempts=2) == []
    outbox.begin_attempt(store, [item.delivery_id], 15.0, lambda n: 5.0 * n)
    assert outbox.next_due_at(store) == 25.0
    assert outbox.record_failure(store, [item.delivery_id], "refused 1.2.3", 0xA700, 2) == [
        item.delivery_id]
    assert outbox.due(store, now=1e9, limit=10) == []  # a dead letter is not retried by itself
    assert outbox.dead_letter_count(store) == 1
    assert outbox.totals(store) == {"PACS": {db.PENDING: 0, db.SENT: 0, db.DEAD: 1}}
    [dead] = outbox.dead_letters(store)
    assert (dead.kind, dead.attempts, dead.last_error) == (db.SR, 2, "refused 1.2.3")
    assert outbox.retry(store, now=30.0, destination="OTHER") == 0
    assert outbox.retry(store, now=30.0) == 1
    [again] = outbox.due(store, now=30.0, limit=10)
    assert (again.delivery_id, again.attempts) == (item.delivery_id, 0)
    outbox.record_sent(store, again.delivery_id, 0, 31.0)
    assert outbox.totals(store)["PACS"][db.SENT] == 1 and outbox.next_due_at(store) is None


def test_rows_for_a_destination_no_longer_configured_become_dead_letters(tmp_path: Path) -> None:
    store = _store(tmp_path)
    _result(store, wants={db.SR: ["GONE"]})
    cfg: ResultsConfig = from_dict({"results": {"destinations": [
        {"ae_title": "PACS", "host": "127.0.0.1", "port": 4242}]}}).results
    sender = OutboxSender(cfg, store, tmp_path, clock=lambda: 100.0)
    assert sender.run_once() == 0
    [dead] = outbox.dead_letters(store)
    assert dead.destination == "GONE" and "no longer configured" in (dead.last_error or "")


def test_an_object_that_cannot_be_built_ends_in_the_dead_letter_without_uids(
        tmp_path: Path) -> None:
    store = _store(tmp_path)
    _result(store, wants={db.SR: ["PACS"]})  # its source files are not in any spool
    cfg = from_dict({"results": {"max_attempts": 2, "retry_initial_s": 1, "destinations": [
        {"ae_title": "PACS", "host": "127.0.0.1", "port": 9, "name": "PACS"}]}}).results
    now = [100.0]
    sender = OutboxSender(cfg, store, tmp_path, clock=lambda: now[0])
    assert sender.run_once() == 1
    assert outbox.dead_letter_count(store) == 0 and outbox.due(store, now[0], 10) == []
    now[0] += 1.0
    assert sender.run_once() == 1
    [dead] = outbox.dead_letters(store)
    assert dead.attempts == 2 and "cannot build the sr" in (dead.last_error or "")
    assert "1.2.3" not in (dead.last_error or "")


def test_scrub_hashes_anything_shaped_like_a_uid() -> None:
    from triage.service.sender import scrub

    text = scrub("instance 1.2.826.0.1.3680043.8.498.1 refused; port 4242; version 0.28.2")
    assert "1.2.826" not in text and "uid:" in text and "0.28.2" in text and "4242" in text
