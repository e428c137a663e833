"""Operating points: a point's own conservative choice overrides the global one."""

from __future__ import annotations

import numpy as np
from scipy.stats import beta

from triage.config import CalibrationConfig, OperatingPointConfig, load
from triage.training.calibrate import operating_points


def _cp_lower(k: int, n: int, confidence: float = 0.95) -> float:
    return 0.0 if k == 0 else float(beta.ppf((1 - confidence) / 2, k, n - k + 1))


def _oracle(pos: np.ndarray, target: float, conservative: bool) -> float:
    """Largest threshold among the positives' scores whose sensitivity (or its CP bound) meets target."""
    best = -np.inf
    for t in np.unique(pos):
        k = int((pos >= t).sum())
        value = _cp_lower(k, len(pos)) if conservative else k / len(pos)
        if value >= target:
            best = max(best, t)
    return float(best)


def test_per_point_conservative_overrides_the_global_mode() -> None:
    rng = np.random.default_rng(3)
    pos, neg = rng.beta(5, 2, 400), rng.beta(2, 5, 300)
    y = np.r_[np.ones(400, int), np.zeros(300, int)]
    p = np.r_[pos, neg]
    points = (OperatingPointConfig("abnormal", "sensitivity", 0.95, conservative=True),
              OperatingPointConfig("urgent", "sensitivity", 0.70))
    got = {op.name: op for op in operating_points(y, p, points, conservative=False)}
    assert got["abnormal"].conservative and not got["urgent"].conservative
    assert got["abnormal"].threshold == _oracle(pos, 0.95, True)
    assert got["urgent"].threshold == _oracle(pos, 0.70, False)
    # the conservative point is stricter than the point estimate would be
    assert got["abnormal"].threshold < _oracle(pos, 0.95, False)
    assert _cp_lower(got["abnormal"].sensitivity.k, 400) >= 0.95
    # and with the global mode on, a point that says false stays at the point estimate
    points = (OperatingPointConfig("abnormal", "sensitivity", 0.95, conservative=False),)
    (only,) = operating_points(y, p, points, conservative=True)
    assert only.threshold == _oracle(pos, 0.95, False) and not only.conservative


def test_the_shipped_config_makes_the_abnormal_point_conservative() -> None:
    ops = {op.name: op for op in load().calibration.operating_points}
    assert ops["abnormal"].conservative is True and ops["urgent"].conservative is None
    assert CalibrationConfig().operating_points[0].conservative is None
