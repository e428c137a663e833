"""Several daemons on one PostgreSQL database: recordings that race, claims, the leader lease.

Each "daemon" here is its own Store on its own engine (its own connections), as
two processes have; the server is a real PostgreSQL (tests/pg.py).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import func, select, update

from dicom_io.header import read_file_header
from dicom_io.scp import ReceivedInstance
from dicom_io.spool import Spool
from tests import synth
from triage.store import leases
from triage.store import schema as db
from triage.store.database import open_db
from triage.store.repository import Store
from triage.store.schema import Instance, Study

SPEC = synth.SynthSpec(rows=32, columns=32)


def _stores(url: str, n: int = 2) -> list[Store]:
    return [Store(open_db(url)) for _ in range(n)]


def _received(spool: Spool, tmp: Path, study_uid: str, k: int) -> ReceivedInstance:
    ds = synth.make_dataset(SPEC, study_uid=study_uid)
    path = synth.write(ds, tmp / f"{study_uid}_{k}.dcm")
    entry = spool.write(study_uid, str(ds.SOPInstanceUID), path.read_bytes())
    header = read_file_header(entry.path)
    assert header is not None
    return ReceivedInstance(header, header.transfer_syntax, "MODALITY1", entry)


def test_instances_of_one_study_recorded_at_once_by_two_daemons_are_all_kept(
        pg_url: str, tmp_path: Path) -> None:
    a, b = _stores(pg_url)
    spool = Spool(tmp_path / "spool", fsync=False)
    uids = [str(generate_uid()) for _ in range(6)]
    work = {store: [_received(spool, tmp_path, uid, k) for uid in uids for k in range(side, 8, 2)]
            for side, store in enumerate((a, b))}
    outcomes: list[str] = []
    start = threading.Barrier(2)

    def record(store: Store) -> None:
        start.wait()
        outcomes.extend(store.record_instance(i) for i in work[store])

    threads = [threading.Thread(target=record, args=(s,)) for s in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert outcomes.count("stored") == 6 * 8
    with a.read() as s:
        rows = s.execute(select(Study.study_uid, Study.n_instances)).all()
        assert sorted(rows) == sorted((u, 8) for u in uids)
        assert s.scalar(select(func.count()).select_from(Instance)) == 6 * 8


def test_the_same_instance_at_two_daemons_is_recorded_once(pg_url: str, tmp_path: Path) -> None:
    a, b = _stores(pg_url)
    inst = _received(Spool(tmp_path / "spool", fsync=False), tmp_path, str(generate_uid()), 0)
    assert sorted([a.record_instance(inst), b.record_instance(inst)]) == ["duplicate", "stored"]


def _complete(store: Store, n: int) -> list[int]:
    now = time.time()
    with store.write() as s:
        rows = [Study(study_uid=str(generate_uid()), state=db.COMPLETE, version=1, n_instances=1,
                      attempts=0, first_received_at=now, last_received_at=now,
                      completed_at=now + k) for k in range(n)]
        s.add_all(rows)
        s.flush()
        return [r.id for r in rows]


def test_two_daemons_claiming_at_once_never_take_the_same_study(pg_url: str) -> None:
    a, b = _stores(pg_url)
    ids = _complete(a, 40)
    got: dict[str, list[int]] = {"a": [], "b": []}
    start = threading.Barrier(2)

    def take(name: str, store: Store) -> None:
        start.wait()
        while batch := leases.claim(store, name, 3, 60.0):
            got[name] += batch

    threads = [threading.Thread(target=take, args=(n, s)) for n, s in (("a", a), ("b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not set(got["a"]) & set(got["b"])
    assert sorted(got["a"] + got["b"]) == ids
    with a.read() as s:
        holders = dict(s.execute(select(Study.id, Study.claimed_by)).all())
    assert all(holders[i] == "a" for i in got["a"]) and all(holders[i] == "b" for i in got["b"])


def test_an_expired_claim_is_taken_over_and_a_renewed_one_is_not(pg_url: str) -> None:
    a, b = _stores(pg_url)
    kept, lapsed = _complete(a, 2)
    assert leases.claim(a, "dead", 5, 60.0) == [kept, lapsed]
    assert leases.claim(b, "b", 5, 60.0) == []
    with a.write() as s:  # the dead daemon's claim on one study ran out
        s.execute(update(Study).where(Study.id == lapsed).values(claimed_until=0.0))
    assert leases.claim(b, "b", 5, 60.0) == [lapsed]
    assert leases.renew(a, "dead", [kept, lapsed], 60.0) == [kept]  # it lost the lapsed one
    leases.release(a, "dead", [kept])
    assert leases.claim(b, "b", 5, 60.0) == [kept]


def test_one_leader_at_a_time_and_another_takes_over_when_its_lease_runs_out(pg_url: str) -> None:
    a, b = _stores(pg_url)
    la, lb = leases.LeaderLease(a, "a", 2.0), leases.LeaderLease(b, "b", 2.0)
    assert la.tick() and la.held
    assert not lb.tick() and not lb.held
    assert la.tick()  # renewing
    # "a" stops renewing (killed): once its lease has run out, "b" takes it.
    deadline = time.monotonic() + 30
    while not lb.tick():
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert lb.held and not la.held
    assert not la.tick()
    assert leases.leader_holder(a) is not None and leases.leader_holder(a)[0] == "b"  # type: ignore[index]
    lb.release()
    assert la.tick()


@pytest.mark.parametrize("n", [4])
def test_leader_lease_contended_by_many_has_one_holder(pg_url: str, n: int) -> None:
    stores = _stores(pg_url, n)
    lease = [leases.LeaderLease(s, f"d{k}", 30.0) for k, s in enumerate(stores)]
    start = threading.Barrier(n)
    won: list[bool] = [False] * n

    def tick(k: int) -> None:
        start.wait()
        won[k] = lease[k].tick()

    threads = [threading.Thread(target=tick, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert won.count(True) == 1


def test_a_late_instance_racing_the_leaders_purge_of_its_study_is_kept(
        pg_url: str, tmp_path: Path) -> None:
    """The purge locks the studies it deletes; a recording of a late instance of one of them
    waits, finds the row gone, and records the instance into a new study: acknowledged,
    on disk and in the database."""
    from triage.store import retention

    a, b = _stores(pg_url)
    spool = Spool(tmp_path / "spool", fsync=False)
    uid = str(generate_uid())
    assert a.record_instance(_received(spool, tmp_path, uid, 0)) == "stored"
    with a.write() as s:
        s.execute(update(Study).where(Study.study_uid == uid)
                  .values(state=db.SCORED, reported_at=1.0, reported_by="test"))
    late = _received(spool, tmp_path, uid, 1)
    purging, recorded = threading.Event(), []

    def record() -> None:
        purging.wait(30)
        recorded.append(b.record_instance(late))

    t = threading.Thread(target=record)
    t.start()
    with a.write() as s:  # the purge's transaction, held open while b tries to record
        ids = retention.purgeable(s, 10.0, 50)
        assert len(ids) == 1
        purging.set()
        time.sleep(1.0)  # b is now waiting on the study's row lock
        assert t.is_alive() and not recorded
        retention._delete_rows(s, ids)
    t.join(60)
    assert recorded == ["stored"]
    with a.read() as s:
        study = s.scalars(select(Study).where(Study.study_uid == uid)).one()
        assert study.state == db.RECEIVING and study.n_instances == 1
        (inst,) = s.scalars(select(Instance).where(Instance.study_id == study.id)).all()
        assert inst.sop_instance_uid == late.header.sop_instance_uid
    assert late.entry.path.exists()

