"""`triage archive build`: a realistic, deterministic, labelled DICOM archive from images."""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless

from dicom_io.pixels import decode
from tests.model_fixtures import write_dataset
from triage.cli import main
from triage.replay import synthetic as archive
from triage.replay.archive import scan_archive

MATRIX = 192


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images")
    write_dataset(root, n_train=2, n_val=10)
    return root


@pytest.fixture(scope="module")
def built(images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("arch") / "a"
    assert main(["archive", "build", "--images", str(images), "--out", str(out), "--split", "val",
                 "--matrix", str(MATRIX), "--seed", "11", "--per-day", "4"]) == 0
    return out


def _files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.dcm"))


def test_labels_csv_lists_one_study_per_image_of_the_split(built: Path, images: Path) -> None:
    with (built / "labels.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["split"] for r in rows] == ["val"] * 10
    with (images / "manifest.csv").open() as fh:
        truth = {r["path"]: r["label"] for r in csv.DictReader(fh)}
    assert all(r["label"] == truth[r["source"]] for r in rows)
    studies, skipped = scan_archive(built)
    assert sorted(s.study_uid for s in studies) == sorted(r["StudyInstanceUID"] for r in rows)
    assert [s.reason for s in skipped] == ["not DICOM (.csv file)"]
    by_uid = {s.study_uid: s for s in studies}
    assert all(by_uid[r["StudyInstanceUID"]].accession_number == r["AccessionNumber"] for r in rows)


def test_hierarchy_and_plausible_synthetic_headers(built: Path) -> None:
    for path in _files(built):
        ds = dcmread(path, stop_before_pixels=True)
        patient, study, series = path.parts[-4:-1]
        assert patient == f"P{ds.PatientID[3:]}" and series == f"SE{ds.SeriesNumber}"
        assert study.startswith("ST")
        assert str(ds.PatientName).startswith("SYNTHETIC^") and ds.PatientID.startswith("SYN")
        assert ds.Modality in ("CR", "DX") and ds.PatientSex in ("F", "M")
        assert ds.Rows == MATRIX and ds.BodyPartExamined == "CHEST"
        when = dt.datetime.strptime(ds.StudyDate + ds.StudyTime, "%Y%m%d%H%M%S")
        assert when.weekday() < 5 and 8 <= when.hour < 18
        assert ds.ViewPosition in (("LL",) if ds.SeriesNumber == 2 else ("PA", "AP"))


def test_every_image_decodes_to_its_source_picture(built: Path, images: Path) -> None:
    with (built / "labels.csv").open() as fh:
        source = {r["StudyInstanceUID"]: images / r["source"] for r in csv.DictReader(fh)}
    for path in _files(built):
        ds = dcmread(path)
        if ds.SeriesNumber != 1:
            continue
        grey = decode(ds)  # modality LUT, VOI, MONOCHROME1 inversion
        with Image.open(source[ds.StudyInstanceUID]) as im:
            src = np.asarray(im.convert("L").resize((ds.Columns, ds.Rows), Image.BICUBIC), float)
        r = np.corrcoef(grey.ravel(), src.ravel())[0, 1]
        assert r > 0.98, (path, ds.PhotometricInterpretation, r)


def test_plans_cover_the_realistic_variations() -> None:
    when = dt.datetime(2025, 1, 6, 9)
    plans = [archive.plan(k, 0, 2048, when) for k in range(300)]
    assert {p.syntax for p in plans} == set(archive.SYNTAXES)
    assert {p.photometric for p in plans} == {"MONOCHROME1", "MONOCHROME2"}
    assert {p.modality for p in plans} == {"CR", "DX"}
    assert {p.bits_stored for p in plans} <= set(range(12, 17)) and len({p.bits_stored for p in plans}) > 2
    assert {p.voi for p in plans} == {"none", "window", "lut"}
    assert 0.1 < np.mean([p.lateral for p in plans]) < 0.3
    assert all(p.rows == 2048 and p.columns % 2 == 0 for p in plans)


def test_a_larger_archive_mixes_syntaxes_photometrics_and_decoys(images: Path, tmp_path: Path) -> None:
    out = tmp_path / "mix"
    archive.build(archive.BuildOptions(images, images / "manifest.csv", out, matrix=160, seed=4))
    files = [dcmread(p) for p in _files(out)]
    syntaxes = Counter(str(ds.file_meta.TransferSyntaxUID) for ds in files)
    assert set(syntaxes) == {ExplicitVRLittleEndian, JPEGLSLossless, JPEG2000Lossless}
    assert {ds.PhotometricInterpretation for ds in files} == {"MONOCHROME1", "MONOCHROME2"}
    assert any(ds.SeriesNumber == 2 for ds in files)  # lateral decoys
    assert any("WindowCenter" in ds or "VOILUTSequence" in ds for ds in files)
    for ds in files:
        if ds.PhotometricInterpretation == "MONOCHROME1" and ds.SeriesNumber == 1:
            raw = ds.pixel_array.astype(float)
            # stored inverted: the (dark) lungs hold high stored values
            h, w = raw.shape
            lungs = raw[h // 3: 2 * h // 3, w // 4: w // 3].mean()
            body = raw[h // 3: 2 * h // 3, w // 2 - 4: w // 2 + 4].mean()
            assert lungs > body


def test_same_seed_gives_identical_files_and_another_seed_does_not(images: Path, built: Path,
                                                                    tmp_path: Path) -> None:
    again = tmp_path / "again"
    archive.build(archive.BuildOptions(images, images / "manifest.csv", again, split="val",
                                       matrix=MATRIX, seed=11, per_day=4))

    def digest(root: Path) -> dict[str, str]:
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file()}

    assert digest(again) == digest(built)
    other = tmp_path / "other"
    archive.build(archive.BuildOptions(images, images / "manifest.csv", other, split="val",
                                       matrix=MATRIX, seed=12, limit=3))
    assert len(list(csv.DictReader((other / "labels.csv").open()))) == 3
    assert not set(digest(other).values()) & set(digest(built).values())


def test_arrivals_fill_working_days_in_order() -> None:
    slots = archive.working_slots(7, dt.date(2025, 1, 10), 3, np.random.default_rng(0))  # a Friday
    assert [s.date() for s in slots] == [dt.date(2025, 1, 10)] * 3 + [dt.date(2025, 1, 13)] * 3 + [
        dt.date(2025, 1, 14)]
    assert slots == sorted(slots)


def test_bad_manifest_is_a_one_line_error(images: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("path,label\nx.png,2\n")
    assert main(["archive", "build", "--images", str(images), "--manifest", str(bad),
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "label '2'" in err and "\n" not in err
    sums = tmp_path / "sums.csv"
    sums.write_text(f"path,label,split,sha256\nval/NORMAL/img000.png,0,val,{'0' * 64}\n")
    assert main(["archive", "build", "--images", str(images), "--manifest", str(sums),
                 "--out", str(tmp_path / "o2")]) == 2
    assert "sha256" in capsys.readouterr().err


def test_no_age_leaves_every_age_out_of_the_headers(images: Path, tmp_path: Path) -> None:
    out = tmp_path / "no-age"
    archive.build(archive.BuildOptions(images, images / "manifest.csv", out, split="val",
                                       matrix=160, seed=2, ages=False))
    files = [f for f in out.rglob("*.dcm")]
    assert files
    for f in files:
        ds = dcmread(f, stop_before_pixels=True)
        assert "PatientAge" not in ds and "PatientBirthDate" not in ds
        assert ds.PatientID.startswith("SYN")
