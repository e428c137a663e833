"""The one reading of a DICOM header: every keyword triage uses, as plain values.

Ingest (grouping and display), gating, the drift watch, replay and recovery all
read the same :class:`Header`, so they cannot disagree about what a header
says. Reading never raises: a malformed element reads as absent, and the
callers decide what an absent value means (ingest refuses missing UIDs,
gating treats a missing view as not stated).
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import asdict, dataclass
from typing import Any

from pydicom.dataset import Dataset

IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
# SNOMED CT (and the retired SNOMED RT) codes of lateral projections in ViewCodeSequence.
LATERAL_CODES = ("399067008", "399173006", "399198007", "R-10232", "R-10236", "R-10230")
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# DICOM Age String units, in years.
AGE_UNITS = {"Y": 1.0, "M": 12.0, "W": 52.1775, "D": 365.25}


def text_value(value: Any) -> str | None:
    """Return a header value as stripped text, or None when empty."""
    if value is None:
        return None
    s = str(value).strip()
    return s or None


def _get(ds: Dataset, keyword: str) -> Any:
    try:
        return ds.get(keyword)
    except Exception:  # a malformed element (bad VR, bad length) reads as absent
        return None


def _text(ds: Dataset, keyword: str, limit: int = 324) -> str | None:
    v = text_value(_get(ds, keyword))
    return v[:limit] if v else None


def _upper(ds: Dataset, keyword: str) -> str:
    return (_text(ds, keyword) or "").upper()


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        v = _get(ds, keyword)
        return None if v in (None, "") else int(v)
    except (TypeError, ValueError):
        return None


def _multi(ds: Dataset, keyword: str) -> str | None:
    v = _get(ds, keyword)
    if v is None or v == "":
        return None
    try:
        return "\\".join(str(x) for x in v) if not isinstance(v, (str, bytes)) else str(v)
    except TypeError:
        return str(v)


def _view_code_lateral(ds: Dataset) -> bool:
    try:
        items = list(_get(ds, "ViewCodeSequence") or [])
        for item in items:
            code = str(item.get("CodeValue", "")).strip()
            meaning = str(item.get("CodeMeaning", "")).lower()
            if code in LATERAL_CODES or "lateral" in meaning:
                return True
    except Exception:  # a malformed sequence means "not stated"
        return False
    return False


def age_years(value: Any) -> float | None:
    """Return a DICOM Age String ('045Y', '006M', '010W', '003D') in years, or None."""
    s = str(value or "").strip().upper()
    if len(s) != 4 or not s[:3].isdigit() or s[3] not in AGE_UNITS:
        return None
    return int(s[:3]) / AGE_UNITS[s[3]]


def parse_date(value: str | None) -> _dt.date | None:
    """Return a DICOM DA ('YYYYMMDD') as a date, or None when absent or invalid."""
    s = (value or "").strip()
    try:
        return _dt.datetime.strptime(s[:8], "%Y%m%d").date() if len(s) >= 8 else None
    except ValueError:
        return None


def age_from_dates(birth: str | None, on: str | None) -> float | None:
    """Return the age in years on date ``on`` of someone born on ``birth`` (both DICOM DA)."""
    b, d = parse_date(birth), parse_date(on)
    if b is None or d is None or d < b:
        return None
    return (d - b).days / 365.25


@dataclass(frozen=True)
class Header:
    """What triage reads from one DICOM header; None (or '') where the header does not say.

    ``modality`` None means "no DICOM header at all" (a PNG or JPEG file).
    """

    sop_class_uid: str = ""
    sop_instance_uid: str = ""
    study_uid: str = ""
    series_uid: str = ""
    transfer_syntax: str = IMPLICIT_VR_LITTLE_ENDIAN
    accession_number: str | None = None
    patient_name: str | None = None
    patient_id: str | None = None
    patient_sex: str | None = None
    patient_age: str | None = None  # the Age String as sent, e.g. "004Y"
    patient_birth_date: str | None = None
    study_date: str | None = None
    study_time: str | None = None
    study_description: str | None = None
    modality: str | None = None
    manufacturer: str | None = None
    body_part: str = ""
    view_position: str = ""
    view_code_lateral: bool = False
    presentation_intent: str = ""
    photometric: str = "MONOCHROME2"
    samples_per_pixel: int = 1
    rows: int = 0
    columns: int = 0
    bits_stored: int | None = None
    pixel_spacing: str | None = None
    number_of_frames: int = 1
    has_pixels: bool = True

    @property
    def age_years(self) -> float | None:
        """Age at the study in years: PatientAge, else PatientBirthDate with StudyDate."""
        a = age_years(self.patient_age)
        return a if a is not None else age_from_dates(self.patient_birth_date, self.study_date)

    def study_fields(self) -> dict[str, str | None]:
        """Return the study-level values the database keeps for grouping and display."""
        return {k: getattr(self, k) for k in STUDY_FIELDS}

    def metadata(self) -> dict[str, Any]:
        """Return the per-image acquisition metadata the drift watch compares."""
        return {"manufacturer": self.manufacturer, "photometric": self.photometric,
                "bits_stored": self.bits_stored, "rows": self.rows or None,
                "columns": self.columns or None, "pixel_spacing": self.pixel_spacing,
                "view_position": self.view_position or None,
                "transfer_syntax": self.transfer_syntax, "patient_age_years": self.age_years}

    def to_dict(self) -> dict[str, Any]:
        """Return every field as a JSON-ready dict."""
        return asdict(self)


STUDY_FIELDS = ("accession_number", "patient_name", "patient_id", "patient_sex", "patient_age",
                "study_date", "study_time", "study_description", "modality")


def transfer_syntax_of(ds: Dataset) -> str:
    """Return the dataset's transfer syntax UID (implicit VR little endian when unstated)."""
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    return str(ts) if ts else IMPLICIT_VR_LITTLE_ENDIAN


def read_header(ds: Dataset, transfer_syntax: str | None = None) -> Header:
    """Return the :class:`Header` of a dataset. Raises nothing."""
    return Header(
        sop_class_uid=_text(ds, "SOPClassUID", 64) or "",
        sop_instance_uid=_text(ds, "SOPInstanceUID", 64) or "",
        study_uid=_text(ds, "StudyInstanceUID", 64) or "",
        series_uid=_text(ds, "SeriesInstanceUID", 64) or "",
        transfer_syntax=transfer_syntax or transfer_syntax_of(ds),
        accession_number=_text(ds, "AccessionNumber", 64),
        patient_name=_text(ds, "PatientName"),
        patient_id=_text(ds, "PatientID", 64),
        patient_sex=_text(ds, "PatientSex", 16),
        patient_age=_text(ds, "PatientAge", 16),
        patient_birth_date=_text(ds, "PatientBirthDate", 16),
        study_date=_text(ds, "StudyDate", 8),
        study_time=_text(ds, "StudyTime", 16),
        study_description=_text(ds, "StudyDescription", 64),
        modality=_upper(ds, "Modality"),
        manufacturer=_text(ds, "Manufacturer", 64),
        body_part=_upper(ds, "BodyPartExamined"),
        view_position=_upper(ds, "ViewPosition"),
        view_code_lateral=_view_code_lateral(ds),
        presentation_intent=_upper(ds, "PresentationIntentType"),
        photometric=_upper(ds, "PhotometricInterpretation") or "MONOCHROME2",
        samples_per_pixel=_int(ds, "SamplesPerPixel") or 1,
        rows=_int(ds, "Rows") or 0,
        columns=_int(ds, "Columns") or 0,
        bits_stored=_int(ds, "BitsStored"),
        pixel_spacing=_multi(ds, "PixelSpacing"),
        number_of_frames=_int(ds, "NumberOfFrames") or 1,
        has_pixels=any(k in ds for k in PIXEL_KEYWORDS),
    )


def read_file_header(path: Any, transfer_syntax: str | None = None) -> Header | None:
    """Return the header of a DICOM file (pixels are not read), or None if it is unreadable."""
    from pydicom import dcmread

    try:
        ds = dcmread(path, stop_before_pixels=True, force=True)
    except Exception:  # pydicom raises many types on damaged input
        return None
    return read_header(ds, transfer_syntax)
