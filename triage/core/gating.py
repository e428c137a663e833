"""Which inputs the model may score: pure checks on header values and the decoded image.

Each check returns a short reason string (shown as "unscored: reason") or None
when the input passes. The model was trained on frontal chest radiographs for
presentation; anything else is outside its intended use.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

ALLOWED_MODALITIES = ("CR", "DX", "SC")
FRONTAL_VIEWS = ("PA", "AP", "")
LATERAL_VIEWS = ("LL", "RL", "LAT", "LATERAL", "LLAT", "RLAT")
FOR_PROCESSING_SOP_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.1.1.1",  # Digital X-Ray Image - For Processing
    "1.2.840.10008.5.1.4.1.1.1.2.1",  # Digital Mammography - For Processing
    "1.2.840.10008.5.1.4.1.1.1.3.1",  # Digital Intra-Oral - For Processing
)
MIN_SIZE_PX = 128
# BodyPartExamined values (substrings) that mean the chest; anything else stated is rejected.
CHEST_BODY_PARTS = ("CHEST", "THORAX", "THORAC", "LUNG", "TORAX")


class GateHeader(Protocol):
    """The header values gating reads (``dicom_io.header.Header`` has them all).

    Text values are upper case and '' when not stated; ``modality`` None means
    an image file without a DICOM header.
    """

    @property
    def modality(self) -> str | None: ...
    @property
    def view_position(self) -> str: ...
    @property
    def view_code_lateral(self) -> bool: ...
    @property
    def presentation_intent(self) -> str: ...
    @property
    def sop_class_uid(self) -> str: ...
    @property
    def photometric(self) -> str: ...
    @property
    def samples_per_pixel(self) -> int: ...
    @property
    def has_pixels(self) -> bool: ...
    @property
    def rows(self) -> int: ...
    @property
    def columns(self) -> int: ...
    @property
    def body_part(self) -> str: ...


def gate_header(h: GateHeader, allowed_modalities: tuple[str, ...] = ALLOWED_MODALITIES,
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


def gate_pixels(pixels: np.ndarray, min_size: int = MIN_SIZE_PX) -> str | None:
    """Return why the decoded image ``pixels`` must not be scored, or None."""
    if pixels.ndim != 2:
        return "colour image"
    rows, cols = pixels.shape
    if min(rows, cols) < min_size:
        return f"image too small for a radiograph ({rows}x{cols} < {min_size} px)"
    if float(pixels.max()) - float(pixels.min()) <= 0:
        return "blank image (constant pixel values)"
    return None


def format_age(years: float) -> str:
    """Return an age as a radiologist reads it: "45 y", "18 mo" under two, "10 d" under a month."""
    if years >= 2:
        return f"{int(years)} y"
    if years * 12 >= 1:
        return f"{int(years * 12)} mo"
    return f"{int(round(years * 365.25))} d"


def gate_population(age_years: float | None, low: float, high: float, label: str) -> str | None:
    """Return why a patient of ``age_years`` is outside the model's population [low, high], or None.

    An unknown age (None) passes: the image check decides then. ``high`` is
    inclusive of the whole year (a population up to 17 takes 17.9-year-olds).
    """
    if age_years is None or low <= age_years < high + 1:
        return None
    return f"outside the model's population: {format_age(age_years)} (model: {label})"
