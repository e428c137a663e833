"""Read a DICOM file from disk into a pydicom Dataset, turning failures into a reason."""

from __future__ import annotations

import logging
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicom_io.pixels import PixelDecodeError

log = logging.getLogger(__name__)


def _parsed_syntax(ds: Dataset) -> UID:
    """Return the uncompressed transfer syntax matching how pydicom parsed ``ds``."""
    implicit, little = getattr(ds, "original_encoding", (True, True))
    if implicit is None or implicit:
        return ImplicitVRLittleEndian
    return ExplicitVRLittleEndian if little in (None, True) else ExplicitVRBigEndian


def read_dataset(path: str | Path) -> Dataset:
    """Return the dataset in ``path``, tolerating a missing preamble or file meta.

    A file without a Transfer Syntax UID gets the uncompressed syntax its
    elements were actually parsed with, so its native pixel data can be decoded.
    Raises PixelDecodeError("not a readable DICOM file") when pydicom cannot parse it.
    """
    try:
        ds = pydicom.dcmread(path, force=True)
        ds.PixelData if "PixelData" in ds else None  # noqa: B018 - force a full parse
        if "SOPClassUID" not in ds and "Modality" not in ds and "PixelData" not in ds:
            raise ValueError("no DICOM attributes found")
    except Exception as e:  # pydicom raises many types on damaged input
        log.debug("cannot read %s: %s: %s", path, type(e).__name__, e)
        raise PixelDecodeError(f"not a readable DICOM file ({type(e).__name__})") from e
    meta = getattr(ds, "file_meta", None)
    if meta is None or "TransferSyntaxUID" not in meta:
        ds.file_meta = meta if meta is not None else pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = _parsed_syntax(ds)
    return ds
