"""Synthetic DICOM for tests and benchmarks: a chest-like phantom in conformant instances.

Test data, not product code: the instances are built with the product's own
writer (:mod:`dicom_io.writers`). Nothing here reads patient data.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicom_io.writers import (
    CR_STORAGE,
    DX_PRESENTATION,
    DX_PROCESSING,
    SC_STORAGE,
    ImageSpec,
    image_dataset,
    write_file,
)

__all__ = ["CR_STORAGE", "DX_PRESENTATION", "DX_PROCESSING", "SC_STORAGE", "SynthSpec",
           "make_dataset", "phantom", "write", "write_study"]


@dataclass(frozen=True)
class SynthSpec(ImageSpec):
    """A synthetic radiograph's header; every field has a plausible default."""

    patient_name: str = "SYNTHETIC^PATIENT"
    patient_id: str = "SYN0001"
    accession_number: str = "ACC0001"
    manufacturer: str = "triage-synth"
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
    """Return an in-memory instance of ``spec``, with the phantom as pixels unless given."""
    arr = phantom(spec.rows, spec.columns, spec.bits_stored, spec.seed) if pixels is None else pixels
    return image_dataset(spec, arr, study_uid, series_uid, sop_uid, when)


def write(ds: Dataset, path: str | Path) -> Path:
    """Write ``ds`` as a Part 10 file and return the path."""
    return write_file(ds, path)


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
