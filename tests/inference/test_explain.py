"""LIME against a model whose answer is known: only one region of the image matters."""

from __future__ import annotations

import numpy as np
import pytest

from triage.inference.explain import heat_of, iou, lime_map, top_mask, top_superpixel_hit

S = 64


def _image() -> np.ndarray:
    yy, xx = np.mgrid[0:S, 0:S] / S
    return (0.3 + 0.4 * np.sin(6 * xx) * np.cos(5 * yy) ** 2).astype(np.float64)


def test_lime_finds_the_only_region_the_model_looks_at() -> None:
    region = np.zeros((S, S), bool)
    region[8:24, 36:56] = True  # the model's score is the brightness of this box, nothing else
    grey = _image() + 0.4 * region  # brighter than the grey LIME hides with: presence raises it
    calls = []

    def predict(batch: np.ndarray) -> np.ndarray:
        calls.append(len(batch))
        return np.clip(batch[:, region].mean(axis=1) * 2 - 0.2, 0, 1)

    lm = lime_map(grey, predict, samples=300, segments=40, seed=3)
    assert sum(calls) == 300 and lm.heat.shape == (S, S)
    assert 0.0 <= lm.heat.min() and lm.heat.max() == pytest.approx(1.0)
    # Superpixels wholly outside the box cannot move the score: weight about 0.
    outside = [s for s in np.unique(lm.segments) if not region[lm.segments == s].any()]
    inside = [s for s in np.unique(lm.segments) if region[lm.segments == s].mean() > 0.5]
    assert max(abs(lm.weights[s]) for s in outside) < 0.1 * max(lm.weights[s] for s in inside)
    assert top_superpixel_hit(lm, region) is True
    # Same seed, same explanation.
    again = lime_map(grey, predict, samples=300, segments=40, seed=3)
    np.testing.assert_array_equal(again.heat, lm.heat)


def test_masks_iou_and_hits_by_hand() -> None:
    h = np.arange(100, dtype=float).reshape(10, 10)
    m = top_mask(h, 0.2)
    assert m is not None and m.sum() == 20 and m[8:].all()
    assert top_mask(np.ones((4, 4))) is None  # a constant map has no top region
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[:2], b[1:3] = True, True
    assert iou(a, b) == pytest.approx(4 / 12) and iou(a, a) == 1.0
    segs = np.array([[0, 0, 1, 1]] * 4)
    assert heat_of(segs, {0: -1.0, 1: 0.5}).tolist() == [[0, 0, 1, 1]] * 4
    assert heat_of(segs, {0: -1.0, 1: -0.5}).max() == 0
