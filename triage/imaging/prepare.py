"""One image from file to network input: what a decoder process does for each image.

:func:`init` builds the model card's MONAI chain once per process;
:func:`prepare` then gates, decodes and preprocesses one file and returns a
:class:`Prepared` with the network input, a small display copy for the
overlay and the image's metadata, or the reason it cannot be scored. It never
raises for a bad file.

This module imports no torch at its top, so the serving process can unpickle
a :class:`Prepared` and build a metadata-only one (:func:`unreadable`) without
loading MONAI; the chain is imported inside :func:`init`, which runs in the
decoder processes (and in ``triage score``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dicom_io.header import read_file_header
from triage.core.errors import UnscorableError

DISPLAY_PX = 512
_STATE: dict[str, Any] = {}


@dataclass
class Prepared:
    """What preparing one image produced."""

    key: int
    meta: dict[str, Any] = field(default_factory=dict)
    x: np.ndarray | None = None  # the network input (C, S, S) float32
    xg: np.ndarray | None = None  # the input guard's input (C, s, s) float32, when it runs
    display: np.ndarray | None = None  # uint8 grey, at most DISPLAY_PX on a side
    reason: str | None = None
    seconds: float = 0.0


def init(card: dict[str, Any], guard_card: dict[str, Any] | None = None) -> None:
    """Build the preprocessing chain recorded in ``card`` for this process, and the input
    guard's (from its own card) when ``guard_card`` is given.

    One torch thread per process: the decoder pool runs several processes, and
    torch's default of one thread per core oversubscribes the CPU (a 256 px
    percentile window took 190 ms instead of 7 ms on two busy cores).
    """
    from triage.imaging.transforms import InputSpec, build_transforms, one_thread, preprocess_of

    one_thread()

    _STATE["pre"] = preprocess_of(card)
    _STATE["work_px"] = working_side(InputSpec.from_dict(card["input"]).size)
    _STATE["chain"] = build_transforms(_STATE["pre"], InputSpec.from_dict(card["input"]),
                                       train=False)
    _STATE["guard"] = None if guard_card is None else build_transforms(
        preprocess_of(guard_card), InputSpec.from_dict(guard_card["input"]), train=False)


def working_side(input_size: int) -> int:
    """Return the short side images are decoded at: enough for the display copy and for the
    chain's own reduction before the network's input size (twice that size)."""
    return max(DISPLAY_PX, 2 * input_size)


def metadata(path: str | Path, transfer_syntax: str | None = None) -> dict[str, Any]:
    """Return the drift-watch metadata of a file (empty values if it is not readable DICOM)."""
    h = read_file_header(path, transfer_syntax)
    return h.metadata() if h is not None else {"transfer_syntax": transfer_syntax}


def unreadable(key: int, path: str, transfer_syntax: str | None, reason: str) -> Prepared:
    """Return the outcome of an image whose decoding failed outside :func:`prepare` (a crash)."""
    return Prepared(key, meta=metadata(path, transfer_syntax), reason=reason)


def display_copy(grey: np.ndarray, size: int = DISPLAY_PX) -> np.ndarray:
    """Return a uint8 copy of a [0, 1] grey image, at most ``size`` pixels on a side."""
    from PIL import Image

    im = Image.fromarray((np.clip(grey, 0, 1) * 255).astype(np.uint8))
    im.thumbnail((size, size))
    return np.asarray(im, dtype=np.uint8)


def prepare(key: int, path: str, transfer_syntax: str | None = None) -> Prepared:
    """Gate, decode and preprocess one file (after :func:`init`). Raises nothing.

    The file is parsed once, for its header and its pixels, and decoded reduced to
    :func:`working_side` (see :func:`dicom_io.pixels.decode`): every later step,
    the display copy and the MONAI chain included, works on that image.
    """
    t0 = time.perf_counter()
    out = Prepared(key)
    try:
        grey = _load(out, path, transfer_syntax)
        out.x = np.asarray(_STATE["chain"](grey), dtype=np.float32)
        out.display = display_copy(grey)
        if _STATE.get("guard") is not None:
            out.xg = guard_input(out.display)
    except UnscorableError as e:
        out.reason = e.reason
    except Exception:  # a bad file must never stop the worker
        # Words for the radiologist; the details go to the log.
        logging.getLogger(__name__).exception("image %s: unexpected error while decoding", key)
        out.reason = "the image could not be read (an unexpected decoding error)"
    out.seconds = time.perf_counter() - t0
    return out


def _load(out: Prepared, path: str, transfer_syntax: str | None) -> np.ndarray:
    """Return the gated grey image at the working side, filling ``out.meta`` from the same parse
    (or, when the file cannot be parsed whole, from whatever header can be read)."""
    from dicom_io.header import read_header
    from dicom_io.pixels import PixelDecodeError
    from dicom_io.reading import read_dataset
    from triage.imaging.loading import load_dicom, load_image

    side = _STATE["work_px"]
    if _is_image(path):
        return load_image(path, _STATE["pre"], side)
    try:
        ds = read_dataset(path)
    except PixelDecodeError as e:
        out.meta = metadata(path, transfer_syntax)
        raise UnscorableError(e.reason) from e
    header = read_header(ds, transfer_syntax)
    out.meta = header.metadata()
    return load_dicom(ds, _STATE["pre"], side, header)


def guard_input(display: np.ndarray) -> np.ndarray:
    """Return the input guard's network input, made from the 8-bit display copy.

    The guard learned from 8-bit images at 112 px, so the display copy (at most
    DISPLAY_PX on a side) carries all it needs; its chain then runs on a small
    image instead of the full-resolution one.
    """
    return np.asarray(_STATE["guard"](display.astype(np.float32) / 255.0), dtype=np.float32)


def _is_image(path: str | Path) -> bool:
    from triage.imaging.loading import is_image_file

    return is_image_file(path)
