"""Shared tier: `triage score` over every file in ../shared/dicom: scored or unscored, never a crash."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tests.model_fixtures import shared_dir, tiny_model
from triage.config import DEFAULT_CONFIG, load

pytestmark = pytest.mark.shared

DICOM = shared_dir() / "dicom"


def _model() -> Path:
    shipped = load(DEFAULT_CONFIG).model.onnx_path
    return shipped if shipped.exists() else tiny_model().onnx


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    if not DICOM.is_dir():
        pytest.skip(f"../shared/dicom not found at {DICOM} (set TRIAGE_SHARED)")
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "triage", "score", "--json",
                           "--model", str(_model()), str(DICOM)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    return {str(Path(r["path"]).relative_to(DICOM)): r for r in rows}


def test_every_file_is_scored_or_has_a_reason(results: dict[str, dict]) -> None:
    files = sorted(str(p.relative_to(DICOM)) for p in DICOM.rglob("*") if p.is_file()
                   and not p.name.startswith("."))
    assert sorted(results) == files
    for name, r in results.items():
        if r["tier"] == "unscored":
            assert r["probability"] is None and r["reason"], name
        else:
            assert 0 <= r["probability"] <= 1 and r["reason"] is None, name


def _header_age(path: Path) -> int | None:
    """Age in whole years from PatientAge (nnnY) or the birth and study dates, read
    independently of triage's header reader."""
    import datetime as dt

    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    age = str(ds.get("PatientAge", "") or "")
    if len(age) == 4 and age.endswith("Y") and age[:3].isdigit():
        return int(age[:3])
    birth, study = str(ds.get("PatientBirthDate", "") or ""), str(ds.get("StudyDate", "") or "")
    if len(birth) == 8 and len(study) == 8:
        b, d = (dt.datetime.strptime(v, "%Y%m%d") for v in (birth, study))
        return int((d - b).days // 365.25)
    return None


def test_catalogued_dicom_outcomes(results: dict[str, dict]) -> None:
    with (DICOM / "catalog.csv").open() as fh:
        catalog = {row["file"]: row for row in csv.DictReader(fh)}
    for name, row in catalog.items():
        r = results[name]
        if name.startswith("broken/") or row["Modality"] not in ("CR", "DX", "SC"):
            assert r["tier"] == "unscored", (name, r)
        if name.startswith("chest/") and row["decode"].startswith("ok"):
            age = _header_age(DICOM / name)
            if age is not None and age >= 18:  # an adult's chest: the input guard's header check
                assert r["tier"] == "unscored" and r["reason"] == (
                    f"outside the model's population: {age} y (model: children)"), (name, r)
            elif r["tier"] == "unscored":  # otherwise only the guard network may refuse it
                assert r["reason"].startswith(("looks like an adult's",
                                               "does not look like a frontal")), (name, r)
    assert results["other_cr/pydicom_CT_small_wrong_modality.dcm"]["reason"].startswith("modality CT")
    assert results["broken/pydicom_dicomdir_CR1_6154_tiny.dcm"]["reason"].startswith("image too small")
    for name in ("nema-wg04_RG2_RLE_CR_hip_MONO2.dcm", "nema-wg04_RG3_RLE_CR_extremity_MONO1.dcm"):
        assert results[f"other_cr/{name}"]["reason"].startswith("body part"), name


def test_the_guard_refuses_the_dog_and_everything_that_is_not_a_chest_radiograph(
        results: dict[str, dict]) -> None:
    from triage.config import DEFAULT_CONFIG, load

    if load(DEFAULT_CONFIG).guard.onnx_path is None or _model() != load(DEFAULT_CONFIG).model.onnx_path:
        pytest.skip("the shipped guard and model are not configured")
    # A lateral radiograph of a dog, with no ViewPosition in its header.
    dog = results["chest/highdicom_dx_image_DX_thorax_MONO1.dcm"]
    assert dog["tier"] == "unscored" and dog["reason"].startswith("does not look like a frontal"), dog
    others = {k: r for k, r in results.items() if k.startswith("other_cr/")}
    assert others and all(r["tier"] == "unscored" and r["reason"] for r in others.values()), others
