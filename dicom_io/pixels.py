"""Decode a DICOM dataset's pixel data to a display-ready grey image.

The result is a float32 2-D array in [0, 1] in MONOCHROME2 sense (bright means
dense), after the modality LUT (rescale slope and intercept, or a Modality LUT
Sequence), the VOI transform (VOI LUT Sequence, else the first window with its
VOI LUT Function: LINEAR, LINEAR_EXACT or SIGMOID, else a robust percentile
window) and MONOCHROME1 inversion. The LUTs and windows are pydicom's own
functions; only the first frame of a multi-frame image is decoded. Nothing here
knows about models: :mod:`triage.imaging` takes over from the returned array.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut, apply_windowing

log = logging.getLogger(__name__)

# A robust fallback window: ignore the darkest and brightest 0.5% (collimator
# edges, burnt-in labels) so a handful of extreme pixels cannot flatten contrast.
DEFAULT_PERCENTILES = (0.5, 99.5)


class PixelDecodeError(ValueError):
    """Pixel data cannot be turned into a grey image; ``reason`` is a short text."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def raw_pixels(ds: Dataset) -> np.ndarray:
    """Return the stored pixel array of ``ds`` (first frame if multi-frame).

    Raises PixelDecodeError with a short reason when there is no pixel data or
    no decoder can read it.
    """
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise PixelDecodeError("no pixel data")
    try:
        ds.pixel_array_options(index=0)  # decode the first frame only
        arr = ds.pixel_array
    except Exception as e:  # decoders raise many types; all mean "cannot decode"
        log.debug("pixel decode failed: %s: %s", type(e).__name__, e)
        raise PixelDecodeError(f"pixel data cannot be decoded ({type(e).__name__})") from e
    return np.asarray(arr)


def window_percentile(x: np.ndarray, lower: float = DEFAULT_PERCENTILES[0],
                      upper: float = DEFAULT_PERCENTILES[1]) -> np.ndarray:
    """Return ``x`` scaled so its ``lower``..``upper`` percentiles map to 0..1, clipped.

    A constant image maps to zeros. Raises nothing.
    """
    lo, hi = np.percentile(x, [lower, upper])
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
        return np.zeros(x.shape, dtype=np.float32)
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def _window(x: np.ndarray, ds: Dataset) -> np.ndarray:
    """Apply the first window (pydicom's ``apply_windowing``) and scale its output to [0, 1].

    pydicom maps into the stored range (after rescale); two probes far below
    and above the window tell that range, whatever the VOI LUT Function.
    Raises ValueError (or TypeError) for an unusable window.
    """
    out = apply_windowing(x, ds)
    center, width = (_first(ds[k].value) for k in ("WindowCenter", "WindowWidth"))
    span = 64 * max(abs(width), 1.0)
    lo, hi = apply_windowing(np.array([center - span, center + span]), ds)
    if not hi > lo:
        raise ValueError("window maps to an empty range")
    return np.clip((out - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def _first(value: Any) -> float:
    """Return the first of a possibly multi-valued DICOM number."""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return float(value[0])
    return float(value)


def _voi(x: np.ndarray, ds: Dataset) -> np.ndarray:
    """Apply the dataset's VOI transform, or the percentile fallback; return [0, 1]."""
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence) > 0:
        item = ds.VOILUTSequence[0]
        # LUT lookup is by integer index; pydicom mis-indexes float input.
        out = apply_voi_lut(np.rint(x).astype(np.int64), ds, index=0,
                            prefer_lut=True).astype(np.float32)
        bits = int(item.LUTDescriptor[2]) if "LUTDescriptor" in item else 16
        top = float(2 ** bits - 1)
        return np.clip(out / top, 0.0, 1.0) if top > 0 else window_percentile(out)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        try:
            return _window(x, ds)
        except (ValueError, TypeError, IndexError, KeyError) as e:
            log.debug("unusable window, falling back to percentiles: %s", e)
    return window_percentile(x)


def decode(ds: Dataset) -> np.ndarray:
    """Return the image of ``ds`` as float32 (rows, columns) in [0, 1], MONOCHROME2 sense.

    Raises PixelDecodeError with a short reason ("no pixel data", "colour image",
    "pixel data cannot be decoded (...)") when no grey image can be produced.
    """
    arr = raw_pixels(ds)
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    if int(getattr(ds, "SamplesPerPixel", 1) or 1) != 1 or not photometric.startswith("MONO"):
        raise PixelDecodeError(f"colour image ({photometric})")
    if arr.ndim != 2:
        raise PixelDecodeError(f"unexpected pixel array shape {arr.shape}")
    try:
        x = np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)
    except Exception as e:  # a malformed LUT is a property of the data, not a bug
        raise PixelDecodeError(f"modality LUT cannot be applied ({type(e).__name__})") from e
    if not np.all(np.isfinite(x)):
        raise PixelDecodeError("pixel data has non-finite values")
    y = _voi(x, ds)
    if photometric == "MONOCHROME1":
        y = 1.0 - y
    return y.astype(np.float32)
