"""Which inputs the model may score: pure checks on header values and the decoded image.

Each check returns a short reason string (shown as "unscored: reason") or None
when the input passes. The model was trained on frontal chest radiographs for
presentation; anything else is outside its intended use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

ALLOWED_MODALITIES = ("CR", "DX", "SC")
FRONTAL_VIEWS = ("PA", "AP", "")
LATERAL_VIEWS = ("LL", "RL", "LAT", "LATERAL", "LLAT", "RLAT")
# SNOMED CT codes for lateral projections used in ViewCodeSequence.
LATERAL_CODES = ("399067008", "399173006", "399198007", "R-10232", "R-10236", "R-10230")
FOR_PROCESSING_SOP_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.1.1.1",  # Digital X-Ray Image - For Processing
    "1.2.840.10008.5.1.4.1.1.1.2.1",  # Digital Mammography - For Processing
    "1.2.840.10008.5.1.4.1.1.1.3.1",  # Digital Intra-Oral - For Processing
)
MIN_SIZE_PX = 128
# BodyPartExamined values (substrings) that mean the chest; anything else stated is rejected.
CHEST_BODY_PARTS = ("CHEST", "THORAX", "THORAC", "LUNG", "TORAX")


@dataclass(frozen=True)
class Header:
    """The header values gating needs, in snake_case; None where not stated."""

    modality: str | None
    view_position: str = ""
    view_code_lateral: bool = False
    presentation_intent: str = ""
    sop_class_uid: str = ""
    photometric: str = "MONOCHROME2"
    samples_per_pixel: int = 1
    has_pixels: bool = True
    rows: int = 0
    columns: int = 0
    body_part: str = ""


def _text(ds: Dataset, keyword: str) -> str:
    """Return an attribute as stripped upper-case text ('' when absent or unreadable)."""
    try:
        value: Any = ds.get(keyword, "")
    except Exception:  # noqa: BLE001 - a malformed element must not crash gating
        return ""
    return str(value if value is not None else "").strip().upper()


def _view_code_lateral(ds: Dataset) -> bool:
    """True when ViewCodeSequence names a lateral projection."""
    try:
        items = list(ds.get("ViewCodeSequence", []) or [])
    except Exception:  # noqa: BLE001 - a malformed sequence means "not stated"
        return False
    for item in items:
        code = str(item.get("CodeValue", "")).strip()
        meaning = str(item.get("CodeMeaning", "")).lower()
        if code in LATERAL_CODES or "lateral" in meaning:
            return True
    return False


def _int(ds: Dataset, keyword: str, default: int) -> int:
    """Return an integer attribute, or ``default`` when absent or malformed."""
    try:
        return int(ds.get(keyword, default) or default)
    except (TypeError, ValueError):
        return default


def header_from_dataset(ds: Dataset) -> Header:
    """Return the gating :class:`Header` of a dataset. Raises nothing."""
    samples = _int(ds, "SamplesPerPixel", 1)
    has_pixels = any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))
    return Header(
        modality=_text(ds, "Modality"),
        view_position=_text(ds, "ViewPosition"),
        view_code_lateral=_view_code_lateral(ds),
        presentation_intent=_text(ds, "PresentationIntentType"),
        sop_class_uid=_text(ds, "SOPClassUID"),
        photometric=_text(ds, "PhotometricInterpretation") or "MONOCHROME2",
        samples_per_pixel=samples,
        has_pixels=has_pixels,
        rows=_int(ds, "Rows", 0),
        columns=_int(ds, "Columns", 0),
        body_part=_text(ds, "BodyPartExamined"),
    )


def gate_header(h: Header, allowed_modalities: tuple[str, ...] = ALLOWED_MODALITIES,
                min_size: int = MIN_SIZE_PX) -> str | None:
    """Return why a dataset with header ``h`` must not be scored, or None.

    Checked before decoding, cheapest and most certain first. ``h.modality``
    None means an image file without a DICOM header: not checked.
    """
    if h.modality is not None and h.modality not in allowed_modalities:
        shown = h.modality or "missing"
        return f"modality {shown} is not {', '.join(allowed_modalities)}"
    if not h.has_pixels:
        return "no pixel data"
    if 0 < min(h.rows, h.columns) < min_size:
        return f"image too small for a radiograph ({h.rows}x{h.columns} < {min_size} px)"
    if h.body_part and not any(part in h.body_part for part in CHEST_BODY_PARTS):
        return f"body part {h.body_part} is not the chest"
    if h.view_position in LATERAL_VIEWS or (h.view_position == "" and h.view_code_lateral):
        return f"lateral view (ViewPosition {h.view_position or 'code'})"
    if h.view_position not in FRONTAL_VIEWS:
        return f"not a frontal view (ViewPosition {h.view_position})"
    if h.presentation_intent == "FOR PROCESSING" or h.sop_class_uid in FOR_PROCESSING_SOP_CLASSES:
        return "For Processing image"
    if h.samples_per_pixel != 1 or not h.photometric.startswith("MONOCHROME"):
        return f"colour image ({h.photometric})"
    return None


def gate_pixels(h: Header, pixels: np.ndarray, min_size: int = MIN_SIZE_PX) -> str | None:
    """Return why the decoded image ``pixels`` must not be scored, or None."""
    if pixels.ndim != 2:
        return "colour image"
    rows, cols = pixels.shape
    if min(rows, cols) < min_size:
        return f"image too small for a radiograph ({rows}x{cols} < {min_size} px)"
    if float(pixels.max()) - float(pixels.min()) <= 0:
        return "blank image (constant pixel values)"
    return None
