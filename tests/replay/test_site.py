"""Site profiles from a labelled replay: fit, write, read, refuse, apply; the report's advice."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import model_for_tests
from tests.replay.test_replay import archive, in_process, model, replay_cfg  # noqa: F401
from triage.cli import main
from triage.core.errors import ConfigError
from triage.inference.model import OnnxModel
from triage.profile import read_profile
from triage.replay.records import StudyRecord
from triage.replay.run import Options, run


def _fake_replay(folder: Path, n_pos: int, n_neg: int, split: str = "holdout",
                 sha: str = "ab" * 32, seed: int = 0) -> Path:
    """Write a replay folder (results.jsonl, report.json meta, labels CSV) of known scores."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    labels = folder / "labels.csv"
    with labels.open("w", newline="") as fh, (folder / "results.jsonl").open("w") as out:
        w = csv.writer(fh)
        w.writerow(["StudyInstanceUID", "label", "split"])
        for i in range(n_pos + n_neg):
            y = int(i < n_pos)
            p = float(rng.beta(4, 2) if y else rng.beta(2, 4))
            uid = f"1.2.3.{i + 1}"
            w.writerow([uid, y, split])
            rec = StudyRecord(uid, None, "scored", p, "routine", [],
                              [{"sop_hash": "x", "probability": p, "reason": None}],
                              study_date=f"202501{1 + i % 28:02d}", model_sha256=sha)
            out.write(rec.to_json() + "\n")
    (folder / "report.json").write_text(json.dumps({"meta": {"labels": str(labels)}}))
    return folder


def test_site_calibrate_writes_a_profile_the_daemon_and_replay_can_read(tmp_path: Path) -> None:
    replay = _fake_replay(tmp_path / "r", 300, 400)
    out = tmp_path / "site.toml"
    rc = main(["site", "calibrate", str(replay), "--out", str(out), "--site", "Ward 7",
               "--card", str(model_for_tests().with_suffix(".json"))])
    assert rc == 0 and out.is_file() and out.with_suffix(".png").is_file()
    assert out.stat().st_mode & 0o077 == 0  # readable by the daemon's user only
    prof = read_profile(out, "ab" * 32)
    assert set(prof.thresholds) == {"abnormal", "urgent"}
    assert prof.thresholds["urgent"] > prof.thresholds["abnormal"]
    doc = prof.raw
    assert doc["site"]["labelled_scored"] == 700 and doc["site"]["prevalence"] == pytest.approx(3 / 7)
    assert doc["site"]["first_study_date"] == "2025-01-01"
    abn = next(p for p in doc["operating_points"] if p["name"] == "abnormal")
    assert abn["sensitivity_ci"][0] >= 0.95 and abn["conservative"]
    assert sum(doc["reference_scores"]["counts"]) == 700
    assert "Ward 7" in prof.source and prof.created[:4] == "20" + prof.created[2:4]


def test_a_profile_for_another_model_is_refused_in_one_line(tmp_path: Path) -> None:
    replay = _fake_replay(tmp_path / "r", 300, 300)
    out = tmp_path / "site.toml"
    assert main(["site", "calibrate", str(replay), "--out", str(out)]) == 0
    with pytest.raises(ConfigError) as e:
        read_profile(out, "cd" * 32)
    assert "fitted for model abababababab" in str(e.value) and "\n" not in str(e.value)


def test_too_few_positives_write_no_profile(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    replay = _fake_replay(tmp_path / "r", 30, 300)
    out = tmp_path / "site.toml"
    assert main(["site", "calibrate", str(replay), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "30 labelled abnormal studies cannot guarantee" in err and not out.exists()


def test_replay_applies_a_profile_and_says_so(archive: tuple[Path, Path],  # noqa: F811
                                             in_process: tuple[Path, dict[str, Any]],  # noqa: F811
                                             model: OnnxModel, tmp_path: Path) -> None:  # noqa: F811
    arch, labels = archive
    prof_path = tmp_path / "p.toml"
    prof_path.write_text(f'[profile]\nmodel_sha256 = "{model.card["sha256"]}"\n'
                         'created = "2026-11-01T00:00:00+00:00"\nsite = "test"\n'
                         '[[operating_points]]\nname = "abnormal"\nthreshold = 0.25\n'
                         '[[operating_points]]\nname = "urgent"\nthreshold = 0.9\n')
    profile = read_profile(prof_path, model.card["sha256"])
    report = run(Options(arch, labels, tmp_path / "out", workers=1, progress=False,
                         site_profile=profile), replay_cfg(), model)
    assert report["thresholds"] == {"abnormal": 0.25, "urgent": 0.9}
    assert report["meta"]["thresholds_source"].startswith("site profile test of 2026-11-01")
    assert in_process[1]["meta"]["thresholds_source"] == "model card"
    assert in_process[1]["thresholds"] != report["thresholds"]
    html = (tmp_path / "out" / "report.html").read_text()
    assert "site profile test" in html and "What this site should use" in html


def test_report_warns_of_in_sample_degenerate_and_few_labels(
        in_process: tuple[Path, dict[str, Any]]) -> None:  # noqa: F811
    report = in_process[1]
    warnings = " ".join(report["quality_warnings"])
    assert "too few labelled studies" in warnings  # 16 images in the archive
    assert report["site_advice"]["available"] is False
    assert "cannot guarantee" in report["site_advice"]["reason"]


def test_warnings_name_in_sample_labels_and_degenerate_intervals() -> None:
    from triage.replay.labels import LabelRow, Labels
    from triage.replay.report import Joined, warnings_for

    rec = StudyRecord("1.2", None, "scored", 0.9, "urgent", [], [])
    joined = [Joined(rec, LabelRow("1.2", 1, split="val"))]
    w = warnings_for(Labels(()), joined, [1.0, 1.0], 12, 12)
    assert any(x.startswith("in-sample labels: the archive was built from the val split") for x in w)
    assert any("degenerate interval: AUC [1.000, 1.000] from 12 abnormal and 12 normal" in x for x in w)
    assert any(x.startswith("too few labelled studies") for x in w)
    held = [Joined(rec, LabelRow("1.2", 1, split="holdout"))]
    assert warnings_for(Labels(()), held, [0.9, 0.97], 200, 200) == []
