"""The scheduled drift watch in a running daemon: checks and alerts recorded in the database."""

from __future__ import annotations

from sqlalchemy import select

from tests import synth
from tests.conftest import send, wait_for
from tests.service.test_worker import SPEC, _results
from triage.service.daemon import Daemon


def test_drift_job_records_a_check_and_an_alert(daemon: Daemon) -> None:
    from triage.store.schema import Alert, DriftCheck

    dss = [synth.make_dataset(SPEC) for _ in range(3)]
    assert send(daemon.dicom_port, dss) == [0, 0, 0]
    wait_for(lambda: all(_results(daemon, d.StudyInstanceUID) for d in dss), timeout=60)
    verdict = daemon.check_drift()
    with daemon.store.read() as s:
        [check] = list(s.scalars(select(DriftCheck)))
        alerts = list(s.scalars(select(Alert).where(Alert.active.is_(True))))
    assert check.n == verdict.n == 3 and check.summary == verdict.summary
    assert bool(alerts) == verdict.alert


def test_adult_studies_raise_a_population_alert_in_the_daemon(daemon: Daemon) -> None:
    from triage.store.schema import Alert

    dss = [synth.make_dataset(synth.SynthSpec(rows=160, columns=160, patient_age=f"0{40 + i}Y"))
           for i in range(3)]
    assert send(daemon.dicom_port, dss) == [0, 0, 0]
    wait_for(lambda: all(_results(daemon, d.StudyInstanceUID) for d in dss), timeout=60)
    verdict = daemon.check_drift()
    assert verdict.alert and "aged outside 0-17 years" in verdict.summary
    with daemon.store.read() as s:
        [alert] = list(s.scalars(select(Alert).where(Alert.active.is_(True))))
    assert "population" in alert.message
