"""Pull mode against a real PACS: Orthanc holds studies nobody sends to triage; triage finds
them by C-FIND and retrieves them by C-MOVE (to its own listener) or C-GET, decides each once,
and later polls retrieve nothing twice."""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from tests import synth
from tests.conftest import free_port, wait_for
from tests.peers import Orthanc
from triage.service.daemon import Daemon
from triage.store import pulls
from triage.store.schema import Instance, Result, Study

pytestmark = pytest.mark.slow


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    """Orthanc with DICOMweb, on free ports."""
    peer = Orthanc(tmp_path / "orthanc", dicomweb=True).start()
    yield peer
    peer.stop()


def pull_source(orthanc: Orthanc, retrieve: str, **kw: Any) -> dict[str, Any]:
    """Config overrides: Orthanc as the only pull source, polled every second."""
    return {"pull.sources": [{"name": "pacs", "ae_title": orthanc.ae_title, "host": "127.0.0.1",
                              "port": orthanc.dicom_port, "every_s": 1, "retrieve": retrieve,
                              "timeout_s": 20, **kw}],
            "pull.retry_initial_s": 0.5, "pull.retry_max_s": 2.0}


def today_study(out: Path, images: int, spec: synth.SynthSpec,
                study_uid: str | None = None) -> list[Path]:
    """Write one series of ``images`` instances dated now (inside any lookback)."""
    study_uid, series_uid = study_uid or generate_uid(), generate_uid()
    now = _dt.datetime.now()
    return [synth.write(synth.make_dataset(spec, study_uid=study_uid, series_uid=series_uid,
                                           when=now), out / f"{generate_uid()}.dcm")
            for _ in range(images)]


def studies_in_orthanc(orthanc: Orthanc, tmp: Path, n: int, images: int = 1) -> list[list[Path]]:
    """Upload ``n`` one-series studies of today into Orthanc; return their files."""
    out = []
    for i in range(n):
        spec = synth.SynthSpec(rows=128, columns=128, patient_id=f"PULL-{i}",
                               accession_number=f"ACC-PULL{i}", seed=i)
        paths = today_study(tmp / f"study{i}", images, spec)
        orthanc.upload(paths)
        out.append(paths)
    return out


def decided(d: Daemon) -> int:
    """How many studies have a recorded result."""
    with d.store.read() as s:
        return int(s.scalar(select(func.count(func.distinct(Result.study_id)))) or 0)


def received_outcomes(d: Daemon) -> dict[str, float]:
    """triage_instances_received_total by outcome, from /metrics."""
    assert d.metrics is not None
    out: dict[str, float] = {}
    for line in d.metrics.text().decode().splitlines():
        if line.startswith("triage_instances_received_total{"):
            outcome = line.split('outcome="', 1)[1].split('"', 1)[0]
            out[outcome] = float(line.rsplit(" ", 1)[1])
    return out


def polls_after(d: Daemon, since: float) -> bool:
    st = pulls.states(d.store).get("pacs")
    return st is not None and st.last_poll_at is not None and st.last_poll_at > since


def sr_studies_in_orthanc(orthanc: Orthanc) -> set[str]:
    """The StudyInstanceUIDs of the studies that hold an SR in Orthanc."""
    out = set()
    for sid in orthanc.get("/studies"):
        series = orthanc.get(f"/studies/{sid}/series")
        if any(s["MainDicomTags"].get("Modality") == "SR" for s in series):
            out.add(orthanc.get(f"/studies/{sid}")["MainDicomTags"]["StudyInstanceUID"])
    return out


@pytest.mark.parametrize("retrieve", ["c-move", "c-get"])
def test_studies_only_in_the_pacs_are_pulled_decided_once_and_never_again(
        daemon_factory: Callable[..., Daemon], orthanc: Orthanc, tmp_path: Path,
        retrieve: str) -> None:
    files = studies_in_orthanc(orthanc, tmp_path, 5, images=2)
    port = free_port()
    orthanc.add_modality("triage", "TRIAGE", port)  # C-MOVE's destination; and who may query
    # The SRs go back to the same PACS over DICOMweb: its studies grow by instances of
    # another modality, which later polls must see and leave alone.
    web_dest = {"results.destinations": [{"kind": "dicomweb", "url": f"{orthanc.url}/dicom-web",
                                          "send": ["sr"]}],
                "results.retry_initial_s": 0.2, "results.retry_max_s": 1.0,
                "results.poll_interval_s": 0.2}
    d = daemon_factory(**{"dicom.port": port, **pull_source(orthanc, retrieve), **web_dest})
    wait_for(lambda: decided(d) == 5, timeout=180)
    with d.store.read() as s:
        held = {u: ae for u, ae in s.execute(select(Instance.sop_instance_uid, Instance.calling_ae))}
        uids = set(s.scalars(select(Study.study_uid)))
    want = {str(dcmread(p).SOPInstanceUID) for study in files for p in study}
    assert set(held) == want and set(held.values()) == {"ORTHANC"}
    assert uids == {str(dcmread(study[0]).StudyInstanceUID) for study in files}
    # A sixth study appears later, and one more image in the first: only those are pulled.
    [late] = studies_in_orthanc(orthanc, tmp_path / "late", 1)
    first = dcmread(files[0][0])
    extra = today_study(tmp_path / "extra", 1, synth.SynthSpec(
        rows=128, columns=128, patient_id=str(first.PatientID),
        accession_number=str(first.AccessionNumber)), study_uid=str(first.StudyInstanceUID))
    orthanc.upload(extra)
    news = [str(dcmread(p).SOPInstanceUID) for p in late + extra]
    wait_for(lambda: decided(d) == 6 and set(news) <= pulls.held(d.store, news), timeout=120)
    # Every scored study's SR (of its last result version) is in Orthanc, sent by STOW-RS.
    wait_for(lambda: sr_studies_in_orthanc(orthanc) == uids | {str(dcmread(late[0]).StudyInstanceUID)},
             timeout=120)
    for _ in range(3):
        mark = d.store.clock()
        wait_for(lambda mark=mark: polls_after(d, mark), timeout=30)
    outcomes = received_outcomes(d)
    assert outcomes.get("stored") == len(want) + 2 and not outcomes.get("duplicate"), outcomes
    st = pulls.states(d.store)["pacs"]
    assert st.failures == 0 and st.retrieved_total == len(want) + 2
    ok, detail = d.health()
    assert ok and detail["pull"]["pacs"]["ok"] is True


def test_a_pacs_that_is_down_backs_off_shows_in_health_and_recovers(
        daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    orthanc = Orthanc(tmp_path / "orthanc")  # not started yet: nothing listens on its port
    port = free_port()
    d = daemon_factory(**{"dicom.port": port, **pull_source(orthanc, "c-move")})
    wait_for(lambda: (pulls.states(d.store).get("pacs") or pulls.SourceState(
        "", None, None, 0, None, None, 0)).failures >= 2, timeout=60)
    ok, detail = d.health()
    assert ok, "a PACS that is down must not fail the daemon's probe"
    pacs = detail["pull"]["pacs"]
    assert pacs["ok"] is False and "association" in pacs["error"]
    assert pacs["next_try_at"] is not None
    assert d.metrics is not None
    text = d.metrics.text().decode()
    assert 'triage_pull_source_up{source="pacs"} 0.0' in text
    orthanc.start()
    try:
        files = studies_in_orthanc(orthanc, tmp_path, 1)
        orthanc.add_modality("triage", "TRIAGE", port)
        wait_for(lambda: decided(d) == 1, timeout=120)
        assert set(pulls.held(d.store, [str(dcmread(files[0][0]).SOPInstanceUID)]))
        wait_for(lambda: pulls.states(d.store)["pacs"].failures == 0, timeout=30)
        assert 'triage_pull_source_up{source="pacs"} 1.0' in d.metrics.text().decode()
    finally:
        orthanc.stop()


def test_triage_pull_backfills_older_studies_and_its_dry_run_retrieves_nothing(
        orthanc: Orthanc, tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.conftest import serve_config

    spec = synth.SynthSpec(rows=128, columns=128, patient_id="OLD-1", accession_number="ACC-OLD")
    old = [synth.write(synth.make_dataset(spec, study_uid=uid, series_uid=generate_uid(),
                                          when=_dt.datetime.now() - _dt.timedelta(days=5)),
                       tmp_path / f"old{i}.dcm")
           for i, uid in enumerate([generate_uid()] * 2)]
    orthanc.upload(old)
    orthanc.add_modality("triage", "TRIAGE", free_port())  # Orthanc answers known nodes only
    data = tmp_path / "var"
    cfg = serve_config(tmp_path / "c.toml", data, free_port(), (
        f'[[pull.sources]]\nname = "pacs"\nae_title = "ORTHANC"\nhost = "127.0.0.1"\n'
        f'port = {orthanc.dicom_port}\nretrieve = "c-get"\n'))

    def pull(*flags: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "triage", "pull", "--config", str(cfg),
                               "--source", "pacs", *flags], capture_output=True, text=True,
                              timeout=120)

    r = pull("--dry-run")  # the default lookback (1 day) does not reach 5 days back
    assert r.returncode == 0, r.stderr
    assert "0 studies in the last 1 day(s); would retrieve 0 instance(s)" in r.stdout
    r = pull("--since", "7d", "--dry-run")
    assert "1 study in the last 7 day(s); would retrieve 2 instance(s) of 1" in r.stdout, r.stdout
    r = pull("--since", "7d")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "retrieved 2 instance(s) of 1" in r.stdout
    import sqlite3

    with sqlite3.connect(data / "triage.sqlite") as c:
        got = {u for (u,) in c.execute("SELECT sop_instance_uid FROM instances")}
    assert got == {str(dcmread(p).SOPInstanceUID) for p in old}
    r = pull("--since", "7d")  # again: nothing new
    assert r.returncode == 0 and "retrieved 0 instance(s) of 0" in r.stdout, r.stdout
    r = subprocess.run([sys.executable, "-m", "triage", "status", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=60)
    assert "pull sources:\n  pacs: ok, last poll" in r.stdout, r.stdout
    assert "2 instance(s) retrieved in all" in r.stdout
    r = subprocess.run([sys.executable, "-m", "triage", "pull", "--config", str(cfg), "--source",
                        "pcas"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "did you mean 'pacs'" in r.stderr


def test_a_poll_racing_a_push_of_the_same_study_scores_it_once(
        daemon_factory: Callable[..., Daemon], orthanc: Orthanc, tmp_path: Path) -> None:
    import threading

    from tests.conftest import send

    [files] = studies_in_orthanc(orthanc, tmp_path, 1, images=3)
    port = free_port()
    orthanc.add_modality("triage", "TRIAGE", port)
    d = daemon_factory(**{"dicom.port": port, **pull_source(orthanc, "c-move")})
    # The modality pushes the same study while the first polls retrieve it.
    pushes = [threading.Thread(target=send, args=(port, [dcmread(p) for p in files]))
              for _ in range(2)]
    for t in pushes:
        t.start()
    for t in pushes:
        t.join(60)
    wait_for(lambda: decided(d) == 1, timeout=120)
    for _ in range(3):
        mark = d.store.clock()
        wait_for(lambda mark=mark: polls_after(d, mark), timeout=30)
    with d.store.read() as s:
        assert s.scalar(select(func.count()).select_from(Instance)) == 3
        [(study_id, n)] = s.execute(select(Result.study_id, func.count())
                                    .group_by(Result.study_id)).all()
    assert n == 1, "the study was scored more than once"
    outcomes = received_outcomes(d)
    assert outcomes.get("stored") == 3 and outcomes.get("replaced") is None, outcomes


def test_an_instance_the_listener_refuses_is_tried_a_few_times_without_backing_off_the_source(
        daemon_factory: Callable[..., Daemon], orthanc: Orthanc, tmp_path: Path) -> None:
    from triage.service.pull import PARTIAL_TRIES
    from triage.store.schema import PullStudy, Rejection

    uid = generate_uid()
    small = today_study(tmp_path / "small", 1, synth.SynthSpec(rows=128, columns=128), uid)
    big = today_study(tmp_path / "big", 1, synth.SynthSpec(rows=1024, columns=1024), uid)
    orthanc.upload(small + big)
    orthanc.add_modality("triage", "TRIAGE", free_port())
    d = daemon_factory(**{"dicom.max_dataset_mb": 1, **pull_source(orthanc, "c-get")})

    def remembered() -> bool:
        with d.store.read() as s:
            row = s.scalar(select(PullStudy).where(PullStudy.study_uid == uid))
        return row is not None and row.remote_instances == 2

    wait_for(remembered, timeout=90)
    with d.store.read() as s:
        refused = list(s.scalars(select(Rejection)))
        assert s.scalar(select(func.count()).select_from(Instance)) == 1
    assert len(refused) == PARTIAL_TRIES and {r.status for r in refused} == {0xA701}
    for _ in range(3):
        mark = d.store.clock()
        wait_for(lambda mark=mark: polls_after(d, mark), timeout=30)
    st = pulls.states(d.store)["pacs"]
    assert st.failures == 0, "a refused instance must not back the whole source off"
    with d.store.read() as s:
        assert s.scalar(select(func.count()).select_from(Rejection)) == PARTIAL_TRIES
