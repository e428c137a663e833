"""Results go back to the PACS: real daemon, DCMTK storescp as the destination, dciodvfy on
everything it receives, a destination that is down and then up, dead letters and their retry."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select

from dicom_io.scu import SendError, outgoing, send_files, tls_client
from tests import synth
from tests.certs import make_certs
from tests.conftest import model_for_tests, send, storescu, wait_for
from tests.dicom_tools import dciodvfy
from tests.peers import StoreScp
from triage.service.daemon import Daemon
from triage.store import schema as db
from triage.store.schema import Delivery, Result, ResultObject, Study

SPEC = synth.SynthSpec(rows=160, columns=160, patient_name="DOE^JANE", patient_id="P-77",
                       accession_number="ACC-77")
SR_CLASS, SC_CLASS = "1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.7"


def destination(port: int, **kw: Any) -> dict[str, Any]:
    """Config overrides sending SR and overlays to a destination on ``port`` with fast retries."""
    return {"results.destinations": [{"ae_title": "PACS", "host": "127.0.0.1", "port": port,
                                      **kw}],
            "results.retry_initial_s": 0.2, "results.retry_max_s": 1.0,
            "results.poll_interval_s": 0.2, "results.timeout_s": 10.0}


def deliveries(d: Daemon) -> list[tuple[Delivery, ResultObject]]:
    """Every outbox row with its object."""
    with d.store.read() as s:
        return list(s.execute(select(Delivery, ResultObject)
                              .join(ResultObject, ResultObject.id == Delivery.object_id)
                              .order_by(Delivery.id)).tuples())


def all_sent(d: Daemon, n: int) -> bool:
    """True when ``n`` outbox rows exist and every one is sent."""
    rows = deliveries(d)
    return len(rows) == n and all(dl.state == db.SENT for dl, _ in rows)


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[StoreScp]:
    """A running DCMTK storescp (AE title PACS) on a free port."""
    peer = StoreScp(tmp_path / "storescp").start()
    yield peer
    peer.stop()


def test_result_arrives_as_a_valid_sr_and_overlays_once_each(
        daemon_factory: Callable[..., Daemon], storescp: StoreScp, tmp_path: Path) -> None:
    d = daemon_factory(**destination(storescp.port))
    paths = synth.write_study(tmp_path / "study", n_images=2, spec=SPEC)
    assert storescu(d.dicom_port, *paths).returncode == 0
    sources = {str(dcmread(p).SOPInstanceUID): dcmread(p) for p in paths}
    wait_for(lambda: all_sent(d, 3), timeout=120)
    got = storescp.received()
    objects = {o.sop_instance_uid: o for _, o in deliveries(d)}
    assert got == {uid: 1 for uid in objects}  # each object once, nothing else
    by_class: dict[str, list[Any]] = {SR_CLASS: [], SC_CLASS: []}
    for f in storescp.files():
        errors, out = dciodvfy(f)
        assert errors == [], out
        ds = dcmread(f)
        by_class[ds.SOPClassUID].append(ds)
        study = next(iter(sources.values()))
        assert ds.StudyInstanceUID == study.StudyInstanceUID  # in the scored study
        assert (str(ds.PatientName), ds.PatientID, ds.AccessionNumber) == ("DOE^JANE", "P-77",
                                                                           "ACC-77")
        assert ds.SeriesInstanceUID not in {s.SeriesInstanceUID for s in sources.values()}
    [report] = by_class[SR_CLASS]
    assert len(by_class[SC_CLASS]) == 2
    evidence = report.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    assert {i.ReferencedSOPInstanceUID for s in evidence for i in s.ReferencedSOPSequence} == \
        set(sources)
    assert {sc.SourceImageSequence[0].ReferencedSOPInstanceUID for sc in by_class[SC_CLASS]} == \
        set(sources)
    with d.store.read() as s:
        res = s.scalar(select(Result))
    assert res.thresholds_source.startswith("model card ")
    study_group = hd.sr.Comprehensive3DSR.from_dataset(report).content \
        .get_image_measurement_groups()[0]
    texts = [i.value for i in study_group[0].ContentSequence if i.ValueType == "TEXT"]
    assert f"thresholds source: {res.thresholds_source}" in texts
    assert res.tier in texts


def test_no_destination_configured_means_nothing_is_planned_or_sent(
        daemon_factory: Callable[..., Daemon], storescp: StoreScp) -> None:
    d = daemon_factory()
    ds = synth.make_dataset(SPEC)
    assert send(d.dicom_port, [ds]) == [0]
    wait_for(lambda: d.store.counts()[db.SCORED] == 1, timeout=60)
    with d.store.read() as s:
        assert s.scalar(select(ResultObject.id)) is None and s.scalar(select(Delivery.id)) is None
    assert storescp.files() == []


def test_sr_only_destination_gets_no_overlays(daemon_factory: Callable[..., Daemon],
                                              storescp: StoreScp) -> None:
    d = daemon_factory(**destination(storescp.port, send=["sr"]))
    assert send(d.dicom_port, [synth.make_dataset(SPEC)]) == [0]
    wait_for(lambda: all_sent(d, 1), timeout=60)
    [f] = wait_for(storescp.files, timeout=10)
    assert dcmread(f).SOPClassUID == SR_CLASS


def test_destination_down_then_up_gets_everything_once(
        daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    peer = StoreScp(tmp_path / "late")  # not started: nothing listens on its port yet
    d = daemon_factory(**destination(peer.port))
    study_uid = generate_uid()
    assert send(d.dicom_port, [synth.make_dataset(SPEC, study_uid=study_uid),
                               synth.make_dataset(SPEC, study_uid=study_uid)]) == [0, 0]
    assert send(d.dicom_port, [synth.make_dataset(SPEC)]) == [0]  # a second study
    # every object has failed at least twice against the closed port, and none is dead
    wait_for(lambda: (rows := deliveries(d)) and len(rows) == 5 and all(
        dl.attempts >= 2 and dl.state == db.PENDING and dl.last_error for dl, _ in rows),
        timeout=120)
    peer.start()
    try:
        wait_for(lambda: all_sent(d, 5), timeout=60)
        assert peer.received() == {o.sop_instance_uid: 1 for _, o in deliveries(d)}
    finally:
        peer.stop()


def _status(d: Daemon) -> dict[str, Any]:
    cfg = Path(d.cfg.storage.root) / "status.toml"
    cfg.write_text(f'[storage]\ndata_dir = "{d.cfg.storage.root}"\n'
                   f'[model]\npath = "{model_for_tests()}"\n')
    r = subprocess.run([sys.executable, "-m", "triage", "status", "--config", str(cfg), "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return dict(json.loads(r.stdout))


def _outbox_cli(d: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    cfg = Path(d.cfg.storage.root) / "status.toml"
    return subprocess.run([sys.executable, "-m", "triage", "outbox", *args, "--config", str(cfg)],
                          capture_output=True, text=True, timeout=120)


def test_dead_letter_is_shown_then_retried_and_delivered(
        daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    peer = StoreScp(tmp_path / "dead")
    d = daemon_factory(**destination(peer.port, send=["sr"]), **{"results.max_attempts": 2})
    assert send(d.dicom_port, [synth.make_dataset(SPEC)]) == [0]
    wait_for(lambda: (rows := deliveries(d)) and rows[0][0].state == db.DEAD, timeout=60)
    [(dl, _)] = deliveries(d)
    assert dl.attempts == 2 and "association" in (dl.last_error or "")
    st = _status(d)
    assert st["outbox"]["dead"] == 1 and st["outbox"]["pending"] == 0
    assert st["outbox"]["destinations"][f"PACS@127.0.0.1:{peer.port}"]["dead"] == 1
    listed = _outbox_cli(d, "list")
    assert listed.returncode == 0 and "dead" in listed.stdout and "sr" in listed.stdout, listed
    d.pages.render_worklist()
    page = d.pages.worklist_html.read_text()
    assert 'data-testid="outbox-dead"' in page and "1 result object" in page
    peer.start()
    try:
        r = _outbox_cli(d, "retry")
        assert r.returncode == 0 and "1" in r.stdout, r.stderr
        wait_for(lambda: all_sent(d, 1), timeout=60)
        assert sum(peer.received().values()) == 1
    finally:
        peer.stop()
    assert _status(d)["outbox"]["dead"] == 0
    d.pages.render_worklist()
    assert 'data-testid="outbox-dead"' not in d.pages.worklist_html.read_text()


def test_a_later_version_sends_a_new_sr_that_references_the_first(
        daemon_factory: Callable[..., Daemon], storescp: StoreScp) -> None:
    d = daemon_factory(**destination(storescp.port, send=["sr"]))
    study_uid = generate_uid()
    assert send(d.dicom_port, [synth.make_dataset(SPEC, study_uid=study_uid)]) == [0]
    wait_for(lambda: all_sent(d, 1), timeout=60)
    assert send(d.dicom_port, [synth.make_dataset(SPEC, study_uid=study_uid)]) == [0]
    wait_for(lambda: all_sent(d, 2), timeout=90)
    reports = sorted((dcmread(f) for f in storescp.files()), key=lambda ds: int(ds.SeriesNumber))
    first, second = reports
    assert (int(first.SeriesNumber), int(second.SeriesNumber)) == (9001, 9002)
    [pred] = second.PredecessorDocumentsSequence
    ref = pred.ReferencedSeriesSequence[0]
    assert ref.SeriesInstanceUID == first.SeriesInstanceUID
    assert ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == first.SOPInstanceUID
    assert "PredecessorDocumentsSequence" not in first
    with d.store.read() as s:
        assert s.scalar(select(Study.version)) == 2


def test_outbox_log_lines_carry_no_uids_or_patient_data(
        daemon_factory: Callable[..., Daemon], storescp: StoreScp,
        caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from triage.cli.common import setup_logging

    # As `triage serve` with logging.level = "DEBUG" configures it: every logger at DEBUG
    # except the libraries setup_logging keeps quiet.
    root = logging.getLogger()
    before = {n: logging.getLogger(n).level for n in ("", "highdicom")}
    setup_logging("DEBUG")
    caplog.set_level(logging.DEBUG)
    try:
        _no_identifiers_in_logs(daemon_factory, storescp, caplog)
    finally:
        for name, level in before.items():
            logging.getLogger(name).setLevel(level)
        root.setLevel(before[""])


def _no_identifiers_in_logs(daemon_factory: Callable[..., Daemon], storescp: StoreScp,
                            caplog: pytest.LogCaptureFixture) -> None:
    d = daemon_factory(**destination(storescp.port))
    ds = synth.make_dataset(SPEC)
    assert send(d.dicom_port, [ds]) == [0]
    wait_for(lambda: all_sent(d, 2), timeout=60)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "sent sr" in text and "sent overlay" in text
    secrets = ["DOE", "P-77", "ACC-77", ds.StudyInstanceUID, ds.SOPInstanceUID]
    secrets += [o.sop_instance_uid for _, o in deliveries(d)]
    for secret in secrets:
        assert secret not in text


def test_tls_destination(daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    """DICOM over TLS to storescp +tls, with a CA made for the test; a wrong CA is refused."""
    certs = make_certs(tmp_path / "pki")
    peer = StoreScp(tmp_path / "tls", extra=("+tls", str(certs["server.key"]),
                                               str(certs["server.pem"]), "-vc")).start()
    try:
        d = daemon_factory(**destination(peer.port, send=["sr"], tls=True,
                                         tls_ca_file=str(certs["ca.pem"]), host="localhost"))
        assert send(d.dicom_port, [synth.make_dataset(SPEC)]) == [0]
        wait_for(lambda: all_sent(d, 1), timeout=60)
        assert sum(peer.received().values()) == 1
        # the same peer, checked against a CA that did not sign its certificate: refused
        other = make_certs(tmp_path / "other")
        [(_, obj)] = deliveries(d)
        wrong = tls_client("localhost", str(other["ca.pem"]))
        with pytest.raises(SendError):
            send_files("127.0.0.1", peer.port, [outgoing(d.cfg.storage.root / obj.relpath)],
                       "TRIAGE", "PACS", 10, wrong)
        assert sum(peer.received().values()) == 1
    finally:
        peer.stop()

