"""Upgrading a data directory written by the previous release: the old code (a fixed commit of
main, taken from git history) runs as a real daemon, receives studies, scores them and queues
results for a PACS that is down; then the current code starts on the same directory. The
migration runs once, every row survives, the old results show on the web and the queued
results are delivered. A database from a newer triage is refused with a clear message."""

from __future__ import annotations

import http.client
import json
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from tests import synth
from tests.conftest import REPO, free_port, port_open, send, serve_config, storescu, wait_for
from tests.peers import StoreScp
from triage.service.daemon import Daemon
from triage.store import database as dbm

# The last commit of main before revision 0014 (pull mode) was merged: the database it
# writes is at revision 0013. The release tag, once there is one, can replace it.
PREVIOUS = "9f0c67796a26651bb95bb6d5e7413f0d060a6891"
PREVIOUS_REVISION, HEAD = "0013", "0014"
SMALL = synth.SynthSpec(rows=96, columns=96, accession_number="ACC-OLD")


def previous_release(out: Path) -> Path:
    """Extract the previous release's code (package, migrations, templates, default config)
    into ``out`` with ``git archive``; return it. Skips when git or the history is absent."""
    git = shutil.which("git")
    if git is None or not (REPO / ".git").exists():
        pytest.skip("needs the git history of the checkout (git, and .git beside the tests)")
    if subprocess.run([git, "-C", str(REPO), "cat-file", "-e", f"{PREVIOUS}^{{commit}}"],
                      capture_output=True).returncode != 0:
        pytest.skip(f"commit {PREVIOUS[:12]} is not in this clone's history (a shallow clone?)")
    out.mkdir()
    archive = subprocess.run([git, "-C", str(REPO), "archive", PREVIOUS, "triage", "migrations",
                              "reports", "config.toml"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive.stdout, check=True)
    return out


def old_env(code: Path) -> dict[str, str]:
    """The environment running the old code: its tree first on the path, this venv's
    dependencies (installed with --no-deps they would be the same)."""
    return {**os.environ, "PYTHONPATH": str(code), "PYTHONSAFEPATH": "1"}


def rows(db: Path, sql: str) -> list[tuple[Any, ...]]:
    """Read rows with plain sqlite3 (read-only), whatever code wrote the database."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as c:
        return [tuple(r) for r in c.execute(sql)]


def snapshot(db: Path) -> dict[str, list[tuple[Any, ...]]]:
    """What must survive an upgrade, table by table."""
    return {
        "studies": rows(db, "SELECT study_uid, state, version, n_instances, accession_number "
                            "FROM studies ORDER BY study_uid"),
        "instances": rows(db, "SELECT sop_instance_uid, relpath, sha256 FROM instances "
                              "ORDER BY sop_instance_uid"),
        "results": rows(db, "SELECT s.study_uid, r.version, r.state, r.tier, r.probability, "
                            "r.model_sha256 FROM results r JOIN studies s ON s.id = r.study_id "
                            "ORDER BY s.study_uid"),
        "image_results": rows(db, "SELECT instance_id, probability, heatmap_path "
                                  "FROM image_results ORDER BY id"),
        "objects": rows(db, "SELECT sop_instance_uid, kind FROM result_objects ORDER BY id"),
        "outbox": rows(db, "SELECT object_id, destination FROM outbox ORDER BY id"),
    }


def destination(port: int) -> dict[str, Any]:
    """The same PACS for both versions, with fast retries."""
    return {"results.destinations": [{"ae_title": "PACS", "host": "127.0.0.1", "port": port}],
            "results.retry_initial_s": 0.2, "results.retry_max_s": 1.0,
            "results.poll_interval_s": 0.2, "results.timeout_s": 10.0}


def run_previous(code: Path, tmp_path: Path, data: Path, pacs_port: int) -> None:
    """Run the old daemon on ``data``: two studies in (storescu and pynetdicom), both scored,
    their results queued for the PACS (down), then SIGTERM. Returns once it has exited."""
    check = subprocess.run([sys.executable, "-c", "import triage; print(triage.__file__)"],
                           env=old_env(code), cwd=code, capture_output=True, text=True)
    assert check.stdout.strip() == str(code / "triage" / "__init__.py")  # really the old code
    port = free_port()
    cfg = serve_config(tmp_path / "old.toml", data, port,
                       '[results]\nretry_initial_s = 0.2\nretry_max_s = 1.0\n'
                       'poll_interval_s = 0.2\nmax_attempts = 1000\n[[results.destinations]]\nae_title = "PACS"\n'
                       f'host = "127.0.0.1"\nport = {pacs_port}\n')
    log = (tmp_path / "old.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "triage", "serve", "--config", str(cfg)],
                            env=old_env(code), cwd=code, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: port_open(port) or proc.poll() is not None, timeout=120)
        assert proc.poll() is None, (tmp_path / "old.log").read_text()
        paths = synth.write_study(tmp_path / "old-study", n_images=2, spec=SMALL)
        assert storescu(port, *paths).returncode == 0
        assert send(port, [synth.make_dataset(SMALL)]) == [0]
        db = data / "triage.sqlite"
        # Both scored, and every result object queued and tried at least once (PACS down).
        wait_for(lambda: rows(db, "SELECT count(*) FROM studies WHERE state = 'scored'")
                 == [(2,)], timeout=180)
        wait_for(lambda: (n := rows(db, "SELECT count(*), min(attempts) FROM outbox"))[0][0] > 0
                 and n[0][1] >= 1, timeout=120)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, (tmp_path / "old.log").read_text()
    assert {str(dcmread(p).SOPInstanceUID) for p in paths} <= {
        r[0] for r in rows(db, "SELECT sop_instance_uid FROM instances")}


def api(port: int, path: str) -> Any:
    """GET a JSON document from the daemon's web server."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        assert r.status == 200, path
        return json.loads(r.read())
    finally:
        conn.close()


@pytest.mark.slow
def test_current_code_upgrades_a_previous_release_data_directory(
        daemon_factory: Callable[..., Daemon], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    code = previous_release(tmp_path / "previous")
    data, pacs_port = tmp_path / "var", free_port()
    run_previous(code, tmp_path, data, pacs_port)
    db = data / "triage.sqlite"
    assert rows(db, "SELECT version_num FROM alembic_version") == [(PREVIOUS_REVISION,)]
    before = snapshot(db)
    assert len(before["results"]) == 2 and before["outbox"]
    assert rows(db, "SELECT DISTINCT state FROM outbox") == [("pending",)]
    pacs = StoreScp(tmp_path / "pacs", port=pacs_port).start()
    try:
        caplog.set_level(logging.INFO, logger="triage.store.database")
        d = daemon_factory(data, **destination(pacs_port))
        assert dbm.current_revision(d.store.engine) == HEAD
        # Nothing lost or changed by the migration (the outbox's state may move on: the
        # PACS is up now, so compare what the rows are, not where they stand).
        after = snapshot(db)
        assert after == before
        # The old results show as they were recorded.
        ids = dict(rows(db, "SELECT study_uid, id FROM studies"))
        for uid, _version, _state, tier, _p, sha in before["results"]:
            doc = api(d.web_port, f"/api/study/{ids[uid]}")
            assert doc["state"] == "scored" and doc["tier"] == tier
            assert doc["model"].endswith(sha[:12]) and doc["images"]
        # What the old daemon queued is delivered by the new one, each object once.
        wait_for(lambda: rows(db, "SELECT count(*) FROM outbox WHERE state != 'sent'") == [(0,)],
                 timeout=120)
        objects = [r[0] for r in before["objects"]]
        assert pacs.received() == {uid: 1 for uid in objects}
        d.stop(drain_timeout_s=5)
        # A second start finds the database at head: the migration ran once.
        daemon_factory(data, **destination(pacs_port))
    finally:
        pacs.stop()
    migrated = [r.getMessage() for r in caplog.records if "database migrated" in r.getMessage()]
    assert migrated == [f"database migrated from {PREVIOUS_REVISION} to {HEAD}"]
    assert snapshot(db)["results"] == before["results"]


def test_a_database_from_a_newer_triage_stops_serve_with_one_clear_line(tmp_path: Path) -> None:
    data = tmp_path / "var"
    engine = dbm.open_db(data / "triage.sqlite")
    with engine.begin() as c:
        c.exec_driver_sql("UPDATE alembic_version SET version_num = '0099'")
    engine.dispose()
    cfg = serve_config(tmp_path / "serve.toml", data, free_port())
    run = subprocess.run([sys.executable, "-m", "triage", "serve", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("triage serve: error: the database is at revision '0099', which "
                           "triage ") and "a newer triage has upgraded it" in last
    assert "Traceback" not in run.stderr
    assert rows(data / "triage.sqlite", "SELECT version_num FROM alembic_version") == [("0099",)]
