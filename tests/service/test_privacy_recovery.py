"""Logs never carry patient identifiers; a crash between rename and commit loses nothing."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from sqlalchemy import select

from dicom_io.spool import Spool
from tests import synth
from tests.conftest import send, storescu, wait_for
from triage.store import schema as db
from triage.store.database import open_db
from triage.store.repository import Store
from triage.store.schema import Instance


def test_logs_carry_no_patient_name_or_id(daemon_factory, tmp_path: Path,  # type: ignore[no-untyped-def]
                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="triage")
    caplog.set_level(logging.DEBUG, logger="dicom_io")
    d = daemon_factory()
    spec = synth.SynthSpec(rows=160, columns=160, patient_name="ZEBEDEE^QUIXOTE",
                           patient_id="PID-987654", accession_number="ACC-555")
    good = synth.make_dataset(spec)
    bad = synth.make_dataset(spec)
    del bad.PixelData
    assert send(d.dicom_port, [good, bad])[0] == 0
    p = synth.write(synth.make_dataset(spec), tmp_path / "x.dcm")
    assert storescu(d.dicom_port, p).returncode == 0
    wait_for(lambda: d.store.counts()[db.SCORED] + d.store.counts()[db.UNSCORED] == 2, timeout=90)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "C-STORE stored" in text and "refused" in text  # the logs do say what happened
    for secret in ("ZEBEDEE", "QUIXOTE", "PID-987654", good.StudyInstanceUID, good.SOPInstanceUID):
        assert secret not in text


def test_reconcile_recovers_a_durable_file_the_database_never_recorded(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    ds = synth.make_dataset(synth.SynthSpec(rows=32, columns=32))
    path = synth.write(ds, tmp_path / "x.dcm")
    entry = spool.write(ds.StudyInstanceUID, ds.SOPInstanceUID, path.read_bytes())
    store = Store(open_db(tmp_path / "t.sqlite"))  # the crash: file renamed, row never committed
    assert store.reconcile(spool) == 1
    assert store.reconcile(spool) == 0  # idempotent
    with store.read() as s:
        [inst] = list(s.scalars(select(Instance)))
    assert (inst.relpath, inst.sha256) == (entry.relpath, entry.sha256)
    assert store.counts()[db.RECEIVING] == 1
