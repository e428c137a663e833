"""dicom_io.header: the one reading of a header, tolerant of malformed values."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset

from dicom_io.header import age_from_dates, age_years, read_header
from tests.synth import SynthSpec, make_dataset


def test_age_strings_parse_to_years() -> None:
    assert age_years("045Y") == 45 and age_years("006M") == 0.5
    assert age_years("") is None and age_years("45Y") is None and age_years("045X") is None


def test_age_falls_back_to_birth_date_and_study_date() -> None:
    assert age_from_dates("20200105", "20250105") == pytest.approx(5.0, abs=0.01)
    assert age_from_dates("20250106", "20250105") is None  # born after the study
    assert age_from_dates("garbage", "20250105") is None
    ds = make_dataset(SynthSpec())
    ds.PatientBirthDate, ds.StudyDate = "19800301", "20250301"
    assert read_header(ds).age_years == pytest.approx(45.0, abs=0.01)
    ds.PatientAge = "004Y"  # the stated age wins
    assert read_header(ds).age_years == 4


def test_header_reads_every_field_triage_uses() -> None:
    ds = make_dataset(SynthSpec(rows=300, columns=200, bits_stored=14, view_position="AP",
                                patient_age="003Y"))
    h = read_header(ds)
    assert (h.study_uid, h.sop_instance_uid) == (ds.StudyInstanceUID, ds.SOPInstanceUID)
    assert (h.rows, h.columns, h.bits_stored, h.view_position) == (300, 200, 14, "AP")
    assert (h.modality, h.photometric, h.has_pixels) == ("DX", "MONOCHROME2", True)
    assert h.study_fields()["accession_number"] == "ACC0001"
    assert h.study_fields()["patient_age"] == "003Y"
    assert h.metadata()["patient_age_years"] == 3 and h.metadata()["pixel_spacing"] == "0.15\\0.15"
    assert h.transfer_syntax == "1.2.840.10008.1.2.1"


def test_malformed_or_missing_values_read_as_absent() -> None:
    ds = Dataset()
    ds.add_new(0x00280010, "US", "not a number")  # Rows
    h = read_header(ds)
    assert (h.rows, h.modality, h.study_uid, h.has_pixels) == (0, "", "", False)
    assert h.age_years is None and h.view_position == ""
