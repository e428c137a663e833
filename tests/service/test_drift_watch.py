"""The scheduled drift watch in a running daemon: checks and alerts recorded in the database."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
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


def test_many_guard_refusals_raise_an_input_alert(daemon_factory: Callable[..., Daemon],
                                                  tmp_path: Path) -> None:
    from tests.inference.test_guard import write_const_guard

    guard = write_const_guard(tmp_path / "g", adult=0.9, frontal=0.99)  # every image "adult"
    card = json.loads(guard.with_suffix(".json").read_text())
    card["validation"] = {"children_refused_as_adults": {"value": 0.004},
                          "frontal_refused_as_not_frontal": {"value": 0.005}}
    guard.with_suffix(".json").write_text(json.dumps(card))
    d = daemon_factory(**{"guard.path": str(guard)})
    assert d.worker.guard is not None and d.worker.guard.expected_refusal_rate == pytest.approx(0.009)
    dss = [synth.make_dataset(SPEC) for _ in range(4)]
    assert send(d.dicom_port, dss) == [0] * 4
    wait_for(lambda: all(_results(d, x.StudyInstanceUID) for x in dss), timeout=60)
    verdict = d.check_drift()
    assert verdict.alert and "the input guard refused 4 of 4 recent images" in verdict.summary
