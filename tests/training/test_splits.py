"""Patient-level splits: no patient on both sides, stratified, reproducible."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from triage.core.errors import InputError
from triage.training import splits


@pytest.mark.parametrize(("name", "patient"), [
    ("train/PNEUMONIA/person1_bacteria_1.jpeg", "person1"),
    ("train/PNEUMONIA/person1400_virus_2405.jpeg", "person1400"),
    ("train/PNEUMONIA/person1_virus_12_2.jpeg", "person1"),
    ("train/NORMAL/IM-0115-0001.jpeg", "IM-0115"),
    ("train/NORMAL/IM-0117-0001-0002.jpeg", "IM-0117"),
    ("val/NORMAL/NORMAL2-IM-1427-0001.jpeg", "NORMAL2-IM-1427"),
])
def test_patients_are_read_from_kermany_file_names(name: str, patient: str) -> None:
    assert splits.patient_id(name) == patient


def test_an_unknown_name_is_a_clear_error() -> None:
    with pytest.raises(InputError, match="add a 'patient' column"):
        splits.patient_id("scan_0001.png")


def _rows(n_patients: int = 120) -> tuple[list[str], list[int]]:
    patients, labels = [], []
    for p in range(n_patients):
        for _ in range(1 + p % 4):  # 1 to 4 images per patient
            patients.append(f"p{p}")
            labels.append(int(p % 3 != 0))  # about 2:1 abnormal, per patient
    return patients, labels


def test_no_patient_crosses_parts_and_labels_are_balanced() -> None:
    patients, labels = _rows()
    split = splits.patient_split(patients, labels, seed=1)
    owner: dict[str, str] = {}
    for p, s in zip(patients, split, strict=True):
        assert owner.setdefault(p, s) == s, f"{p} is in {owner[p]} and {s}"
    summary = splits.summarise(split, patients, labels)
    overall = sum(labels) / len(labels)
    for part in splits.SPLITS:
        assert summary.images[part] > 0
        assert abs(summary.positives[part] / summary.images[part] - overall) < 0.15
    assert 0.08 < summary.images["holdout"] / len(labels) < 0.25
    assert splits.patient_split(patients, labels, seed=1) == split
    assert splits.patient_split(patients, labels, seed=2) != split


def test_a_patient_with_both_labels_is_refused() -> None:
    with pytest.raises(InputError, match="both labels"):
        splits.patient_split(["a", "a", "b", "c", "d", "e", "f"], [0, 1, 0, 1, 0, 1, 0], seed=0)


def test_write_split_pools_every_row_and_keeps_sha(tmp_path: Path) -> None:
    src = tmp_path / "m.csv"
    patients, labels = _rows(60)
    with src.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "split", "sha256"])
        for i, (p, y) in enumerate(zip(patients, labels, strict=True)):
            w.writerow([f"x/person{p[1:]}_virus_{i}.jpeg", y, "val" if i % 2 else "train", f"h{i}"])
    summary = splits.write_split(src, tmp_path / "out.csv", seed=3)
    out = list(csv.DictReader((tmp_path / "out.csv").open()))
    assert len(out) == len(patients) and {r["split"] for r in out} == set(splits.SPLITS)
    assert out[5]["sha256"] == "h5" and out[5]["patient"] == f"person{patients[5][1:]}"
    assert sum(summary.images.values()) == len(patients)
