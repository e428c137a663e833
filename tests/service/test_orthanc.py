"""Orthanc as the PACS: results land in the scored study, queryable through Orthanc's REST API,
and a kill -9 of the real daemon in the middle of a burst of sends loses nothing and stores
nothing twice."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from tests import synth
from tests.conftest import free_port, scu, send, serve_config, wait_for
from tests.peers import Orthanc
from tests.service.test_outbox import SR_CLASS, all_sent, deliveries, destination
from triage.service.daemon import Daemon

SPEC = synth.SynthSpec(rows=160, columns=160, patient_name="ORTHANC^TEST", patient_id="OT-1",
                       accession_number="ACC-OT1")


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    """A running Orthanc (AE title ORTHANC) on free ports."""
    peer = Orthanc(tmp_path / "orthanc").start()
    yield peer
    peer.stop()


def test_sr_and_overlays_are_in_the_scored_study_in_orthanc(
        daemon_factory: Callable[..., Daemon], orthanc: Orthanc, tmp_path: Path) -> None:
    d = daemon_factory(**destination(orthanc.dicom_port, ae_title="ORTHANC"))
    paths = synth.write_study(tmp_path / "study", n_images=2, spec=SPEC)
    # the modality sends its images to the PACS and to triage, as a site would route them
    for port, calling in ((orthanc.dicom_port, "STORESCU"), (d.dicom_port, "STORESCU")):
        r = subprocess.run(["storescu", "-aet", calling, "-aec",
                            "ORTHANC" if port == orthanc.dicom_port else "TRIAGE", "127.0.0.1",
                            str(port), *map(str, paths)], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0, r.stderr
    wait_for(lambda: all_sent(d, 3), timeout=120)
    study_uid = str(dcmread(paths[0]).StudyInstanceUID)
    [study] = orthanc.get("/studies")
    tags = orthanc.get(f"/studies/{study}")["MainDicomTags"]
    assert tags["StudyInstanceUID"] == study_uid and tags["AccessionNumber"] == "ACC-OT1"
    series = {s["MainDicomTags"]["Modality"]: s for s in orthanc.get(f"/studies/{study}/series")}
    assert set(series) == {"DX", "SR", "OT"}
    assert len(series["DX"]["Instances"]) == 2 and len(series["OT"]["Instances"]) == 2
    assert "not for diagnosis" in series["SR"]["MainDicomTags"]["SeriesDescription"]
    [sr_id] = series["SR"]["Instances"]
    sr = orthanc.get(f"/instances/{sr_id}/simplified-tags")
    assert sr["SOPClassUID"] == SR_CLASS and sr["CompletionFlag"] == "COMPLETE"
    sources = {str(dcmread(p).SOPInstanceUID) for p in paths}
    assert set(orthanc.sop_uids()) == {o.sop_instance_uid for _, o in deliveries(d)} | sources
    for sc_id in series["OT"]["Instances"]:
        png = orthanc.get_bytes(f"/instances/{sc_id}/preview")
        assert png[:8] == b"\x89PNG\r\n\x1a\n"  # Orthanc decodes and renders the overlay
        assert orthanc.get(f"/instances/{sc_id}/simplified-tags")["BurnedInAnnotation"] == "YES"


def _db_rows(db: Path, sql: str) -> list[tuple]:  # type: ignore[type-arg]
    try:
        with sqlite3.connect(db, timeout=5) as c:
            return list(c.execute(sql).fetchall())
    except sqlite3.Error:
        return []


def test_kill_9_in_the_middle_of_sends_loses_nothing_and_stores_nothing_twice(
        tmp_path: Path) -> None:
    pacs = Orthanc(tmp_path / "orthanc")  # down at first: the results queue up
    port, data = free_port(), tmp_path / "var"
    cfg = serve_config(tmp_path / "c.toml", data, port, (
        "\n[results]\nretry_initial_s = 0.2\nretry_max_s = 0.5\npoll_interval_s = 0.2\n"
        "max_attempts = 1000\n"
        f'[[results.destinations]]\nae_title = "ORTHANC"\nhost = "127.0.0.1"\n'
        f"port = {pacs.dicom_port}\n"))
    log = (tmp_path / "serve.log").open("ab")
    db = data / "triage.sqlite"

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "triage", "serve", "--config", str(cfg)],
                                stdout=log, stderr=subprocess.STDOUT)

    def echo() -> bool:
        a = scu().associate("127.0.0.1", port, ae_title="TRIAGE")
        ok = a.is_established and a.send_c_echo().Status == 0
        if a.is_established:
            a.release()
        return bool(ok)

    n_studies = 6
    proc = start()
    try:
        wait_for(echo, timeout=90)
        for i in range(n_studies):
            study = generate_uid()
            assert send(port, [synth.make_dataset(synth.SynthSpec(rows=160, columns=160, seed=i),
                                                  study_uid=study) for _ in range(2)]) == [0, 0]
        n_objects = n_studies * 3  # an SR and two overlays per study
        wait_for(lambda: _db_rows(db, "SELECT count(*) FROM outbox WHERE attempts >= 1")
                 == [(n_objects,)], timeout=240)
        pacs.start()
        up = time.time()
        # Kill when some objects are sent and others are in flight: their attempt is
        # recorded (after the PACS came up) but no reply is.
        in_flight_sql = (f"SELECT count(*) FROM outbox WHERE state = 'pending' AND "
                         f"last_attempt_at >= {up}")
        wait_for(lambda: _db_rows(db, "SELECT count(*) FROM outbox WHERE state = 'sent'")[0][0] >= 1
                 and _db_rows(db, in_flight_sql)[0][0] >= 1, timeout=60, interval=0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        before = dict(_db_rows(db, "SELECT id, attempts FROM outbox"))
        interrupted = {i for (i,) in _db_rows(db, "SELECT id FROM outbox WHERE state = 'pending' "
                                                  f"AND last_attempt_at >= {up}")}
        assert interrupted, "the kill should have caught sends in flight"
        proc = start()
        wait_for(lambda: _db_rows(db, "SELECT count(*) FROM outbox WHERE state = 'sent'")
                 == [(n_objects,)], timeout=240)
        stored = pacs.sop_uids()
        planned = {uid for (uid,) in _db_rows(db, "SELECT sop_instance_uid FROM result_objects")}
        assert len(planned) == n_objects
        # Everything arrived, and nothing under a second UID: Orthanc holds exactly the
        # planned instances (it keeps one instance per SOP Instance UID, so a resend of the
        # same UID replaces nothing and adds nothing).
        assert set(stored) == planned and len(pacs.get("/instances")) == n_objects
        srs = [s for s in pacs.get("/series") if pacs.get(f"/series/{s}")["MainDicomTags"]
               ["Modality"] == "SR"]
        assert len(srs) == n_studies  # one SR per result: a resend was not a new document
        after = dict(_db_rows(db, "SELECT id, attempts FROM outbox"))
        assert all(after[i] > before[i] for i in interrupted)  # those were sent again
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        pacs.stop()

