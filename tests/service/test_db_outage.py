"""A database outage in the middle of a stream: PostgreSQL stopped for 12 s, then started.

A real PostgreSQL server (our own, since this test stops it), a real ``triage serve``
process and a modality played by pynetdicom: 24 studies sent one association each,
the server stopped (``pg_ctl stop -m fast``) after the first third and started again
12 s later, and every instance that got a non-success status sent again, as a
modality's retry queue does. The daemon must stay up, say on ``/healthz`` that the
database is away (and only then), answer the C-STOREs it cannot record with the
retryable 0xA703, and end with every study listed once and decided once.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from dicom_io import store_status as status
from tests import synth
from tests.conftest import echo_ok, free_port, send, serve_config, wait_for
from tests.peers import StoreScp
from triage.service.daemon import Daemon
from triage.store.database import make_engine

pytestmark = pytest.mark.slow

N_STUDIES = 24
OUTAGE_S = 12.0
LEASE_S = 3.0
DECIDED = ("scored", "unscored")


@pytest.fixture
def pg() -> Iterator[Any]:
    """A PostgreSQL server of this test's own (the session's is shared by other tests)."""
    from tests.pg import start_server

    server = start_server()
    try:
        yield server
    finally:
        server.stop()


class HealthWatch:
    """Polls ``/healthz`` in a thread and keeps every answer (status code, JSON body)."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/healthz"
        self.answers: list[tuple[int, dict[str, Any]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def get(self) -> tuple[int, dict[str, Any]]:
        try:
            with urllib.request.urlopen(self.url, timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            try:
                self.answers.append(self.get())
            except (OSError, ValueError):
                self.answers.append((0, {}))  # no answer at all: the web server is down

    def __enter__(self) -> HealthWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


def _http(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _rows(engine: Any, sql: str) -> list[Any]:
    with engine.connect() as c:
        return list(c.execute(text(sql)).all())


def _decided(engine: Any) -> bool:
    try:
        rows = _rows(engine, "SELECT state FROM studies")
    except Exception:  # the server may still be starting up
        return False
    return len(rows) == N_STUDIES and all(state in DECIDED for (state,) in rows)


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[StoreScp]:
    """DCMTK storescp as the PACS the results go back to."""
    peer = StoreScp(tmp_path / "pacs").start()
    yield peer
    peer.stop()


def _all_sent(engine: Any) -> bool:
    """Whether every planned object (one per result: its SR) is sent (called once every
    study is decided: a result and its outbox rows are one transaction)."""
    try:
        rows = _rows(engine, "SELECT state FROM outbox")
        objects = _rows(engine, "SELECT count(*) FROM result_objects")[0][0]
    except Exception:
        return False
    return bool(rows) and len(rows) == objects and all(state == "sent" for (state,) in rows)


def test_postgresql_stopped_mid_stream_for_12_s_loses_nothing_and_decides_each_study_once(
        pg: Any, pacs: StoreScp, tmp_path: Path) -> None:
    url = pg.create_database()
    data = tmp_path / "var"
    extra = (f"max_studies_in_flight = 2\nclaim_lease_s = {LEASE_S}\n"
             f'[database]\nurl = "{url}"\nleader_lease_s = {LEASE_S}\n'
             "[results]\nretry_initial_s = 0.2\nretry_max_s = 1.0\npoll_interval_s = 0.2\n"
             "timeout_s = 10.0\n[[results.destinations]]\n"
             f'ae_title = "PACS"\nhost = "127.0.0.1"\nport = {pacs.port}\nsend = ["sr"]\n')
    port = free_port()
    cfg = serve_config(tmp_path / "triage.toml", data, port, extra)
    web_port = tomllib.loads(cfg.read_text())["web"]["port"]
    log_path = tmp_path / "daemon.log"
    daemon = subprocess.Popen([sys.executable, "-m", "triage", "serve", "--config", str(cfg)],
                              stdout=log_path.open("ab"), stderr=subprocess.STDOUT)
    engine = make_engine(url)
    studies = [synth.write_study(tmp_path / "src" / str(i), n_images=1,
                                 spec=synth.SynthSpec(rows=256, columns=256, seed=i))[0]
               for i in range(N_STUDIES)]
    answers: dict[int, list[int]] = {i: [] for i in range(N_STUDIES)}
    try:
        wait_for(lambda: echo_ok(port), timeout=120)
        with HealthWatch(web_port) as health:
            wait_for(lambda: health.answers and health.answers[-1][0] == 200, timeout=30)
            first, during = N_STUDIES // 3, 2 * N_STUDIES // 3
            for i in range(first):
                answers[i] += send(port, [studies[i]])
            pg.halt()
            t_halt = time.monotonic()
            for i in range(first, during):  # the stream goes on into the outage
                answers[i] += send(port, [studies[i]])
            wait_for(lambda: any(code == 503 for code, _ in health.answers), timeout=OUTAGE_S)
            # /metrics still answers, saying the database is down; a study page says 503.
            metrics = _http(web_port, "/metrics")
            study_page = _http(web_port, "/study/1")
            # The outage lasts its 12 s whatever the stream does meanwhile.
            wait_for(lambda: time.monotonic() - t_halt >= OUTAGE_S, timeout=OUTAGE_S + 1,
                     interval=0.2)
            pg.resume()
            for i in range(during, N_STUDIES):
                answers[i] += send(port, [studies[i]])
            # The modality's retry queue: what was not acknowledged is sent again.
            def resend() -> bool:
                for i, got in answers.items():
                    if got[-1] != status.SUCCESS:
                        answers[i] += send(port, [studies[i]])
                return all(got[-1] == status.SUCCESS for got in answers.values())

            wait_for(resend, timeout=60, interval=0.5)
            wait_for(lambda: _decided(engine), timeout=180, interval=0.2)
            wait_for(lambda: _all_sent(engine), timeout=120, interval=0.2)
            wait_for(lambda: health.get()[0] == 200, timeout=30)
            final_code, final = health.get()

        assert daemon.poll() is None, "the daemon exited during the outage"
        # Every refusal was the retryable "database unavailable", and only during the outage.
        refused = [a for got in answers.values() for a in got if a != status.SUCCESS]
        assert refused, "no C-STORE met the outage"
        assert set(refused) == {status.DB_UNAVAILABLE}, answers
        assert all(got[-1] == status.SUCCESS for got in answers.values())
        # /healthz: 503 naming the database while it was away, 200 before and after.
        down = [body for code, body in health.answers if code == 503]
        assert down and all(body["database"] is False and body["database_error"]
                            for body in down), down[:3]
        assert all(body.get("listener") and body.get("worker") for _, body in health.answers
                   if body), "a part of the daemon stopped during the outage"
        assert final_code == 200 and final["database"] is True
        assert metrics[0] == 200 and "triage_database_up 0.0" in metrics[1]
        assert "triage_instances_refused_total" in metrics[1]
        assert study_page[0] == 503 and "database is unavailable" in study_page[1]
        # Every study listed once, decided once; every instance recorded once.
        sent_uids = {synth_uid(p) for p in studies}
        listed = _rows(engine, "SELECT study_uid, state FROM studies")
        assert {uid for uid, _ in listed} == sent_uids and len(listed) == N_STUDIES
        assert all(state in DECIDED for _, state in listed)
        assert _rows(engine, "SELECT count(*) FROM instances")[0][0] == N_STUDIES
        assert _rows(engine, "SELECT count(*) FROM results")[0][0] == N_STUDIES
        assert not _rows(engine, "SELECT study_id, version FROM results "
                                 "GROUP BY study_id, version HAVING count(*) > 1")
        assert not _rows(engine, "SELECT id FROM studies s WHERE NOT EXISTS (SELECT 1 FROM "
                                 "results r WHERE r.study_id = s.id AND r.version = s.version)")
        # The outbox sender came back too: each result's SR reached the PACS.
        srs = {uid for (uid,) in _rows(engine, "SELECT sop_instance_uid FROM result_objects")}
        assert srs and set(pacs.received()) == srs
        log = log_path.read_text(errors="replace")
        assert "C-STORE refused 0xA703" in log and "the database is unavailable" in log
        n_down = sum(1 for code, _ in health.answers if code == 503)
        print(f"\ndb outage: PostgreSQL stopped {OUTAGE_S:g} s after {first} of {N_STUDIES} "
              f"studies; {len(refused)} C-STORE(s) answered 0xA703 and were resent; "
              f"/healthz 503 in {n_down} of {len(health.answers)} polls; every study decided "
              "once")
    finally:
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(90)
        engine.dispose()
    assert daemon.returncode == 0, log_path.read_text(errors="replace")[-4000:]


def test_a_sqlite_file_locked_by_another_program_gets_a_retryable_status_then_success(
        daemon_factory: Any, tmp_path: Path) -> None:
    d: Daemon = daemon_factory(tmp_path / "var", **{"database.sqlite_busy_timeout_s": 1.0})
    ds = synth.make_dataset(synth.SynthSpec(rows=128, columns=128))
    # Another program (an sqlite3 shell, a backup tool) holds the write lock.
    other = sqlite3.connect(d.cfg.storage.db_path, isolation_level=None)
    try:
        other.execute("BEGIN EXCLUSIVE")
        assert send(d.dicom_port, [ds]) == [status.DB_UNAVAILABLE]
        other.execute("ROLLBACK")
    finally:
        other.close()
    assert d.health()[0], "the daemon is not whole after the lock"
    assert send(d.dicom_port, [ds]) == [status.SUCCESS]

    def decided() -> bool:
        return d.store.counts()["scored"] + d.store.counts()["unscored"] == 1

    wait_for(decided, timeout=60)
    with d.store.read() as s:
        assert s.scalar(text("SELECT count(*) FROM instances")) == 1
        assert s.scalar(text("SELECT count(*) FROM results")) == 1


def synth_uid(path: Path) -> str:
    """The StudyInstanceUID of a file written by :func:`tests.synth.write_study`."""
    from pydicom import dcmread

    return str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)
