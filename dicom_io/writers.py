"""DICOM writers: conformant Part 10 image instances built from a pixel array.

``triage archive build`` writes its archives with :func:`image_dataset`; the
tests' synthetic studies (``tests/synth.py``) are built on it too.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    generate_uid,
)

CR_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1")
DX_PRESENTATION = UID("1.2.840.10008.5.1.4.1.1.1.1")
DX_PROCESSING = UID("1.2.840.10008.5.1.4.1.1.1.1.1")
SC_STORAGE = UID("1.2.840.10008.5.1.4.1.1.7")


@dataclass(frozen=True)
class ImageSpec:
    """What to put in the header of a grey radiograph built from a pixel array."""

    rows: int = 256
    columns: int = 256
    bits_stored: int = 12
    modality: str = "DX"
    sop_class_uid: str = DX_PRESENTATION
    photometric: str = "MONOCHROME2"
    view_position: str | None = "PA"
    patient_name: str = ""
    patient_id: str = ""
    accession_number: str = ""
    study_description: str = "CHEST PA"
    manufacturer: str = ""
    patient_age: str | None = None  # Age String, e.g. "004Y" or "045Y"
    window: tuple[float, float] | None = None  # (center, width)
    rescale: tuple[float, float] | None = None  # (slope, intercept)


def image_dataset(
    spec: ImageSpec,
    pixels: np.ndarray,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    when: _dt.datetime | None = None,
) -> Dataset:
    """Return a complete in-memory dataset (with file meta) in Explicit VR Little Endian.

    ``pixels`` must be uint16 (or uint8 for 8-bit) in MONOCHROME2 sense; for
    MONOCHROME1 the stored values are inverted here. Raises ValueError on a
    shape that does not match the spec.
    """
    arr = pixels
    if arr.shape != (spec.rows, spec.columns):
        raise ValueError(f"pixels shape {arr.shape} != ({spec.rows}, {spec.columns})")
    maxval = 2**spec.bits_stored - 1
    if spec.photometric == "MONOCHROME1":
        arr = (maxval - arr.astype(np.int32)).astype(arr.dtype)
    allocated = 8 if spec.bits_stored <= 8 else 16
    arr = arr.astype(np.uint8 if allocated == 8 else np.uint16)
    when = when or _dt.datetime(2026, 1, 5, 9, 30, 0)

    ds = Dataset()
    ds.SOPClassUID = spec.sop_class_uid
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.PatientName = spec.patient_name
    ds.PatientID = spec.patient_id
    ds.PatientSex = "O"
    if spec.patient_age is not None:
        ds.PatientAge = spec.patient_age
    ds.AccessionNumber = spec.accession_number
    ds.StudyDescription = spec.study_description
    ds.StudyDate = when.strftime("%Y%m%d")
    ds.StudyTime = when.strftime("%H%M%S")
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Modality = spec.modality
    ds.Manufacturer = spec.manufacturer
    ds.BodyPartExamined = "CHEST"
    if spec.view_position is not None:
        ds.ViewPosition = spec.view_position
    if spec.sop_class_uid in (DX_PRESENTATION, DX_PROCESSING):
        ds.PresentationIntentType = (
            "FOR PROCESSING" if spec.sop_class_uid == DX_PROCESSING else "FOR PRESENTATION"
        )
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = spec.photometric
    ds.Rows, ds.Columns = spec.rows, spec.columns
    ds.BitsAllocated = allocated
    ds.BitsStored = spec.bits_stored
    ds.HighBit = spec.bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelSpacing = [0.15, 0.15]
    if spec.window is not None:
        ds.WindowCenter, ds.WindowWidth = spec.window
    if spec.rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = spec.rescale
        ds.RescaleType = "US"
    ds.PixelData = arr.tobytes()

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    return ds


def write(ds: Dataset, path: str | Path) -> Path:
    """Write ``ds`` as a DICOM Part 10 file (preamble and file meta) and return the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(p, enforce_file_format=True)
    return p


def write_file(ds: Dataset, path: str | Path) -> Path:
    """Write ``ds`` as a DICOM Part 10 file (preamble and file meta) and return the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(p, enforce_file_format=True)
    return p
