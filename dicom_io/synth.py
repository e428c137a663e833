"""Synthetic DICOM instances for tests, benchmarks and archive building.

Builds real, conformant Part 10 datasets (file meta, UIDs, image pixel module)
from a numpy array or a generated phantom. Nothing here reads patient data.
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
class SynthSpec:
    """What to put in a synthetic radiograph; every field has a plausible default."""

    rows: int = 256
    columns: int = 256
    bits_stored: int = 12
    modality: str = "DX"
    sop_class_uid: str = DX_PRESENTATION
    photometric: str = "MONOCHROME2"
    view_position: str | None = "PA"
    patient_name: str = "SYNTHETIC^PATIENT"
    patient_id: str = "SYN0001"
    accession_number: str = "ACC0001"
    study_description: str = "CHEST PA"
    manufacturer: str = "triage-synth"
    patient_age: str | None = None  # Age String, e.g. "004Y" or "045Y"
    window: tuple[float, float] | None = None  # (center, width)
    rescale: tuple[float, float] | None = None  # (slope, intercept)
    seed: int = 0


def phantom(rows: int, columns: int, bits_stored: int = 12, seed: int = 0) -> np.ndarray:
    """Return a chest-like phantom: dark lungs in a brighter body, with noise.

    The result is uint16 in [0, 2**bits_stored - 1], MONOCHROME2 sense.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:rows, 0:columns].astype(np.float32)
    y, x = yy / max(rows - 1, 1), xx / max(columns - 1, 1)
    body = np.exp(-(((x - 0.5) / 0.42) ** 6 + ((y - 0.55) / 0.5) ** 6))
    lungs = sum(
        np.exp(-(((x - cx) / 0.14) ** 2 + ((y - 0.5) / 0.28) ** 2)) for cx in (0.32, 0.68)
    )
    img = 0.15 + 0.7 * body - 0.45 * lungs + rng.normal(0, 0.02, (rows, columns))
    maxval = 2**bits_stored - 1
    return (np.clip(img, 0, 1) * maxval).astype(np.uint16)


def make_dataset(
    spec: SynthSpec = SynthSpec(),
    pixels: np.ndarray | None = None,
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
    arr = phantom(spec.rows, spec.columns, spec.bits_stored, spec.seed) if pixels is None else pixels
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


def write_study(
    out_dir: str | Path, n_images: int = 1, spec: SynthSpec = SynthSpec(), study_uid: str | None = None
) -> list[Path]:
    """Write ``n_images`` instances of one study (one series) under ``out_dir``; return their paths."""
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    out = Path(out_dir)
    paths = []
    for i in range(n_images):
        ds = make_dataset(spec, study_uid=study_uid, series_uid=series_uid)
        ds.InstanceNumber = i + 1
        paths.append(write(ds, out / f"{ds.SOPInstanceUID}.dcm"))
    return paths
