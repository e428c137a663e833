"""The daemon scores studies: real daemon, real senders, real onnxruntime, real SQLite."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from pydicom import dcmread
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, generate_uid
from sqlalchemy import select

from dicom_io import synth
from triage import db
from triage.config import DriftConfig
from triage.daemon import Daemon
from triage.db import ImageResult, Result, Study
from triage.drift import assess, ks, psi
from triage.scoring import priority
from triage.worker import study_outcome, tier_rank

from .conftest import free_port, model_for_tests, scu, send, storescu, wait_for

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
        for rel in (i.heatmap_path, i.thumb_path):
            with Image.open(daemon.cfg.storage.root / rel) as im:
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


def test_late_instance_creates_a_second_result_version(daemon: Daemon) -> None:
    study_uid = generate_uid()
    assert send(daemon.dicom_port, [synth.make_dataset(SPEC, study_uid=study_uid)]) == [0]
    wait_for(lambda: _results(daemon, study_uid), timeout=60)
    assert send(daemon.dicom_port, [synth.make_dataset(
        synth.SynthSpec(rows=160, columns=160, seed=7), study_uid=study_uid)]) == [0]
    first, second = wait_for(lambda: (r := _results(daemon, study_uid)) and len(r) == 2 and r, timeout=60)
    assert (first.version, second.version) == (1, 2)
    assert second.previous_tier == first.tier
    assert (second.tier_change is None) == (second.tier == first.tier)
    assert len(_images(daemon, second.id)) == 2


def test_kill_9_during_scoring_then_restart_scores_every_study_exactly_once(tmp_path: Path) -> None:
    port, data = free_port(), tmp_path / "var"
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[dicom]\nport = {port}\n[web]\nport = {free_port()}\n'
                   f'[storage]\ndata_dir = "{data}"\nmin_free_mb = 0\n'
                   '[studies]\nquiet_period_s = 0.3\nsweep_interval_s = 0.1\n'
                   f'[model]\npath = "{model_for_tests()}"\n'
                   '[worker]\nprocesses = 1\npoll_interval_s = 0.1\nmax_studies_in_flight = 2\n')
    log = (tmp_path / "serve.log").open("ab")

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "triage.cli", "serve", "--config", str(cfg)],
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
    r = subprocess.run([sys.executable, "-m", "triage.cli", "status", "--config", str(cfg), "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["studies"]["scored"] == 1 and out["backlog"] == 0
    assert out["model"]["sha256"] and out["last_drift_check"] is None


# --- pure parts --------------------------------------------------------------

THRESHOLDS = {"abnormal": 0.3, "urgent": 0.8}


@given(st.dictionaries(st.integers(0, 50), st.floats(0, 1), max_size=6))
def test_study_score_is_the_maximum_and_its_tier_follows_the_thresholds(probs: dict[int, float]) -> None:
    state, p, tier = study_outcome(probs, {}, THRESHOLDS)
    if not probs:
        assert (state, p, tier) == (db.UNSCORED, None, "unscored")
    else:
        assert p == max(probs.values()) and tier == priority(p, THRESHOLDS)


def test_tier_ranks_order_unscored_routine_and_operating_points() -> None:
    ranks = [tier_rank(t, THRESHOLDS) for t in ("unscored", "routine", "abnormal", "urgent")]
    assert ranks == sorted(ranks) and len(set(ranks)) == 4


def _card(ref: np.ndarray) -> dict:
    from triage.metrics import score_distribution

    return {"reference_scores": score_distribution(ref),
            "training_metadata": {"photometric": ["MONOCHROME2"]}}


def test_drift_alerts_on_a_shifted_distribution_and_not_on_a_matching_one() -> None:
    rng = np.random.default_rng(0)
    ref = rng.beta(5, 2, 2000)
    card, cfg = _card(ref), DriftConfig(min_samples=50)
    same = assess(card, list(rng.beta(5, 2, 400)), [{"photometric": "MONOCHROME2"}] * 400, cfg)
    shifted = assess(card, list(rng.beta(2, 5, 400)), [{"photometric": "MONOCHROME2"}] * 400, cfg)
    assert not same.alert and same.psi < 0.1 and same.ks < 0.1
    assert shifted.alert and shifted.psi > cfg.psi_alert and shifted.ks > cfg.ks_alert
    foreign = assess(card, list(rng.beta(5, 2, 400)), [{"photometric": "MONOCHROME1"}] * 400, cfg)
    assert foreign.alert and foreign.unseen == {"photometric": ["MONOCHROME1"]}


def test_psi_and_ks_match_direct_computation() -> None:
    from scipy.stats import ks_2samp

    rng = np.random.default_rng(1)
    ref, sample = rng.uniform(0, 1, 50_000), rng.beta(2, 3, 3000)
    counts, edges = np.histogram(ref, bins=20, range=(0, 1))
    got, _ = np.histogram(sample, bins=edges)
    p, q = counts / counts.sum(), got / got.sum()
    assert psi(counts, edges, sample) == pytest.approx(np.sum((q - p) * np.log(q / p)), rel=1e-6)
    levels = np.linspace(0, 1, 101)
    assert ks(levels, np.quantile(ref, levels), sample) == pytest.approx(
        ks_2samp(ref, sample).statistic, abs=0.02)


def test_drift_job_records_a_check_and_an_alert(daemon: Daemon) -> None:
    from triage.db import Alert, DriftCheck

    dss = [synth.make_dataset(SPEC) for _ in range(3)]
    assert send(daemon.dicom_port, dss) == [0, 0, 0]
    wait_for(lambda: all(_results(daemon, d.StudyInstanceUID) for d in dss), timeout=60)
    verdict = daemon.check_drift()
    with daemon.store.read() as s:
        [check] = list(s.scalars(select(DriftCheck)))
        alerts = list(s.scalars(select(Alert).where(Alert.active.is_(True))))
    assert check.n == verdict.n == 3 and check.summary == verdict.summary
    assert bool(alerts) == verdict.alert


def test_age_strings_parse_to_years() -> None:
    from triage.worker import age_years

    assert age_years("045Y") == 45 and age_years("006M") == 0.5
    assert age_years("") is None and age_years("45Y") is None and age_years("045X") is None


def test_population_shift_is_named_when_adults_arrive() -> None:
    card, cfg = _card(np.random.default_rng(2).beta(5, 2, 500)), DriftConfig(min_samples=5)
    kids = [{"patient_age_years": a} for a in (2, 3, 4, 5, None)]
    adults = kids + [{"patient_age_years": a} for a in (45, 61, 38)]
    assert not assess(card, [0.8] * 5, kids, cfg).unseen
    v = assess(card, [0.8] * 8, adults, cfg)
    assert v.alert and "3 of 7 images" in v.summary and "not trained on this population" in v.summary


def test_adult_studies_raise_a_population_alert_in_the_daemon(daemon: Daemon) -> None:
    from triage.db import Alert

    dss = [synth.make_dataset(synth.SynthSpec(rows=160, columns=160, patient_age=f"0{40 + i}Y"))
           for i in range(3)]
    assert send(daemon.dicom_port, dss) == [0, 0, 0]
    wait_for(lambda: all(_results(daemon, d.StudyInstanceUID) for d in dss), timeout=60)
    verdict = daemon.check_drift()
    assert verdict.alert and "aged outside 0-17 years" in verdict.summary
    with daemon.store.read() as s:
        [alert] = list(s.scalars(select(Alert).where(Alert.active.is_(True))))
    assert "population" in alert.message
