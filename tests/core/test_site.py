"""Per-site operating points: the conservative guarantee holds in simulation; refusals are clear."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from triage.core.site import CannotGuarantee, Target, fit_points, min_cases, targets_of

POS, NEG = stats.beta(4, 2), stats.beta(2, 4)  # a known population of abnormal and normal scores


def _draw(rng: np.random.Generator, n_pos: int, n_neg: int) -> tuple[np.ndarray, np.ndarray]:
    y = np.r_[np.ones(n_pos, int), np.zeros(n_neg, int)]
    s = np.r_[POS.rvs(n_pos, random_state=rng), NEG.rvs(n_neg, random_state=rng)]
    return y, s


def _true_sensitivity(threshold: float) -> float:
    return float(POS.sf(threshold))


@pytest.mark.parametrize(("target", "confidence", "n_pos"), [(0.95, 0.95, 150), (0.90, 0.90, 80)])
def test_the_target_holds_in_at_least_the_confidence_share_of_sites(target: float, confidence: float,
                                                                    n_pos: int) -> None:
    rng = np.random.default_rng(7)
    draws = 2000
    below_conservative = below_point = 0
    for _ in range(draws):
        y, s = _draw(rng, n_pos, 150)
        [p] = fit_points(y, s, [Target("abnormal", "sensitivity", target)], confidence)
        below_conservative += _true_sensitivity(p.threshold) < target
        # The point estimate, for contrast: the same data, no guarantee.
        from triage.core import metrics

        t = metrics.threshold_for_sensitivity(y, s, target)
        below_point += _true_sensitivity(t) < target
    assert below_conservative / draws <= 1 - confidence
    assert below_point / draws > 0.3  # fitting at the point estimate misses often


def test_too_few_positives_cannot_be_guaranteed_and_the_message_says_how_many() -> None:
    rng = np.random.default_rng(1)
    y, s = _draw(rng, 40, 200)
    need = min_cases(0.95, 0.95)
    assert need == 72  # (0.025) ** (1 / 72) >= 0.95 > (0.025) ** (1 / 71)
    with pytest.raises(CannotGuarantee, match=f"40 labelled abnormal .*at least {need}"):
        fit_points(y, s, [Target("abnormal", "sensitivity", 0.95)], 0.95)


def test_fitted_points_are_ordered_and_report_rates() -> None:
    rng = np.random.default_rng(2)
    y, s = _draw(rng, 300, 300)
    points = fit_points(y, s, [Target("abnormal", "sensitivity", 0.95),
                               Target("urgent", "sensitivity", 0.70)], 0.95)
    abn, urg = points
    assert urg.threshold > abn.threshold
    assert abn.sensitivity.lower >= 0.95 and urg.sensitivity.lower >= 0.70
    assert 0 <= abn.specificity.lower <= abn.specificity.value <= abn.specificity.upper <= 1


def test_targets_take_the_sensitivity_flag_for_the_most_sensitive_point() -> None:
    from triage.config import CalibrationConfig

    got = targets_of(CalibrationConfig().operating_points, 0.97)
    assert [(t.name, t.target) for t in got] == [("abnormal", 0.97), ("urgent", 0.70)]
    assert [(t.name, t.target) for t in targets_of(CalibrationConfig().operating_points, None)] == [
        ("abnormal", 0.95), ("urgent", 0.70)]
