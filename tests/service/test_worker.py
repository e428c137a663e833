"""The daemon scores studies: real daemon, real senders, real onnxruntime, real SQLite."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

from PIL import Image
from pydicom import dcmread
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, generate_uid
from sqlalchemy import select

from tests import synth
from tests.conftest import (
    free_port,
    model_for_tests,
    scu,
    send,
    serve_config,
    storescu,
    wait_for,
)
from triage.core.tiers import priority
from triage.service.daemon import Daemon
from triage.store import schema as db
from triage.store.schema import ImageResult, Result, Study

SPEC = synth.SynthSpec(rows=160, columns=160)


def _results(d: Daemon, study_uid: str) -> list[Result]:
    with d.store.read() as s:
        sid = s.scalar(select(Study.id).where(Study.study_uid == study_uid))
        return list(s.scalars(select(Result).where(Result.study_id == sid).order_by(Result.version)))


def _images(d: Daemon, result_id: int) -> list[ImageResult]:
    with d.store.read() as s:
        return list(s.scalars(select(ImageResult).where(ImageResult.result_id == result_id)))


def test_storescu_study_ends_with_a_consistent_result_and_heatmaps(daemon: Daemon, tmp_path: Path) -> None:
    paths = synth.write_study(tmp_path / "s", n_images=2, spec=SPEC)
    assert storescu(daemon.dicom_port, *paths).returncode == 0
    study_uid = str(dcmread(paths[0]).StudyInstanceUID)
    [res] = wait_for(lambda: _results(daemon, study_uid), timeout=60)
    assert res.state == db.SCORED and 0.0 <= res.probability <= 1.0
    thresholds = json.loads(res.thresholds)
    assert res.tier == priority(res.probability, thresholds)
    imgs = _images(daemon, res.id)
    assert len(imgs) == 2 and res.probability == max(i.probability for i in imgs)
    for i in imgs:
        with Image.open(daemon.cfg.storage.root / i.heatmap_path) as im:
            assert im.format == "PNG" and im.mode == "RGB"
        assert (i.photometric, i.rows, i.view_position) == ("MONOCHROME2", 160, "PA")
    assert res.model_sha256 and json.loads(res.timings)["infer_s"] >= 0


def test_lateral_only_study_is_unscored_with_a_reason(daemon: Daemon) -> None:
    ds = synth.make_dataset(synth.SynthSpec(rows=160, columns=160, view_position="LL"))
    assert send(daemon.dicom_port, [ds]) == [0]
    [res] = wait_for(lambda: _results(daemon, ds.StudyInstanceUID), timeout=60)
    assert (res.state, res.tier, res.probability) == (db.UNSCORED, "unscored", None)
    assert "lateral" in res.reasons
    with daemon.store.read() as s:
        assert s.scalar(select(Study.state).where(Study.study_uid == ds.StudyInstanceUID)) == db.UNSCORED


def _corrupt_j2k(study_uid: str):  # type: ignore[no-untyped-def]
    ds = synth.make_dataset(SPEC, study_uid=study_uid)
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00garbage" * 50])
    ds["PixelData"].VR = "OB"
    return ds


def test_broken_image_is_reported_and_the_good_one_scored(daemon: Daemon) -> None:
    study_uid = generate_uid()
    good = synth.make_dataset(SPEC, study_uid=study_uid)
    bad = _corrupt_j2k(study_uid)
    ae = scu(syntaxes=(JPEG2000Lossless, "1.2.840.10008.1.2.1"))
    assoc = ae.associate("127.0.0.1", daemon.dicom_port, ae_title="TRIAGE")
    assert assoc.send_c_store(good).Status == 0
    assert assoc.send_c_store(bad).Status == 0  # compressed defects surface at decode, not ingest
    assoc.release()
    [res] = wait_for(lambda: _results(daemon, study_uid), timeout=60)
    assert res.state == db.SCORED
    imgs = {i.probability is None: i for i in _images(daemon, res.id)}
    assert imgs[True].reason and imgs[False].probability == res.probability
    assert len(json.loads(res.reasons)) == 1


def _scored_then_a_late_instance(daemon: Daemon) -> tuple[str, Any, Any]:
    """Send a one-image study, wait for its result, send a second image late; return the
    study UID and the results of versions 1 and 2."""
    study_uid = generate_uid()
    assert send(daemon.dicom_port, [synth.make_dataset(SPEC, study_uid=study_uid)]) == [0]
    wait_for(lambda: _results(daemon, study_uid), timeout=60)
    assert send(daemon.dicom_port, [synth.make_dataset(
        synth.SynthSpec(rows=160, columns=160, seed=7), study_uid=study_uid)]) == [0]
    first, second = wait_for(lambda: (r := _results(daemon, study_uid)) and len(r) == 2 and r, timeout=60)
    return study_uid, first, second


def test_late_instance_creates_a_second_result_version(daemon: Daemon) -> None:
    _, first, second = _scored_then_a_late_instance(daemon)
    assert (first.version, second.version) == (1, 2)
    assert second.previous_tier == first.tier
    assert (second.tier_change is None) == (second.tier == first.tier)
    assert len(_images(daemon, second.id)) == 2


def test_kill_9_during_scoring_then_restart_scores_every_study_exactly_once(tmp_path: Path) -> None:
    port, data = free_port(), tmp_path / "var"
    cfg = serve_config(tmp_path / "c.toml", data, port, "max_studies_in_flight = 2\n")
    log = (tmp_path / "serve.log").open("ab")

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "triage", "serve", "--config", str(cfg)],
                                stdout=log, stderr=subprocess.STDOUT)

    def echo() -> bool:
        a = scu().associate("127.0.0.1", port, ae_title="TRIAGE")
        ok = a.is_established and a.send_c_echo().Status == 0
        if a.is_established:
            a.release()
        return bool(ok)

    def n_results() -> int:
        try:
            with sqlite3.connect(data / "triage.sqlite") as c:
                return int(c.execute("SELECT count(*) FROM results").fetchone()[0])
        except sqlite3.Error:
            return 0

    proc = start()
    wait_for(echo, timeout=90)
    dss = [synth.make_dataset(synth.SynthSpec(rows=512, columns=512, seed=i)) for i in range(12)]
    assert send(port, dss) == [0] * len(dss)
    wait_for(lambda: n_results() >= 1, timeout=120)
    decoders = _descendants(proc.pid)
    assert decoders, "the daemon should have decoder processes"
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    killed_at = n_results()
    # The kill landed mid-scoring: some studies scored, others still waiting for a result.
    with sqlite3.connect(data / "triage.sqlite") as c:
        waiting = c.execute("SELECT count(*) FROM studies WHERE state != 'scored'").fetchone()[0]
    assert 1 <= killed_at < len(dss) and waiting >= 1, (killed_at, waiting)
    # Orphaned decoders notice the daemon is gone and exit.
    wait_for(lambda: not any(Path(f"/proc/{p}").exists() for p in decoders), timeout=30)
    proc = start()
    try:
        wait_for(lambda: n_results() >= len(dss), timeout=180)
        with sqlite3.connect(data / "triage.sqlite") as c:
            rows = c.execute("SELECT s.study_uid, count(r.id) FROM studies s "
                             "LEFT JOIN results r ON r.study_id = s.id GROUP BY s.id").fetchall()
            states = {r[0] for r in c.execute("SELECT state FROM studies")}
        assert len(rows) == len(dss) and all(n == 1 for _, n in rows), rows
        assert states == {db.SCORED}
        assert killed_at <= len(dss)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def _descendants(pid: int) -> list[int]:
    """Return the pids of every process below ``pid`` (Linux /proc)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            kids = [int(k) for k in task.read_text().split()]
            out += kids
            todo += kids
    return out


def test_status_command_reports_counts_backlog_and_model(daemon: Daemon) -> None:
    ds = synth.make_dataset(SPEC)
    assert send(daemon.dicom_port, [ds]) == [0]
    wait_for(lambda: _results(daemon, ds.StudyInstanceUID), timeout=60)
    cfg = Path(daemon.cfg.storage.root) / "status.toml"
    cfg.write_text(f'[storage]\ndata_dir = "{daemon.cfg.storage.root}"\n'
                   f'[model]\npath = "{model_for_tests()}"\n')
    r = subprocess.run([sys.executable, "-m", "triage", "status", "--config", str(cfg), "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["studies"]["scored"] == 1 and out["backlog"] == 0
    assert out["model"]["sha256"] and out["last_drift_check"] is None


def test_daemon_on_postgresql_scores_a_late_instance_as_a_second_version(
        daemon_factory, pg_url: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    d = daemon_factory(**{"database.url": pg_url})
    assert d.lock is None and d.leader is not None and d.is_leader()
    study_uid, first, second = _scored_then_a_late_instance(d)
    assert (first.version, second.version) == (1, 2) and len(_images(d, second.id)) == 2
    with d.store.read() as s:
        study = s.scalar(select(Study).where(Study.study_uid == study_uid))
        assert (study.state, study.claimed_by, study.n_instances) == (db.SCORED, None, 2)
    cfg = tmp_path / "status.toml"
    cfg.write_text(f'[storage]\ndata_dir = "{d.cfg.storage.root}"\n[database]\nurl = "{pg_url}"\n'
                   f'[model]\npath = "{model_for_tests()}"\n')
    r = subprocess.run([sys.executable, "-m", "triage", "status", "--config", str(cfg), "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["studies"]["scored"] == 1 and out["daemon"]["leader"] == d.worker.node
