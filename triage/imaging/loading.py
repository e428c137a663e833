"""Files to gated grey images: DICOM through :mod:`dicom_io.pixels`, PNG and JPEG through Pillow.

Every loader returns a float32 2-D image in [0, 1] (MONOCHROME2 sense) or
raises :class:`UnscorableError` with the reason a radiologist will read.
No torch here: the loaders run wherever decoding runs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from pydicom.dataset import Dataset

from dicom_io.header import Header, read_header
from dicom_io.pixels import PixelDecodeError, decode, shrink
from dicom_io.reading import read_dataset
from triage.config import PreprocessConfig
from triage.core.errors import UnscorableError
from triage.core.gating import gate_header, gate_pixels

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
_DEFAULT = PreprocessConfig()


def load_dicom(ds: Dataset, cfg: PreprocessConfig = _DEFAULT, min_side: int | None = None,
               header: Header | None = None) -> np.ndarray:
    """Return the gated, decoded grey image of a DICOM dataset (float32, [0, 1]).

    ``min_side``: the caller needs no more than this many pixels on the short
    side, so large images are decoded reduced (:func:`dicom_io.pixels.decode`).
    ``header``: the dataset's header when the caller has read it already.
    Raises UnscorableError with the gating or decoding reason.
    """
    header = header if header is not None else read_header(ds)
    reason = gate_header(header, cfg.allowed_modalities, cfg.min_size_px)
    if reason is not None:
        raise UnscorableError(reason)
    try:
        pixels = decode(ds, min_side)
    except PixelDecodeError as e:
        raise UnscorableError(e.reason) from e
    # A reduced image's size says nothing of the image's: the header check above has judged
    # that; here only an image that was not reduced (smaller than min_side) is measured.
    reason = gate_pixels(pixels, cfg.min_size_px if min_side is None
                         else min(cfg.min_size_px, min_side))
    if reason is not None:
        raise UnscorableError(reason)
    return pixels


def _is_colour(arr: np.ndarray) -> bool:
    """True when an RGB array's channels differ (grey stored as RGB is not colour)."""
    rgb = arr[..., :3].astype(np.int16)
    return bool(np.abs(rgb[..., 0] - rgb[..., 1]).max() > 8 or np.abs(rgb[..., 1] - rgb[..., 2]).max() > 8)


def load_image(path: str | Path, cfg: PreprocessConfig = _DEFAULT,
               min_side: int | None = None) -> np.ndarray:
    """Return a PNG or JPEG file as a gated float32 grey image in [0, 1] (box-averaged down
    towards ``min_side`` pixels on the short side when given; see :func:`load_dicom`).

    Raises UnscorableError ("image cannot be decoded", "colour image", "image too small ...").
    """
    try:
        with Image.open(path) as im:
            im.load()
            arr = np.asarray(im)
            mode = im.mode
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise UnscorableError("image cannot be decoded") from e
    if arr.ndim == 3:
        if _is_colour(arr):
            raise UnscorableError("colour image")
        arr = arr[..., 0]
    top = 65535.0 if mode.startswith("I") or arr.dtype == np.uint16 else 255.0
    pixels = (arr.astype(np.float32) / top).clip(0, 1)
    reason = gate_pixels(pixels, cfg.min_size_px)
    if reason is not None:
        raise UnscorableError(reason)
    return shrink(pixels, min_side)


def is_image_file(path: str | Path) -> bool:
    """True when ``path`` has a PNG or JPEG suffix (anything else is tried as DICOM)."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def load_any(path: str | Path, cfg: PreprocessConfig = _DEFAULT,
             min_side: int | None = None) -> np.ndarray:
    """Return the gated grey image of an image file or a DICOM file (see :func:`load_dicom`
    for ``min_side``).

    Raises UnscorableError with a reason for unreadable, gated or undecodable input.
    """
    if is_image_file(path):
        return load_image(path, cfg, min_side)
    try:
        ds = read_dataset(path)
    except PixelDecodeError as e:
        raise UnscorableError(e.reason) from e
    return load_dicom(ds, cfg, min_side)
