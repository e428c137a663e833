"""Results reach the RIS and the EHR: a real daemon, an MLLP RIS built on the ``hl7`` package and
a FHIR endpoint that validates with fhir.resources (tests/ris_peers.py)."""

from __future__ import annotations

import http.client
import json
import logging
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from tests import synth
from tests.conftest import echo_ok, free_port, model_for_tests, send, wait_for
from tests.ris_peers import FhirServer, MllpRis
from tests.service.test_outbox import all_sent
from tests.service.test_outbox import deliveries as rows
from triage.service.daemon import Daemon
from triage.store import schema as db
from triage.store.schema import Result, Study

pytestmark = pytest.mark.slow
FAST = {"results.retry_initial_s": 0.2, "results.retry_max_s": 1.0,
        "results.poll_interval_s": 0.2, "results.timeout_s": 5.0}


def spec(n: int, **kw: Any) -> synth.SynthSpec:
    """A small study header whose accession and patient are numbered ``n``."""
    return synth.SynthSpec(rows=128, columns=128, patient_name=f"DOE^JANE{n}",
                           patient_id=f"P-{n}", accession_number=f"ACC-{n}", seed=n, **kw)


def hl7_dest(port: int, **kw: Any) -> dict[str, Any]:
    """An HL7 destination on ``port``."""
    return {"kind": "hl7", "host": "127.0.0.1", "port": port, "name": "ris",
            "receiving_application": "RIS", **kw}


def fhir_dest(url: str, **kw: Any) -> dict[str, Any]:
    """A FHIR destination at ``url``."""
    return {"kind": "fhir", "url": url, "name": "ehr", "bearer_token": "t0ken", **kw}


def probabilities(d: Daemon) -> dict[str, float | None]:
    """{accession: the latest result's probability}."""
    with d.store.read() as s:
        return {acc: p for acc, p in s.execute(
            select(Study.accession_number, Result.probability)
            .join(Result, Result.study_id == Study.id))}


def obx(message: Any, code: str) -> list[str]:
    """The OBX-5 values of ``message`` whose OBX-3 code is ``code``."""
    return [str(seg[5]) for seg in message.segments("OBX") if str(seg[3][0][0]) == code]


@pytest.fixture
def ris() -> Iterator[MllpRis]:
    """An MLLP RIS on a free port, not started yet."""
    peer = MllpRis()
    yield peer
    peer.stop()


@pytest.fixture
def ehr() -> Iterator[FhirServer]:
    """A running FHIR endpoint."""
    peer = FhirServer().start()
    yield peer
    peer.stop()


def _send_studies(d: Daemon) -> None:
    for n in (1, 2):
        assert send(d.dicom_port, [synth.make_dataset(spec(n))]) == [0]
    assert send(d.dicom_port, [synth.make_dataset(spec(3, view_position="LL"))]) == [0]


def test_ris_down_for_20_s_then_gets_one_oru_per_study_and_the_ehr_one_report_each(
        daemon_factory: Callable[..., Daemon], ris: MllpRis, ehr: FhirServer,
        caplog: pytest.LogCaptureFixture) -> None:
    """The issue's "done when": both peers are down at first (nothing listens on the RIS
    port, the FHIR server answers 503), then up; every decided study arrives once."""
    caplog.set_level(logging.DEBUG)
    ehr.unavailable = True
    t0 = time.monotonic()
    # Retries every second at most for 20 s: keep them from running out (10 by default).
    d = daemon_factory(**{"results.destinations": [hl7_dest(ris.port), fhir_dest(ehr.url)],
                          **FAST, "results.max_attempts": 1000})
    _send_studies(d)
    wait_for(lambda: len(got := rows(d)) == 6 and all(dl.attempts >= 2 for dl, _ in got)
             and time.monotonic() - t0 >= 20, timeout=120)
    assert all(dl.state == db.PENDING for dl, _ in rows(d))
    assert ris.received == [] and ehr.bundles == [] and ehr.posts >= 3
    ris.start()
    ehr.unavailable = False
    wait_for(lambda: all_sent(d, 6), timeout=120)
    probs = probabilities(d)
    messages = ris.messages("ORU^R01")
    assert sorted(str(m.segment("OBR")[3]) for m in messages) == ["ACC-1", "ACC-2", "ACC-3"]
    assert len(ris.received) == 3  # once each, and nothing else
    for m in messages:
        acc = str(m.segment("OBR")[3])
        assert str(m.segment("ORC")[2]) == acc and str(m.segment("OBR")[25]) == "P"
        assert str(m.segment("PID")[3][0][0]) == acc.replace("ACC", "P")
        p = probs[acc]
        if p is None:
            assert obx(m, "TRIAGE-P") == [] and obx(m, "TRIAGE-UNSCORED")
        else:
            assert [float(v) for v in obx(m, "TRIAGE-P")] == [pytest.approx(p, abs=1e-4)]
        assert str(m.segment("MSH")[5]) == "RIS"
    reports = ehr.reports()
    assert len(reports) == 3 and ehr.auth == {"Bearer t0ken"}
    by_acc = {next(i.value for i in r.identifier if i.type): r for r in reports}
    for n in (1, 2):
        report = by_acc[f"ACC-{n}"]
        assert report.status == "preliminary" and f"{probs[f'ACC-{n}']:.2f}" in report.conclusion
        [bundle] = [b for b in ehr.bundles if report in [e.resource for e in b.entry]]
        [quantity] = [e.resource.valueQuantity for e in bundle.entry
                      if e.resource.get_resource_type() == "Observation"
                      and e.resource.valueQuantity is not None]
        assert float(quantity.value) == pytest.approx(probs[f"ACC-{n}"], abs=1e-4)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "sent oru" in text and "sent fhir" in text
    for secret in ["DOE", "JANE", "P-1", "ACC-1", "t0ken"]:
        assert secret not in text


def _status(d: Daemon) -> dict[str, Any]:
    cfg = Path(d.cfg.storage.root) / "status.toml"
    cfg.write_text(f'[storage]\ndata_dir = "{d.cfg.storage.root}"\n'
                   f'[model]\npath = "{model_for_tests()}"\n')
    r = subprocess.run([sys.executable, "-m", "triage", "status", "--config", str(cfg), "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return dict(json.loads(r.stdout))


def _metrics(d: Daemon) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    conn = http.client.HTTPConnection("127.0.0.1", d.web_port, timeout=30)
    conn.request("GET", "/metrics")
    body = conn.getresponse().read().decode()
    conn.close()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(body) for s in fam.samples}


def test_ae_is_retried_ar_is_a_dead_letter_shown_everywhere_and_retried(
        daemon_factory: Callable[..., Daemon], ris: MllpRis) -> None:
    answers = {"ACC-1": ["AE", "AE", "AA"], "ACC-2": ["AR"]}

    def answer(m: Any) -> str:
        left = answers[str(m.segment("OBR")[3])]
        return left.pop(0) if len(left) > 1 else left[0]

    ris.answer = answer
    ris.start()
    d = daemon_factory(**{"results.destinations": [hl7_dest(ris.port)], **FAST})
    for n in (1, 2):
        assert send(d.dicom_port, [synth.make_dataset(spec(n))]) == [0]
    wait_for(lambda: len(got := rows(d)) == 2 and {dl.state for dl, _ in got} ==
             {db.SENT, db.DEAD}, timeout=120)
    by_acc = {str(m.segment("OBR")[3]): m for m in ris.messages()}
    first, second = rows(d)
    retried, refused = (first, second) if first[0].state == db.SENT else (second, first)
    assert retried[0].attempts == 3 and retried[0].last_error is None
    assert refused[0].attempts == 1 and "AR: test says AR" in (refused[0].last_error or "")
    # every attempt carried the same control ID
    ids = {str(m.segment("OBR")[3]): {str(x.segment("MSH")[10]) for x in ris.messages()
                                      if str(x.segment("OBR")[3]) == str(m.segment("OBR")[3])}
           for m in by_acc.values()}
    assert all(len(v) == 1 for v in ids.values())
    st = _status(d)
    assert st["outbox"]["destinations"]["ris"] == {"pending": 0, "sent": 1, "dead": 1}
    assert _metrics(d)[("triage_outbox", (("destination", "ris"), ("state", "dead")))] == 1
    d.pages.render_worklist()
    assert 'data-testid="outbox-dead"' in d.pages.worklist_html.read_text()
    answers["ACC-2"] = ["AA"]
    cfg = Path(d.cfg.storage.root) / "status.toml"
    r = subprocess.run([sys.executable, "-m", "triage", "outbox", "retry", "--destination", "ris",
                        "--config", str(cfg)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    wait_for(lambda: all_sent(d, 2), timeout=60)


def test_oru_plus_orm_moves_the_order_and_a_later_version_is_a_correction(
        daemon_factory: Callable[..., Daemon], ris: MllpRis) -> None:
    ris.start()
    d = daemon_factory(**{"results.destinations": [hl7_dest(ris.port, message="oru+orm")],
                          **FAST})
    ds = synth.make_dataset(spec(1))
    assert send(d.dicom_port, [ds]) == [0]
    wait_for(lambda: all_sent(d, 2), timeout=120)
    assert send(d.dicom_port, [synth.make_dataset(spec(1), study_uid=ds.StudyInstanceUID)]) == [0]
    wait_for(lambda: all_sent(d, 4), timeout=120)
    orus, orms = ris.messages("ORU^R01"), ris.messages("ORM^O01")
    assert [str(m.segment("OBR")[25]) for m in orus] == ["P", "C"]
    assert [str(m.segment("ORC")[1]) for m in orms] == ["XO", "XO"]
    with d.store.read() as s:
        tiers = [t for (t,) in s.execute(select(Result.tier).order_by(Result.version))]
    thresholds = d.worker.thresholds
    top = max((t, n) for n, t in thresholds.items() if t is not None)[1]
    want = ["S" if t == top else "A" if t in thresholds else "R" for t in tiers]
    assert [str(m.segment("ORC")[7][0][5]) for m in orms] == want
    assert [str(m.segment("TQ1")[9][0][0]) for m in orus] == want


def test_fhir_refusal_is_a_dead_letter_with_the_outcome_text(
        daemon_factory: Callable[..., Daemon], ehr: FhirServer) -> None:
    ehr.refuse = True
    d = daemon_factory(**{"results.destinations": [fhir_dest(ehr.url)], **FAST})
    assert send(d.dicom_port, [synth.make_dataset(spec(1))]) == [0]
    wait_for(lambda: (got := rows(d)) and got[0][0].state == db.DEAD, timeout=120)
    [(dl, _)] = rows(d)
    assert dl.attempts == 1 and dl.last_status == 400
    assert "refused by the test" in (dl.last_error or "") and ehr.posts == 1


def _write_config(tmp: Path, ris_port: int) -> Path:
    cfg = tmp / "config.toml"
    cfg.write_text(
        f'[dicom]\nport = {free_port()}\n[web]\nport = {free_port()}\n'
        f'[storage]\ndata_dir = "{tmp / "var"}"\nmin_free_mb = 0\n'
        '[studies]\nquiet_period_s = 0.5\nsweep_interval_s = 0.1\n'
        f'[model]\npath = "{model_for_tests()}"\n[guard]\npath = ""\n'
        '[worker]\nprocesses = 1\npoll_interval_s = 0.1\n'
        '[results]\nretry_initial_s = 0.2\nretry_max_s = 1.0\npoll_interval_s = 0.2\n'
        'timeout_s = 60.0\n'
        f'[[results.destinations]]\nkind = "hl7"\nhost = "127.0.0.1"\nport = {ris_port}\n'
        'name = "ris"\n')
    return cfg


def _dicom_port(cfg: Path) -> int:
    import tomllib
    return int(tomllib.loads(cfg.read_text())["dicom"]["port"])


def test_kill_9_while_waiting_for_an_ack_loses_nothing_and_sends_no_second_message(
        tmp_path: Path, ris: MllpRis) -> None:
    """The RIS takes the first message and never answers; the daemon is killed -9 then
    started again. Every study's ORU arrives; the unanswered one is sent again with the same
    control ID (so the RIS can tell it is the same message), and no other message twice."""
    ris.answer = lambda m: "hold"
    ris.start()
    cfg = _write_config(tmp_path, ris.port)
    log = tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "triage", "serve", "--config", str(cfg)]
    proc = subprocess.Popen(cmd, stdout=log.open("ab"), stderr=subprocess.STDOUT)
    try:
        port = _dicom_port(cfg)
        wait_for(lambda: echo_ok(port), timeout=120)
        for n in (1, 2, 3):
            assert send(port, [synth.make_dataset(spec(n))]) == [0]
        ris.wait_for_count(1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        held = ris.messages()[0]
        ris.answer = lambda m: "AA"
        proc = subprocess.Popen(cmd, stdout=log.open("ab"), stderr=subprocess.STDOUT)
        wait_for(lambda: {str(m.segment("OBR")[3]) for m in ris.messages()} ==
                 {"ACC-1", "ACC-2", "ACC-3"}, timeout=180)
        db_path = tmp_path / "var"
        wait_for(lambda: _sent_count(db_path) == 3, timeout=60)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    by_control: dict[str, set[str]] = {}
    for m in ris.messages():
        by_control.setdefault(str(m.segment("MSH")[10]), set()).add(str(m.segment("OBR")[3]))
    assert len(by_control) == 3 and all(len(v) == 1 for v in by_control.values())
    held_id = str(held.segment("MSH")[10])
    again = [m for m in ris.messages() if str(m.segment("MSH")[10]) == held_id]
    assert len(again) == 2 and str(again[0]) == str(again[1])  # the same message, resent
    assert len(ris.messages()) == 4


def _sent_count(data: Path) -> int:
    import sqlite3
    dbs = list(data.rglob("*.db")) + list(data.rglob("*.sqlite"))
    for f in dbs:
        try:
            with sqlite3.connect(f) as c:
                return int(c.execute("SELECT count(*) FROM outbox WHERE state = 'sent'")
                           .fetchone()[0])
        except sqlite3.Error:
            continue
    return 0
