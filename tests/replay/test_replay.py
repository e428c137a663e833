"""`triage replay`: in-process and through the real daemon, metrics checked independently."""

from __future__ import annotations

import csv
import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from scipy.stats import binomtest, kstest, norm
from sklearn.metrics import confusion_matrix, roc_auc_score

from tests import synth
from tests.conftest import model_for_tests, shared_path
from tests.model_fixtures import write_dataset
from triage import config as config_mod
from triage.cli import main
from triage.core.errors import InputError
from triage.inference.model import OnnxModel
from triage.replay.archive import scan_archive
from triage.replay.labels import read_labels
from triage.replay.records import StudyRecord
from triage.replay.run import Options, Via, parse_hostport, run
from triage.replay.synthetic import BuildOptions, build
from triage.service.daemon import Daemon

EVIL = "<i>Evil & Co</i>"
NO_SUCH_STUDY = "1.2.826.0.1.3680043.8.498.999"


def replay_cfg() -> Any:
    """The shipped config with small resampling counts and a low drift minimum (tests only)."""
    return config_mod.override(config_mod.load(), **{"replay.seeds": 5, "replay.bootstrap": 200,
                                                     "drift.min_samples": 5, "guard.path": ""})


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A small built archive plus a lateral-only study, and a labels CSV that exercises every path.

    Labels: one row keyed by AccessionNumber only, one study left unlabelled, one
    row naming no study, historical arrival and read times on two rows.
    """
    root = tmp_path_factory.mktemp("replay")
    write_dataset(root / "images", n_train=0, n_val=16)
    arch = root / "archive"
    built = build(BuildOptions(root / "images", root / "images" / "manifest.csv", arch,
                               split="val", matrix=192, seed=5, per_day=16))
    lateral = synth.write_study(arch / "extra", spec=synth.SynthSpec(
        rows=192, columns=192, view_position="LL", manufacturer=EVIL, accession_number="LAT1"))
    (arch / "extra" / "README").write_text("not a DICOM file\n")
    _dicomdir(arch / "DICOMDIR")
    with built.open() as fh:
        rows = list(csv.DictReader(fh))
    labels = root / "labels.csv"
    with labels.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["StudyInstanceUID", "AccessionNumber", "label", "arrival_time", "read_time"])
        for i, r in enumerate(rows[1:]):  # rows[0]'s study stays unlabelled
            uid = "" if i == 0 else r["StudyInstanceUID"]
            times = ("2025-01-06T08:00:00", "2025-01-06T09:30:00") if i in (1, 2) else ("", "")
            w.writerow([uid, r["AccessionNumber"], r["label"], *times])
        w.writerow(["", "LAT1", 1, "", ""])
        w.writerow([NO_SUCH_STUDY, "", 0, "", ""])
    assert lateral
    return arch, labels


def _dicomdir(path: Path) -> None:
    ds = Dataset()
    ds.FileSetID = "TEST"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture(scope="module")
def model() -> OnnxModel:
    return OnnxModel.load_files(model_for_tests())


@pytest.fixture(scope="module")
def in_process(archive: tuple[Path, Path], model: OnnxModel,
               tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("out") / "in-process"
    arch, labels = archive
    report = run(Options(arch, labels, out, workers=2, progress=False), replay_cfg(), model)
    return out, report


def records(out: Path) -> dict[str, dict[str, Any]]:
    lines = (out / "results.jsonl").read_text().splitlines()
    return {r["study_uid"]: r for r in map(json.loads, lines)}


# --- in-process and through the daemon agree --------------------------------------------

def test_via_the_real_daemon_gives_identical_per_study_probabilities(
        daemon_factory: Callable[..., Daemon], archive: tuple[Path, Path],
        in_process: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    daemon = daemon_factory()
    arch, labels = archive
    out = tmp_path / "via"
    via = Via("127.0.0.1", daemon.dicom_port, daemon.cfg.storage.db_path, timeout_s=120, poll_s=0.1)
    card = json.loads(model_for_tests().with_suffix(".json").read_text())
    report = run(Options(arch, labels, out, via=via, progress=False), replay_cfg(), None, card)
    mine, theirs = records(in_process[0]), records(out)
    assert sorted(mine) == sorted(theirs) and len(mine) == 17
    for uid, r in mine.items():
        t = theirs[uid]
        assert (t["mode"], r["mode"]) == ("via", "in-process")
        assert (t["state"], t["tier"], t["probability"]) == (r["state"], r["tier"], r["probability"])
        assert t["reasons"] == r["reasons"]
        assert sorted((i["sop_hash"], i["probability"]) for i in t["images"]) == sorted(
            (i["sop_hash"], i["probability"]) for i in r["images"])
    for key in ("n", "n_pos", "n_neg", "auc", "auc_ci", "operating_points", "ece", "unscored",
                "subgroups", "thresholds"):
        assert report[key] == in_process[1][key], key


# --- the metrics equal an independent computation ------------------------------------------

def _truth(archive: tuple[Path, Path], out: Path) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    by_uid, by_acc = {}, {}
    with archive[1].open() as fh:
        for row in csv.DictReader(fh):
            if row["StudyInstanceUID"]:
                by_uid[row["StudyInstanceUID"]] = int(row["label"])
            if row["AccessionNumber"]:
                by_acc[row["AccessionNumber"]] = int(row["label"])
    recs = list(records(out).values())
    pairs = []
    for r in recs:
        label = by_uid.get(r["study_uid"], by_acc.get(r["accession_number"]))
        if label is not None and r["probability"] is not None:
            pairs.append((label, r["probability"]))
    y, p = (np.array(v) for v in zip(*pairs, strict=True))
    return y, p, recs


def test_report_metrics_equal_an_independent_computation(
        archive: tuple[Path, Path], in_process: tuple[Path, dict[str, Any]], model: OnnxModel) -> None:
    out, report = in_process
    assert json.loads((out / "report.json").read_text()) == report
    y, p, _ = _truth(archive, out)
    assert (report["n"], report["n_pos"], report["n_neg"]) == (len(y), int(y.sum()), int((1 - y).sum()))
    assert report["studies"] == 17 and report["unlabelled"] == 1
    assert report["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    lo, hi = _delong_by_definition(y, p)
    assert report["auc_ci"] == [pytest.approx(lo, abs=1e-9), pytest.approx(hi, abs=1e-9)]
    assert report["auc_ci_bootstrap"][0] <= report["auc"] <= report["auc_ci_bootstrap"][1]
    assert [op["name"] for op in report["operating_points"]] == sorted(
        model.thresholds, key=lambda n: model.thresholds[n])
    for op in report["operating_points"]:
        tn, fp, fn, tp = confusion_matrix(y, p >= op["threshold"], labels=[0, 1]).ravel()
        assert op["confusion"] == {"tp": tp, "fp": fp, "tn": tn, "fn": fn}
        for name, k, n in (("sensitivity", tp, tp + fn), ("specificity", tn, tn + fp),
                           ("ppv", tp, tp + fp), ("npv", tn, tn + fn)):
            _check_rate(op[name], k, n)
    assert report["ece"] == pytest.approx(_ece_by_definition(y, p, report["ece_bins"]), abs=1e-12)


def _check_rate(got: dict[str, Any], k: int, n: int) -> None:
    assert (got["k"], got["n"]) == (k, n)
    if n == 0:
        assert got["value"] is None and got["ci_lower"] is None
        return
    ci = binomtest(int(k), int(n)).proportion_ci(0.95, method="exact")
    assert got["value"] == pytest.approx(k / n)
    assert (got["ci_lower"], got["ci_upper"]) == (pytest.approx(ci.low, abs=1e-9),
                                                 pytest.approx(ci.high, abs=1e-9))


def _delong_by_definition(y: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    pos, neg = p[y == 1], p[y == 0]
    psi_ = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    v10, v01 = psi_.mean(axis=1), psi_.mean(axis=0)
    auc = psi_.mean()
    se = math.sqrt(v10.var(ddof=1) / len(pos) + v01.var(ddof=1) / len(neg))
    z = norm.ppf(0.975)
    return max(0.0, auc - z * se), min(1.0, auc + z * se)


def _ece_by_definition(y: np.ndarray, p: np.ndarray, bins: int) -> float:
    idx = np.minimum((p * bins).astype(int), bins - 1)
    return sum(abs(y[idx == b].mean() - p[idx == b].mean()) * (idx == b).sum()
               for b in range(bins) if (idx == b).any()) / len(y)


def test_unscored_unlabelled_unmatched_subgroups_and_drift(
        in_process: tuple[Path, dict[str, Any]], archive: tuple[Path, Path], model: OnnxModel) -> None:
    out, report = in_process
    assert report["unscored"] == {"count": 1, "labelled_pos": 1, "labelled_neg": 0,
                                  "reasons": {"lateral view (ViewPosition LL)": 1}}
    assert report["unmatched_labels"]["keys"] == [NO_SUCH_STUDY]
    assert report["meta"]["skipped_files"]["reasons"] == {
        "DICOMDIR": 1, "no StudyInstanceUID or SOPInstanceUID": 1, "not DICOM (.csv file)": 1}
    photometric = report["subgroups"]["photometric"]
    assert sum(g["n"] for g in photometric.values()) == report["n"]
    assert report["subgroups"]["manufacturer"][EVIL]["unscored"] == 1
    assert set(report["subgroups"]) == {"manufacturer", "photometric", "view_position", "sex"}
    _, _, recs = _truth(archive, out)
    imgs = [i for r in recs for i in r["images"] if i["probability"] is not None]
    ref = model.card["reference_scores"]
    probs = [i["probability"] for i in imgs]
    # Oracle: SciPy's one-sample KS against the card's piecewise-linear reference CDF, and PSI
    # over the reference's deciles written out here.
    def cdf(x: Any) -> Any:
        return np.interp(x, ref["quantiles"], ref["quantile_levels"], left=0.0, right=1.0)
    assert report["drift"]["ks"] == pytest.approx(kstest(probs, cdf).statistic)
    edges = np.interp(np.linspace(0, 1, 11), ref["quantile_levels"], ref["quantiles"])
    if len(np.unique(edges)) == 11:
        got = np.histogram(np.clip(probs, edges[0], edges[-1]), bins=edges)[0] / len(probs)
        q = np.maximum(got, 1e-4)
        assert report["drift"]["psi"] == pytest.approx(float(np.sum((q - 0.1) * np.log(q / 0.1))))
    tat = report["turnaround"]
    assert tat["arrival_source"] == "csv+dicom" and tat["seeds"] == 5
    assert tat["fifo"]["pos"]["n"] == report["n_pos"] + 1  # the unscored positive is still read
    assert tat["observed"]["pos"]["n"] + tat["observed"]["neg"]["n"] == 2
    assert all(tat["observed"][c]["n"] == 0 or tat["observed"][c]["mean"] == 90.0 for c in ("pos", "neg"))


def test_html_report_is_self_contained_and_escaped(in_process: tuple[Path, dict[str, Any]]) -> None:
    html = (in_process[0] / "report.html").read_text()
    assert "http://" not in html and "https://" not in html and "<script" not in html
    srcs = [s.split('"')[0] for s in html.split('src="')[1:]]
    assert len(srcs) == 7 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert EVIL not in html and "&lt;i&gt;Evil &amp; Co&lt;/i&gt;" in html
    for title in ("Operating points", "Reliability", "Subgroups", "Turnaround simulation", "Drift"):
        assert title in html


# --- resuming ----------------------------------------------------------------------------

class _NoScoring:
    """A model that must not be asked to score (every study is already in results.jsonl)."""

    def __init__(self, real: OnnxModel) -> None:
        self.card, self.thresholds = real.card, real.thresholds

    def predict(self, batch: np.ndarray) -> Any:
        raise AssertionError("a resumed replay scored a study again")


def test_rerun_skips_scored_studies_survives_a_torn_line_and_force_starts_again(
        archive: tuple[Path, Path], in_process: tuple[Path, dict[str, Any]], model: OnnxModel,
        tmp_path: Path) -> None:
    out = tmp_path / "resume"
    shutil.copytree(in_process[0], out)
    before = (out / "results.jsonl").read_text()
    report = run(Options(*archive, out, progress=False), replay_cfg(), _NoScoring(model))
    assert (out / "results.jsonl").read_text() == before and report["auc"] == in_process[1]["auc"]
    # A crash mid-write leaves a torn last line: that one study is scored again.
    lines = before.splitlines()
    (out / "results.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:40])
    run(Options(*archive, out, workers=1, progress=False), replay_cfg(), model)
    assert records(out) == records(in_process[0])
    run(Options(*archive, out, workers=1, force=True, progress=False), replay_cfg(), model)
    assert len((out / "results.jsonl").read_text().splitlines()) == 17


def test_results_of_another_model_are_not_mixed_in(archive: tuple[Path, Path],
                                                     in_process: tuple[Path, dict[str, Any]],
                                                     model: OnnxModel, tmp_path: Path) -> None:
    out = tmp_path / "other"
    shutil.copytree(in_process[0], out)
    other = _NoScoring(model)
    other.card = {**model.card, "sha256": "f" * 64}
    with pytest.raises(InputError, match="another model"):
        run(Options(*archive, out, progress=False), replay_cfg(), other)


def test_the_report_says_when_this_cpu_does_not_score_as_the_card(
        archive: tuple[Path, Path], in_process: tuple[Path, dict[str, Any]], model: OnnxModel,
        tmp_path: Path) -> None:
    meta = in_process[1]["meta"]
    assert meta["selftest"]["ok"] is True and not any("self-test" in w for w in meta["warnings"])
    out = tmp_path / "cpu"
    shutil.copytree(in_process[0], out)
    card = json.loads(json.dumps(model.card))
    card["selftest"]["probability"] = [p + 0.2 if p < 0.5 else p - 0.2
                                       for p in card["selftest"]["probability"]]
    report = run(Options(*archive, out, progress=False), replay_cfg(),
                 OnnxModel(model.path, card))
    assert report["meta"]["selftest"]["ok"] is False
    assert any("does NOT agree" in w for w in report["meta"]["warnings"])
    assert "does NOT agree" in (out / "report.html").read_text()


# --- the command line and the inputs -------------------------------------------------------

def test_cli_resumes_and_writes_the_reports(archive: tuple[Path, Path],
                                            in_process: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    out = tmp_path / "cli"
    shutil.copytree(in_process[0], out)
    (out / "report.json").unlink()
    (out / "report.html").unlink()
    assert main(["replay", str(archive[0]), "--labels", str(archive[1]), "--out", str(out),
                 "--model", str(model_for_tests()), "--no-progress"]) == 0
    assert json.loads((out / "report.json").read_text())["n"] == in_process[1]["n"]
    assert (out / "report.html").stat().st_size > 10_000


def test_cli_errors_are_one_line(archive: tuple[Path, Path], tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    base = ["replay", str(archive[0]), "--out", str(tmp_path / "o"), "--no-progress"]
    assert main([*base, "--labels", str(archive[1]), "--via", "nohostport"]) == 2
    assert "HOST:PORT" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    bad.write_text("StudyInstanceUID,label\n1.2.3,yes\n")
    assert main([*base, "--labels", str(bad), "--model", str(model_for_tests())]) == 2
    err = capsys.readouterr().err.strip()
    assert "row 2" in err and "\n" not in err


def test_labels_by_uid_or_accession_and_unmatched_rows(tmp_path: Path) -> None:
    p = tmp_path / "l.csv"
    p.write_text("AccessionNumber,StudyInstanceUID,label,arrival_time\n"
                 "A1,,1,2025-01-06 08:00\n,1.2.3,0,20250106093000\nA3,1.2.4,,\n")
    labels = read_labels(p)
    assert labels.lookup("9.9", "A1").label == 1 and labels.lookup("1.2.3", None).label == 0
    assert labels.lookup("1.2.4", None).label is None  # a row without a label: unlabelled
    assert labels.lookup("1.2.3", None).arrival.hour == 9
    assert labels.unmatched([("1.2.3", None), ("7.7", "A3")]) == ["A1"]
    assert parse_hostport("localhost:104") == ("localhost", 104)


def test_scan_groups_instances_into_studies_by_uid(tmp_path: Path) -> None:
    uid = "1.2.826.0.1.3680043.8.498.42"
    synth.write_study(tmp_path / "a", n_images=2, study_uid=uid)
    synth.write_study(tmp_path / "deep" / "er", n_images=1, study_uid=uid)
    synth.write_study(tmp_path / "b", n_images=1)
    studies, skipped = scan_archive(tmp_path)
    assert sorted(len(s.instances) for s in studies) == [1, 3] and not skipped
    with pytest.raises(InputError):
        scan_archive(tmp_path / "missing")


def test_a_report_without_labelled_scored_studies_still_renders(tmp_path: Path) -> None:
    from triage.replay.html import render
    from triage.replay.labels import Labels
    from triage.replay.report import build_report

    recs = [StudyRecord("1.2.3", None, "unscored", None, "unscored", ["image ab: no pixel data"], []),
            StudyRecord("1.2.4", None, "scored", 0.7, "abnormal", [], [{"probability": 0.7}])]
    report, inputs = build_report(recs, Labels(()), {"abnormal": 0.5}, None, replay_cfg())
    assert (report["n"], report["auc"], report["ece"], report["unlabelled"]) == (0, None, None, 2)
    assert report["unscored"]["reasons"] == {"no pixel data": 1}
    assert report["turnaround"]["arrival_source"] == "poisson"
    assert report["drift"]["available"] is False
    json.dumps(report, allow_nan=False)
    report["meta"] = {"archive_name": "x", "model_name": "m", "model_sha256": "", "mode": "in-process",
                      "created": "", "warnings": [], "thresholds_source": "model card", "skipped_files": {"count": 0, "reasons": {}}}
    html = render(report, inputs)
    assert "0 labelled, scored studies" in html and html.count("data:image/png;base64,") == 7


def test_record_round_trips_through_json() -> None:
    r = StudyRecord("1.2", None, "scored", 0.25, "routine", [], [{"probability": 0.25}],
                    thresholds={"abnormal": 0.5})
    assert StudyRecord.from_dict(json.loads(r.to_json())) == r


# --- shared-data tier -------------------------------------------------------------------------

# DICOM round-trip (bicubic upscaling to 448 px at 12-16 bits, MONOCHROME1, VOI tags,
# lossless compression, then the daemon's decoding) moves each probability slightly.
# Tolerances on the shipped card's val figures:
AUC_TOL, ECE_TOL, RATE_TOL = 0.015, 0.03, 0.05


@pytest.mark.shared
@pytest.mark.slow
def test_replay_of_the_val_split_reproduces_the_model_card(tmp_path: Path) -> None:
    data = shared_path("data", "cxr-pediatric-224")
    cfg = config_mod.load()
    if not cfg.model.onnx_path.exists() or not cfg.model.card_path.exists():
        pytest.skip(f"shipped model {cfg.model.onnx_path} or its card is not there yet")
    card = json.loads(cfg.model.card_path.read_text())
    manifest = data / "manifest.csv"
    if card.get("split"):
        # A patient-level split is not in the shared data: made again from its recorded seed
        # and fractions, it must be the very file the model was trained and validated on.
        from triage.training.splits import write_split
        from triage.training.train import file_sha256

        rec = card["split"]
        assert file_sha256(manifest) == rec["manifest_sha256"]
        manifest = tmp_path / "patient-split.csv"
        write_split(data / "manifest.csv", manifest, rec["seed"], rec["fractions"]["val"],
                    rec["fractions"]["holdout"])
        assert file_sha256(manifest) == rec["split_manifest_sha256"]
    arch = tmp_path / "val"
    labels = build(BuildOptions(data, manifest, arch, split="val", matrix=448,
                                seed=0, workers=2))
    model = OnnxModel.load_files(cfg.model.onnx_path, cfg.model.card_path)
    report = run(Options(arch, labels, tmp_path / "out", workers=2, progress=False), cfg, model, card)
    val = card["validation"]
    # The shipped input guard runs as in the daemon: it may refuse a few children's images
    # (its validation rate is under 1%); every other study is in the metrics.
    from triage.inference.guard import REFUSAL_PREFIXES

    uns = report["unscored"]
    assert report["n"] + uns["count"] == val["n"] and uns["count"] <= 0.01 * val["n"]
    assert report["n_pos"] + uns["labelled_pos"] == val["n_pos"]
    # (a refused study's lateral decoy is named too, by its header)
    assert all(r.startswith((*REFUSAL_PREFIXES, "lateral view")) for r in uns["reasons"]), uns
    assert abs(report["auc"] - val["auc"]) <= AUC_TOL
    assert abs(report["ece"] - card["ece"]) <= ECE_TOL
    mine = {op["name"]: op for op in report["operating_points"]}
    for op in card["operating_points"]:
        if op["threshold"] is None:
            continue
        for rate in ("sensitivity", "specificity"):
            assert abs(mine[op["name"]][rate]["value"] - op[rate]["value"]) <= RATE_TOL, (op["name"], rate)
