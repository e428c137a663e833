"""LIME beside Grad-CAM: which superpixels of the network input move the model's P(abnormal).

LIME (Ribeiro et al., 2016; the ``lime`` package) cuts the image the network
sees into SLIC superpixels (scikit-image), scores many copies with random
subsets of them greyed out, and fits a weighted linear model of P(abnormal) on
which superpixels were kept. A superpixel's weight is how much its presence
raised the score near this image. The map shown is the positive weights, each
spread over its superpixel and scaled by the largest.

It runs against the ONNX model through onnxruntime, on the model card's network
input (the output of the one preprocessing chain), and greys a superpixel out by
setting it to the image's mean intensity. Grad-CAM reads the network's last
feature map (5 x 5 cells at 144 px); LIME only queries the model, so where the
two agree is a check on both (``scripts/lime_gradcam_agreement.py``).

The functions take arrays and a predict function and return arrays; nothing
here touches the disk.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

SAMPLES = 1000
SEGMENTS = 50
TOP_FRACTION = 0.2


@dataclass(frozen=True)
class LimeMap:
    """One explanation: the superpixels, each one's weight, and the pixel map in [0, 1]."""

    segments: np.ndarray  # (S, S) int superpixel labels
    weights: dict[int, float]  # superpixel -> LIME weight for P(abnormal)
    heat: np.ndarray  # (S, S) float32: positive weights / the largest, 0 elsewhere
    score: float  # the local linear fit's R^2 (weighted, on the perturbed samples)


def superpixels(grey: np.ndarray, n: int = SEGMENTS, seed: int = 0) -> np.ndarray:
    """Return SLIC superpixel labels (0..k-1) of a [0, 1] grey image."""
    from skimage.segmentation import slic

    del seed  # SLIC is deterministic; kept for a uniform signature
    return np.asarray(slic(grey.astype(np.float64), n_segments=n, compactness=0.1, sigma=1.0,
                           channel_axis=None, start_label=0), dtype=np.int64)


def heat_of(segments: np.ndarray, weights: dict[int, float]) -> np.ndarray:
    """Return the map of positive weights over their superpixels, scaled to a maximum of 1
    (all zeros when no superpixel raised the score)."""
    w = np.zeros(int(segments.max()) + 1, dtype=np.float64)
    for s, v in weights.items():
        w[s] = max(v, 0.0)
    top = w.max()
    return (w[segments] / top).astype(np.float32) if top > 0 else np.zeros(segments.shape,
                                                                           np.float32)


def lime_map(grey: np.ndarray, predict: Callable[[np.ndarray], np.ndarray],
             samples: int = SAMPLES, segments: int = SEGMENTS, seed: int = 0,
             batch: int = 50) -> LimeMap:
    """Explain ``predict`` (grey images (N, S, S) in [0, 1] -> P(abnormal) (N,)) at ``grey``.

    ``samples`` perturbed copies, ``segments`` SLIC superpixels (about), greyed to the
    image's mean; ``seed`` fixes the perturbations. Returns the :class:`LimeMap`.
    """
    import lime.lime_image as li

    g = np.asarray(grey, dtype=np.float64)
    segs = superpixels(g, segments, seed)

    def classifier(rgb: np.ndarray) -> np.ndarray:
        p = np.asarray(predict(rgb[..., 0].astype(np.float32)), dtype=np.float64).reshape(-1)
        return np.stack([1.0 - p, p], axis=1)

    explainer = li.LimeImageExplainer(random_state=seed)
    # lime 0.2.0.1 draws a progress bar per explanation on stderr, unasked: a daemon's log
    # is no place for it.
    bar, li.tqdm = li.tqdm, _no_bar
    try:
        exp = explainer.explain_instance(np.repeat(g[..., None], 3, axis=2), classifier,
                                         labels=(1,), top_labels=None, hide_color=float(g.mean()),
                                         num_samples=samples, batch_size=batch,
                                         segmentation_fn=lambda _im: segs, random_seed=seed)
    finally:
        li.tqdm = bar
    weights = {int(s): float(w) for s, w in exp.local_exp[1]}
    return LimeMap(segs, weights, heat_of(segs, weights), float(exp.score))


def _no_bar(it: object, *args: object, **kwargs: object) -> object:
    return it


def top_mask(heat: np.ndarray, fraction: float = TOP_FRACTION) -> np.ndarray | None:
    """Return the mask of the ``fraction`` of pixels with the highest values (ties at the
    cut included), or None for a constant map (no region stands out)."""
    h = np.asarray(heat, dtype=np.float64)
    if float(h.max()) <= float(h.min()):
        return None
    cut = np.quantile(h, 1.0 - fraction)
    mask = h >= cut
    if mask.all():  # most pixels share the top value: the cut selects nothing in particular
        return None
    return mask


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Return the intersection over union of two boolean masks (0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def top_superpixel_hit(lime: LimeMap, region: np.ndarray) -> bool | None:
    """Whether most of the superpixel with the largest positive weight lies in ``region``
    (None when no superpixel raised the score)."""
    pos = {s: w for s, w in lime.weights.items() if w > 0}
    if not pos:
        return None
    best = max(pos, key=pos.__getitem__)
    inside = region[lime.segments == best]
    return bool(inside.mean() > 0.5) if inside.size else None
