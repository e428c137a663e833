"""Decode a DICOM dataset's pixel data to a display-ready grey image.

The result is a float32 2-D array in [0, 1] in MONOCHROME2 sense (bright means
dense), after the modality LUT (rescale slope and intercept, or a Modality LUT
Sequence), the VOI transform (VOI LUT Sequence, else the first window with its
VOI LUT Function: LINEAR, LINEAR_EXACT or SIGMOID, else a robust percentile
window) and MONOCHROME1 inversion. The LUTs and windows are pydicom's own
functions; only the first frame of a multi-frame image is decoded. Nothing here
knows about models: :mod:`triage.imaging` takes over from the returned array.

A caller that needs only a smaller image (a 144-pixel network, a 512-pixel
display copy) says so with ``min_side``: the stored pixels are then box-averaged
by an integer factor before any LUT or window touches them, so those run on a
sixteenth of a 2048-pixel radiograph; and a JPEG 2000 stream is decoded at a
reduced resolution level (its wavelet's low-pass band) instead of at full size
and averaged afterwards, a tenth of the decoding time.
"""

from __future__ import annotations

import io
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


# JPEG 2000 (lossless only, and lossy): Pillow's OpenJPEG can stop at a reduced resolution.
J2K_SYNTAXES = ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91")


def box_average(arr: np.ndarray, k: int) -> np.ndarray:
    """Return the mean of each k x k block of the last two axes (edges padded by replication),
    as float32. ``k`` below 2 returns ``arr`` unchanged."""
    a = np.asarray(arr)
    if k < 2:
        return a
    h, w = a.shape[-2:]
    ph, pw = (-h) % k, (-w) % k
    if ph or pw:
        a = np.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, ph), (0, pw)], mode="edge")
    shape = (*a.shape[:-2], a.shape[-2] // k, k, a.shape[-1] // k, k)
    return a.reshape(shape).mean(axis=(-3, -1), dtype=np.float32)


def reduction(shape: tuple[int, ...], min_side: int | None) -> int:
    """Return the largest integer factor that keeps the short side of ``shape`` (the last two
    axes) at least ``min_side`` (1 when there is nothing to gain, or no ``min_side``)."""
    if not min_side:
        return 1
    return max(1, min(shape[-2:]) // min_side)


def shrink(arr: np.ndarray, min_side: int | None) -> np.ndarray:
    """Box-average ``arr`` by :func:`reduction` (unchanged when that is 1)."""
    return box_average(arr, reduction(np.shape(arr), min_side))


def _j2k_siz(stream: bytes) -> tuple[int, int, int] | None:
    """Return (components, precision, signed) from a JPEG 2000 codestream's SIZ marker."""
    start = stream.find(b"\xff\x4f\xff\x51")  # SOC then SIZ: the codestream's start
    if start < 0 or len(stream) < start + 43:
        return None
    start += 2
    comps = int.from_bytes(stream[start + 38:start + 40], "big")
    ssiz = stream[start + 40]
    return comps, (ssiz & 0x7F) + 1, ssiz >> 7


def _j2k_reduced(ds: Dataset, min_side: int) -> np.ndarray | None:
    """Return the first frame of a JPEG 2000 image decoded at the coarsest resolution level whose
    short side is still at least ``min_side``, in stored values; None when that does not apply
    (not JPEG 2000, nothing to gain, colour, signed or unusual precision): decode in full then."""
    meta = getattr(ds, "file_meta", None)
    if meta is None or str(meta.get("TransferSyntaxUID", "")) not in J2K_SYNTAXES:
        return None
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        bits, signed = int(ds.BitsStored), int(getattr(ds, "PixelRepresentation", 0) or 0)
    except (AttributeError, TypeError, ValueError):
        return None
    level = 0
    while min(-(-rows // 2 ** (level + 1)), -(-cols // 2 ** (level + 1))) >= min_side:
        level += 1
    if level == 0 or signed or int(getattr(ds, "SamplesPerPixel", 1) or 1) != 1:
        return None
    if "ModalityLUTSequence" in ds:  # a table must see stored values, not averaged ones
        return None
    from PIL import Image
    from pydicom.encaps import generate_frames

    try:
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        stream = next(generate_frames(ds.PixelData, number_of_frames=frames))
        siz = _j2k_siz(stream)
        if siz is None or siz[0] != 1 or siz[2] or siz[1] != bits or not 1 <= bits <= 16:
            return None
        with Image.open(io.BytesIO(stream)) as im:
            # The JPEG 2000 plugin's setter: OpenJPEG skips the finest `level` resolution levels.
            im.reduce = level  # type: ignore[method-assign,assignment]
            im.load()
            arr = np.asarray(im)
    except Exception as e:  # then the full decoder has its say (and its error message)
        log.debug("reduced JPEG 2000 decode failed: %s: %s", type(e).__name__, e)
        return None
    if arr.ndim != 2:
        return None
    if bits > 8 and arr.dtype == np.uint16:
        # Pillow widens precisions above 8 bits to 16 by a left shift: undo it, and decode in
        # full should a Pillow ever hand over stored values (or something else) instead.
        low = (1 << (16 - bits)) - 1
        if low and np.any(arr & low):
            return arr if int(arr.max()) < (1 << bits) else None
        return arr >> (16 - bits)
    return arr


def raw_pixels(ds: Dataset, min_side: int | None = None) -> np.ndarray:
    """Return the stored pixel array of ``ds`` (first frame if multi-frame).

    With ``min_side``, a JPEG 2000 image may come back at a reduced resolution
    (short side still at least ``min_side``; see :func:`_j2k_reduced`).
    Raises PixelDecodeError with a short reason when there is no pixel data or
    no decoder can read it.
    """
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise PixelDecodeError("no pixel data")
    if min_side:
        reduced = _j2k_reduced(ds, min_side)
        if reduced is not None:
            return reduced
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


def decode(ds: Dataset, min_side: int | None = None) -> np.ndarray:
    """Return the image of ``ds`` as float32 (rows, columns) in [0, 1], MONOCHROME2 sense.

    With ``min_side`` the image is reduced first (see the module's docstring): its
    short side is then between ``min_side`` and twice that, or the image's own
    when smaller. Raises PixelDecodeError with a short reason ("no pixel data",
    "colour image", "pixel data cannot be decoded (...)") when no grey image can
    be produced.
    """
    arr = raw_pixels(ds, min_side)
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    if int(getattr(ds, "SamplesPerPixel", 1) or 1) != 1 or not photometric.startswith("MONO"):
        raise PixelDecodeError(f"colour image ({photometric})")
    if arr.ndim != 2:
        raise PixelDecodeError(f"unexpected pixel array shape {arr.shape}")
    # A rescale is linear, so averaging may come first; a Modality LUT Sequence may not be.
    table = "ModalityLUTSequence" in ds
    if not table:
        arr = shrink(arr, min_side)
    try:
        x = np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)
    except Exception as e:  # a malformed LUT is a property of the data, not a bug
        raise PixelDecodeError(f"modality LUT cannot be applied ({type(e).__name__})") from e
    if table:
        x = shrink(x, min_side)
    if not np.all(np.isfinite(x)):
        raise PixelDecodeError("pixel data has non-finite values")
    y = _voi(x, ds)
    if photometric == "MONOCHROME1":
        y = 1.0 - y
    return y.astype(np.float32)
