"""Checks a received data set must pass before it is stored. Pure functions."""

from __future__ import annotations

import dataclasses

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.uid import UID

from dicom_io import store_status as status
from dicom_io.header import Header, read_header
from dicom_io.store_status import Refusal


def _uid(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None or str(value).strip() == "":
        raise Refusal(status.BAD_UID, f"{keyword} is missing")
    uid = UID(str(value).strip())
    if not uid.is_valid:
        raise Refusal(status.BAD_UID, f"{keyword} is not a valid UID")
    return str(uid)


def _pixel_data_length(ds: Dataset) -> int:
    """Return Pixel Data's length in bytes without loading it when it was deferred."""
    elem = ds.get_item("PixelData", keep_deferred=True)
    if isinstance(elem, RawDataElement):
        return int(elem.length)
    return len(ds.PixelData)


def _native_pixel_bytes(ds: Dataset) -> int:
    rows, cols = int(ds.Rows), int(ds.Columns)
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    bits = int(ds.BitsAllocated)
    total_bits = rows * cols * spp * frames * bits
    return (total_bits + 7) // 8


def check(ds: Dataset, sop_class_uid: str, sop_instance_uid: str, compressed: bool,
          transfer_syntax: str | None = None, max_pixels: int | None = None) -> Header:
    """Validate ``ds`` against the C-STORE request and return its header.

    Raises Refusal with BAD_UID for missing or malformed UIDs (or a SOP
    Instance UID that differs from the request's), DATASET_MISMATCH when the
    data set is not the image its SOP class promises, and TOO_MANY_PIXELS when
    Rows x Columns x Frames exceeds ``max_pixels`` (a decompression bomb is
    refused from its header, before anything decodes it).
    """
    sop_uid = _uid(ds, "SOPInstanceUID")
    sop_class = _uid(ds, "SOPClassUID")
    study_uid = _uid(ds, "StudyInstanceUID")
    series_uid = _uid(ds, "SeriesInstanceUID")
    if sop_uid != str(sop_instance_uid).strip():
        raise Refusal(status.BAD_UID, "SOPInstanceUID differs from the request's Affected SOP Instance UID")
    if sop_class != str(sop_class_uid).strip():
        raise Refusal(status.DATASET_MISMATCH, "SOPClassUID differs from the request's Affected SOP Class UID")
    _check_image(ds, compressed, max_pixels)
    h = read_header(ds, transfer_syntax)
    # The UIDs as validated (read_header trims, _uid also checks the syntax).
    return dataclasses.replace(h, sop_class_uid=sop_class, sop_instance_uid=sop_uid,
                               study_uid=study_uid, series_uid=series_uid)


def _check_image(ds: Dataset, compressed: bool, max_pixels: int | None = None) -> None:
    missing = [k for k in ("Rows", "Columns", "BitsAllocated", "PhotometricInterpretation")
               if ds.get(k) in (None, "")]
    if "PixelData" not in ds:
        missing.append("PixelData")
    if missing:
        raise Refusal(status.DATASET_MISMATCH,
                      "image SOP class without required attribute(s): " + ", ".join(missing))
    try:
        expected = _native_pixel_bytes(ds)
    except (TypeError, ValueError) as e:
        raise Refusal(status.DATASET_MISMATCH, f"image pixel module is malformed: {e}") from e
    if expected <= 0:
        raise Refusal(status.DATASET_MISMATCH, "image has zero rows or columns")
    pixels = int(ds.Rows) * int(ds.Columns) * int(ds.get("NumberOfFrames", 1) or 1)
    if max_pixels is not None and pixels > max_pixels:
        raise Refusal(status.TOO_MANY_PIXELS, f"{int(ds.Rows)} x {int(ds.Columns)} pixels x "
                      f"{int(ds.get('NumberOfFrames', 1) or 1)} frame(s) exceeds the "
                      f"{max_pixels} pixel limit")
    if not compressed:
        got = _pixel_data_length(ds)
        if got < expected:
            raise Refusal(status.DATASET_MISMATCH,
                          f"Pixel Data is {got} bytes but the header implies {expected}")
