"""A heatmap overlay as a Secondary Capture image, captioned "NOT FOR DIAGNOSIS" in its pixels.

The overlay is an RGB picture (a radiograph with a colour heatmap blended over
it), so it is stored as what it is: a derived, synthetic Secondary Capture
image in the source image's study, referencing the source image. The caption
is burned into a black band above the picture, where every viewer shows it;
Burned In Annotation says so. Why not a Presentation State: see
docs/conformance.md.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from dicom_io.sr import MANUFACTURER, evidence_header
from dicom_io.stamps import stamp

CAPTION = "NOT FOR DIAGNOSIS"
_BIPED = {"A", "P", "R", "L", "H", "F"}


@dataclass(frozen=True)
class OverlayIds:
    """The overlay's identity, fixed before it is built (and before any send)."""

    series_uid: str
    sop_instance_uid: str
    series_number: int
    instance_number: int
    when: _dt.datetime


def captioned(rgb: np.ndarray, lines: Sequence[str]) -> np.ndarray:
    """Return ``rgb`` (H, W, 3 uint8) below a black band holding ``CAPTION`` and ``lines``.

    The band's text scales with the image width. Raises ValueError for an
    array that is not RGB.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"an overlay must be RGB (H, W, 3), got shape {rgb.shape}")
    width = rgb.shape[1]
    size = max(10, width // 32)
    font = ImageFont.load_default(size=size)
    texts = [CAPTION, *lines]
    band = (size + size // 2) * len(texts) + size // 2
    canvas = Image.new("RGB", (width, rgb.shape[0] + band), (0, 0, 0))
    canvas.paste(Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)), (0, band))
    draw = ImageDraw.Draw(canvas)
    for i, text in enumerate(texts):
        draw.text((size // 2, size // 4 + i * (size + size // 2)), text,
                  fill=(255, 255, 0) if i == 0 else (255, 255, 255), font=font)
    return np.asarray(canvas, dtype=np.uint8)


def _orientation(source: Dataset) -> tuple[str, str] | None:
    value = source.get("PatientOrientation")
    if value is None or isinstance(value, str) or len(value) != 2:
        return None
    row, col = (str(v) for v in value)
    return (row, col) if set(row + col) <= _BIPED and row and col else None


def build_overlay(source: Dataset, rgb: np.ndarray, lines: Sequence[str], ids: OverlayIds,
                  software: str, description: str) -> Dataset:
    """Return the overlay of one source image as a Secondary Capture instance (with file meta).

    ``source`` is the source image's header: the overlay joins its study,
    copies its patient and study modules and references it in the Source Image
    Sequence. ``rgb`` is the blended picture, ``lines`` the caption under
    "NOT FOR DIAGNOSIS", ``description`` the series description. Raises
    ValueError when the picture is not RGB.
    """
    pixels = captioned(rgb, lines)
    ref = evidence_header(source)
    orientation = _orientation(ref)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref, pixels, "RGB", 8, "PATIENT", ids.series_uid, ids.series_number,
        ids.sop_instance_uid, ids.instance_number, MANUFACTURER,
        patient_orientation=orientation or ("L", "F"), transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=description[:64], software_versions=software)
    if orientation is None:
        sc.PatientOrientation = []  # unknown in the source: Type 2, so empty rather than made up
    sc.ConversionType = "SYN"  # a synthetic image computed from the source, not a digitised one
    sc.BurnedInAnnotation = "YES"
    sc.BodyPartExamined = str(ref.get("BodyPartExamined") or "CHEST")[:16]
    if ref.get("Laterality"):
        sc.Laterality = ref.Laterality
    sc.ImageComments = f"{CAPTION}: {' '.join(lines)}"[:10240]
    sc.DerivationDescription = (f"Heatmap overlay computed by {software}; {CAPTION.lower()}")[:1024]
    item = Dataset()
    item.ReferencedSOPClassUID = ref.SOPClassUID
    item.ReferencedSOPInstanceUID = ref.SOPInstanceUID
    sc.SourceImageSequence = [item]
    stamp(sc, ids.when)
    return sc
