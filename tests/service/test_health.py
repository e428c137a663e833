"""``/healthz`` and ``/metrics`` of a real daemon, over real HTTP, after real C-STOREs."""

from __future__ import annotations

import http.client
import json

from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import generate_uid
from sqlalchemy import select

from dicom_io import store_status as status
from tests import synth
from tests.conftest import send, wait_for
from triage.service.daemon import Daemon
from triage.store import schema as db
from triage.store.schema import Study

SPEC = synth.SynthSpec(rows=96, columns=96)


def _get(port: int, path: str) -> tuple[int, str, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", path)
    r = conn.getresponse()
    out = (r.status, r.getheader("content-type") or "", r.read())
    conn.close()
    return out


def _samples(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    code, ctype, body = _get(port, "/metrics")
    assert code == 200 and ctype.startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(body.decode()) for s in fam.samples}


def test_healthz_is_200_while_all_parts_run_and_503_naming_the_one_that_stopped(
        daemon: Daemon) -> None:
    code, ctype, body = _get(daemon.web_port, "/healthz")
    assert code == 200 and ctype == "application/json"
    detail = json.loads(body)
    assert (detail["status"], detail["listener"], detail["scheduler"], detail["worker"]) == (
        "ok", True, True, True)
    daemon.worker.stop()
    code, _, body = _get(daemon.web_port, "/healthz")
    detail = json.loads(body)
    assert code == 503 and detail["worker"] is False and detail["listener"] is True
    daemon.scp.stop(drain_timeout_s=1)
    detail = json.loads(_get(daemon.web_port, "/healthz")[2])
    assert detail["listener"] is False and detail["status"] == "unhealthy"


def test_metrics_count_received_refused_states_latency_backlog_outbox_and_drift(
        daemon: Daemon) -> None:
    study_uid = generate_uid()
    good = synth.make_dataset(SPEC, study_uid=study_uid)
    bad = synth.make_dataset(SPEC)
    del bad.StudyInstanceUID
    assert send(daemon.dicom_port, [good, bad, good]) == [0, status.BAD_UID, 0]

    def scored() -> bool:
        with daemon.store.read() as s:
            return s.scalar(select(Study.state).where(Study.study_uid == study_uid)) == db.SCORED

    wait_for(scored, timeout=60)
    m = wait_for(lambda: (m := _samples(daemon.web_port))
                 .get(("triage_scoring_latency_seconds_count", ()), 0) >= 1 and m, timeout=10)
    assert m[("triage_instances_received_total", (("outcome", "stored"),))] == 1
    assert m[("triage_instances_received_total", (("outcome", "duplicate"),))] == 1
    assert m[("triage_instances_refused_total", (("status", f"0x{status.BAD_UID:04X}"),))] == 1
    assert m[("triage_studies", (("state", "scored"),))] == 1
    assert m[("triage_studies", (("state", "failed"),))] == 0
    assert m[("triage_scoring_latency_seconds_count", ())] == 1
    assert m[("triage_backlog", ())] == 0
    assert m[("triage_drift_alert", ())] == 0
    assert m[("triage_outbox_dead_letters", ())] == 0
