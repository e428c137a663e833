"""Fixed perturbations of a decoded radiograph, for judging what generalises.

Patient-level validation images come from the same hospital, machines and
processing as the training images, so they cannot show how a recipe copes
with another site's exposure, contrast, framing or resolution. These
deterministic perturbations of the decoded grey image (before the
preprocessing chain) make such differences visible on the validation split;
they are used to compare recipes, never to choose thresholds.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image


def gamma(g: float) -> Callable[[np.ndarray], np.ndarray]:
    """Return a perturbation raising the [0, 1] image to the power ``g``."""
    return lambda x: np.power(np.clip(x, 0, 1), g).astype(np.float32)


def zoom(area: float) -> Callable[[np.ndarray], np.ndarray]:
    """Return a perturbation keeping the centre ``area`` fraction of the image."""
    def crop(x: np.ndarray) -> np.ndarray:
        h, w = x.shape
        f = float(np.sqrt(area))
        ch, cw = max(1, round(h * f)), max(1, round(w * f))
        y0, x0 = (h - ch) // 2, (w - cw) // 2
        return x[y0:y0 + ch, x0:x0 + cw]
    return crop


def lowres(factor: int) -> Callable[[np.ndarray], np.ndarray]:
    """Return a perturbation that loses detail: down by ``factor`` and back up, bilinear."""
    def blur(x: np.ndarray) -> np.ndarray:
        h, w = x.shape
        im = Image.fromarray(x.astype(np.float32), mode="F")
        small = im.resize((max(1, w // factor), max(1, h // factor)), Image.Resampling.BILINEAR)
        return np.asarray(small.resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32)
    return blur


PERTURBATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "gamma_0.6": gamma(0.6),
    "gamma_1.6": gamma(1.6),
    "zoom_0.7": zoom(0.7),
    "lowres_2": lowres(2),
}
