"""The listener against real peers on loopback: pynetdicom and DCMTK as senders."""

from __future__ import annotations

import hashlib
import subprocess
import threading
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select

from dicom_io import store_status as status
from tests import synth
from tests.conftest import scu, send, storescu, wait_for
from tests.dicom_bytes import dataset_body
from triage.service.daemon import Daemon
from triage.store import schema as db
from triage.store.schema import Instance, Rejection, Replacement, Study


def _studies(d: Daemon) -> list[Study]:
    with d.store.read() as s:
        return list(s.scalars(select(Study)))


def _instances(d: Daemon) -> list[Instance]:
    with d.store.read() as s:
        return list(s.scalars(select(Instance)))


def test_c_echo_answers_pynetdicom_and_echoscu(daemon: Daemon) -> None:
    assoc = scu().associate("127.0.0.1", daemon.dicom_port, ae_title="TRIAGE")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    assoc.release()
    r = subprocess.run(["echoscu", "-aet", "ECHOSCU", "-aec", "TRIAGE", "127.0.0.1",
                        str(daemon.dicom_port)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr


def test_pynetdicom_store_is_durable_byte_for_byte_and_recorded(daemon: Daemon, tmp_path: Path) -> None:
    ds = synth.make_dataset(synth.SynthSpec(rows=64, columns=64))
    path = synth.write(ds, tmp_path / "a.dcm")
    assert send(daemon.dicom_port, [ds]) == [status.SUCCESS]
    [inst] = _instances(daemon)
    stored = daemon.spool.root / inst.relpath
    assert dataset_body(stored) == dataset_body(path)
    assert inst.sha256 == hashlib.sha256(stored.read_bytes()).hexdigest()
    assert dcmread(stored).SOPInstanceUID == ds.SOPInstanceUID
    [study] = _studies(daemon)
    assert (study.study_uid, study.n_instances, study.accession_number) == (
        ds.StudyInstanceUID, 1, "ACC0001")


def test_storescu_study_is_grouped_then_completes_after_quiet_period(daemon: Daemon, tmp_path: Path) -> None:
    paths = synth.write_study(tmp_path / "s", n_images=3, spec=synth.SynthSpec(rows=64, columns=64))
    r = storescu(daemon.dicom_port, *paths)
    assert r.returncode == 0, r.stderr
    for p in paths:
        inst = next(i for i in _instances(daemon) if i.sop_instance_uid == dcmread(p).SOPInstanceUID)
        assert dataset_body(daemon.spool.root / inst.relpath) == dataset_body(p)
    [study] = _studies(daemon)
    assert study.n_instances == 3
    wait_for(lambda: _studies(daemon)[0].state == db.COMPLETE)


def test_late_instance_reopens_a_complete_study_with_a_new_version(daemon: Daemon) -> None:
    study_uid = generate_uid()
    spec = synth.SynthSpec(rows=32, columns=32)
    assert send(daemon.dicom_port, [synth.make_dataset(spec, study_uid=study_uid)]) == [0]
    wait_for(lambda: _studies(daemon)[0].state == db.COMPLETE)
    assert send(daemon.dicom_port, [synth.make_dataset(spec, study_uid=study_uid)]) == [0]
    [study] = _studies(daemon)
    assert (study.state, study.version, study.n_instances) == (db.RECEIVING, 2, 2)
    wait_for(lambda: _studies(daemon)[0].state == db.COMPLETE)


@pytest.mark.parametrize("calling, called", [("INTRUDER", "TRIAGE"), ("TRIAGE_SCU", "OTHER")])
def test_unknown_callers_and_wrong_called_titles_are_rejected(daemon: Daemon, calling: str, called: str) -> None:
    assoc = scu(calling).associate("127.0.0.1", daemon.dicom_port, ae_title=called)
    assert assoc.is_rejected
    r = subprocess.run(["echoscu", "-aet", calling, "-aec", called, "127.0.0.1",
                        str(daemon.dicom_port)], capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "Rejected" in r.stderr


def test_any_caller_only_when_configured(daemon_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    d = daemon_factory(tmp_path / "open", **{"dicom.accept_any_calling_ae": True})
    assoc = scu("WHOEVER").associate("127.0.0.1", d.dicom_port, ae_title="TRIAGE")
    assert assoc.is_established
    assoc.release()


def _broken(kind: str):  # type: ignore[no-untyped-def]
    ds = synth.make_dataset(synth.SynthSpec(rows=32, columns=32))
    if kind == "no-pixels":
        del ds.PixelData
    elif kind == "short-pixels":
        ds.PixelData = ds.PixelData[:64]
    elif kind == "no-study-uid":
        del ds.StudyInstanceUID
    elif kind == "bad-series-uid":
        ds.SeriesInstanceUID = "1.2.3.abc"
    return ds


@pytest.mark.parametrize("kind, code", [
    ("no-pixels", status.DATASET_MISMATCH),
    ("short-pixels", status.DATASET_MISMATCH),
    ("no-study-uid", status.BAD_UID),
    ("bad-series-uid", status.BAD_UID),
])
def test_defective_instances_get_specific_statuses_and_nothing_is_stored(
        daemon: Daemon, kind: str, code: int) -> None:
    good = synth.make_dataset(synth.SynthSpec(rows=32, columns=32))
    assert send(daemon.dicom_port, [_broken(kind), good]) == [code, status.SUCCESS]
    assert [i.sop_instance_uid for i in _instances(daemon)] == [good.SOPInstanceUID]
    with daemon.store.read() as s:
        [rej] = list(s.scalars(select(Rejection)))
    assert rej.status == code and rej.reason and rej.calling_ae == "TRIAGE_SCU"


def test_unparseable_data_set_gets_c210(daemon: Daemon, tmp_path: Path) -> None:
    from pynetdicom import _config

    ds = synth.make_dataset(synth.SynthSpec(rows=32, columns=32))
    path = synth.write(ds, tmp_path / "x.dcm")
    raw = path.read_bytes()
    body_at = len(raw) - len(dataset_body(raw))
    # A valid element, then an element whose explicit VR is two NUL bytes.
    path.write_bytes(raw[:body_at] + b"\x08\x00\x16\x00UI\x04\x001.2\x00" + b"\x10\x00\x10\x00\x00\x00\xff\xff")
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's bytes as they are
    try:
        statuses = send(daemon.dicom_port, [path])
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
    # pydicom parses leniently, so garbage may surface as unparseable (C210) or
    # as UIDs it could not find (C220); either way a "cannot understand" error.
    assert statuses in ([status.UNREADABLE], [status.BAD_UID])
    assert _instances(daemon) == []


def test_low_disk_space_is_refused_before_writing(daemon_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    d = daemon_factory(tmp_path / "full", **{"storage.min_free_mb": 2**40})
    ds = synth.make_dataset(synth.SynthSpec(rows=32, columns=32))
    assert send(d.dicom_port, [ds]) == [status.OUT_OF_RESOURCES]
    assert list(d.spool.files()) == []
    assert scu().associate("127.0.0.1", d.dicom_port, ae_title="TRIAGE").send_c_echo().Status == 0


def test_duplicates_identical_is_idempotent_changed_is_recorded(daemon: Daemon) -> None:
    ds = synth.make_dataset(synth.SynthSpec(rows=32, columns=32))
    assert send(daemon.dicom_port, [ds, ds]) == [0, 0]
    assert len(_instances(daemon)) == 1
    first = _instances(daemon)[0]
    ds.StudyDescription = "CHEST PA CORRECTED"
    assert send(daemon.dicom_port, [ds]) == [0]
    [inst] = _instances(daemon)
    assert inst.sha256 != first.sha256
    with daemon.store.read() as s:
        [rep] = list(s.scalars(select(Replacement)))
    assert (rep.old_sha256, rep.new_sha256) == (first.sha256, inst.sha256)
    assert (daemon.spool.root / rep.old_relpath).exists()  # acknowledged data is never deleted
    assert _studies(daemon)[0].n_instances == 1


def test_concurrent_associations_lose_nothing(daemon: Daemon) -> None:
    n_assoc, per = 10, 5
    sent: dict[str, list[int]] = {}
    uids: list[str] = []

    def worker(k: int) -> None:
        dss = [synth.make_dataset(synth.SynthSpec(rows=64, columns=64, seed=k * per + i))
               for i in range(per)]
        uids.extend(d.SOPInstanceUID for d in dss)
        sent[str(k)] = send(daemon.dicom_port, dss)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(n_assoc)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(v == [0] * per for v in sent.values()) and len(sent) == n_assoc
    stored = {i.sop_instance_uid: i for i in _instances(daemon)}
    assert set(stored) == set(uids)
    for inst in stored.values():
        data = (daemon.spool.root / inst.relpath).read_bytes()
        assert hashlib.sha256(data).hexdigest() == inst.sha256
    assert len(_studies(daemon)) == n_assoc * per
