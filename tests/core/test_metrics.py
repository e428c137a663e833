"""triage.metrics and priority: exact intervals, ECE, threshold selection (property tests)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score

from triage.core import metrics
from triage.core.tiers import priority

scores_st = st.lists(st.floats(0, 1, allow_nan=False).map(lambda v: round(v, 3)), min_size=1,
                     max_size=60)


@st.composite
def labelled(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    pos = draw(scores_st)
    neg = draw(scores_st)
    s = np.array(pos + neg)
    y = np.array([1] * len(pos) + [0] * len(neg))
    return y, s


@settings(max_examples=60, deadline=None)
@given(data=labelled(), target=st.floats(0.05, 0.99))
def test_sensitivity_threshold_meets_target_and_is_largest(
        data: tuple[np.ndarray, np.ndarray], target: float) -> None:
    y, s = data
    t = metrics.threshold_for_sensitivity(y, s, target)
    sens, _ = metrics.sens_spec(y, s, t)
    assert sens.value >= target - 1e-12
    higher = s[(y == 1) & (s > t)]
    if len(higher):
        assert metrics.sens_spec(y, s, float(higher.min()))[0].value < target


@settings(max_examples=60, deadline=None)
@given(data=labelled(), target=st.floats(0.05, 0.99))
def test_specificity_threshold_meets_target(data: tuple[np.ndarray, np.ndarray],
                                            target: float) -> None:
    y, s = data
    t = metrics.threshold_for_specificity(y, s, target)
    if np.isinf(t):
        return
    _, spec = metrics.sens_spec(y, s, t)
    assert spec.value >= target - 1e-12
    lower = s[s < t]
    if len(lower):  # no smaller observed threshold also meets it
        assert metrics.sens_spec(y, s, float(lower.max()))[1].value < target


@settings(max_examples=40, deadline=None)
@given(data=labelled(), target=st.floats(0.5, 0.95))
def test_conservative_threshold_lower_bound_meets_target(
        data: tuple[np.ndarray, np.ndarray], target: float) -> None:
    y, s = data
    t = metrics.threshold_for_sensitivity(y, s, target, conservative=True)
    n_pos = int(y.sum())
    if not np.isfinite(t):  # only when even calling every positive cannot prove the target
        assert metrics.clopper_pearson(n_pos, n_pos)[0] < target
        return
    sens, _ = metrics.sens_spec(y, s, t)
    assert sens.lower >= target - 1e-12
    assert t <= metrics.threshold_for_sensitivity(y, s, target)


def test_clopper_pearson_known_values() -> None:
    lo, hi = metrics.clopper_pearson(0, 10)
    assert lo == 0 and hi == pytest.approx(0.3085, abs=1e-4)
    lo, hi = metrics.clopper_pearson(5, 10)
    assert lo == pytest.approx(0.1871, abs=1e-4) and hi == pytest.approx(0.8129, abs=1e-4)
    assert metrics.clopper_pearson(10, 10)[1] == 1.0


@settings(max_examples=50, deadline=None)
@given(k=st.integers(0, 50), extra=st.integers(0, 50))
def test_clopper_pearson_contains_the_estimate(k: int, extra: int) -> None:
    n = k + extra
    assume(n > 0)
    lo, hi = metrics.clopper_pearson(k, n)
    assert lo <= k / n <= hi


def test_auc_matches_sklearn() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = np.round(rng.random(200) + y * 0.5, 1)
    assert metrics.auc(y, s) == pytest.approx(roc_auc_score(y, s))
    assert np.isnan(metrics.auc([1, 1], [0.2, 0.3]))


def test_ece_zero_when_calibrated_and_large_when_not() -> None:
    y = np.array([0] * 80 + [1] * 20 + [0] * 20 + [1] * 80)
    p = np.array([0.2] * 100 + [0.8] * 100)
    assert metrics.ece(y, p, 10) == pytest.approx(0.0, abs=1e-12)
    assert metrics.ece(y, 1 - p, 10) == pytest.approx(0.6)


def test_temperature_recovers_a_known_scale() -> None:
    rng = np.random.default_rng(0)
    true = rng.normal(0, 2, 5000)
    y = (rng.random(5000) < metrics.sigmoid(true)).astype(int)
    assert metrics.fit_temperature(true * 3, y) == pytest.approx(3, rel=0.15)


thresholds_st = st.dictionaries(st.sampled_from(["abnormal", "urgent", "stat"]),
                                st.floats(0, 1), min_size=0, max_size=3)


@given(p=st.floats(0, 1), q=st.floats(0, 1), th=thresholds_st)
def test_priority_is_monotone(p: float, q: float, th: dict[str, float]) -> None:
    order = {"routine": -1.0, **th}
    lo, hi = sorted((p, q))
    assert order[priority(lo, th)] <= order[priority(hi, th)]


def test_priority_cases() -> None:
    th = {"abnormal": 0.3, "urgent": 0.9}
    assert priority(0.1, th) == "routine"
    assert priority(0.3, th) == "abnormal"
    assert priority(0.95, th) == "urgent"
    assert priority(None, th) == "unscored"
    assert priority(float("nan"), th) == "unscored"
    assert priority(1.0, {"abnormal": None}) == "routine"


@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 20)), min_size=1, max_size=60),
       st.floats(0.05, 0.99), st.booleans())
def test_thresholds_are_the_extreme_ones_meeting_the_target(rows: list[tuple[int, int]],
                                                           target: float, conservative: bool) -> None:
    y = np.array([r[0] for r in rows])
    s = np.array([r[1] / 20 for r in rows])  # ties on purpose

    def meets(k: int, n: int) -> bool:
        if n == 0:
            return False
        return (metrics.clopper_pearson(k, n)[0] if conservative else k / n) >= target - 1e-12

    t = metrics.threshold_for_sensitivity(y, s, target, conservative)
    ok = [c for c in sorted(set(s[y == 1])) if meets(int(((s >= c) & (y == 1)).sum()), int(y.sum()))]
    assert t == (max(ok) if ok else float("-inf"))
    t = metrics.threshold_for_specificity(y, s, target, conservative)
    n_neg = int((y == 0).sum())
    cands = sorted({float(np.nextafter(v, np.inf)) for v in s[y == 0]})
    ok = [c for c in cands if meets(int(((s < c) & (y == 0)).sum()), n_neg)]
    assert t == (min(ok) if ok else float("inf"))


@given(st.integers(0, 200), st.integers(0, 200), st.sampled_from([0.9, 0.95, 0.99]))
def test_clopper_pearson_equals_scipys_exact_binomial_interval(k: int, extra: int,
                                                               confidence: float) -> None:
    from scipy.stats import binomtest

    n = k + extra
    assume(n > 0)
    ci = binomtest(k, n).proportion_ci(confidence_level=confidence, method="exact")
    lo, hi = metrics.clopper_pearson(k, n, confidence)
    assert lo == pytest.approx(ci.low, abs=1e-9) and hi == pytest.approx(ci.high, abs=1e-9)


def test_bootstraps_of_one_abnormal_or_one_study_are_undefined_not_an_error() -> None:
    # A replay where the guard refused nearly everything leaves one labelled study of a class.
    from triage.core.metrics import bootstrap_auc, bootstrap_ece

    assert bootstrap_auc(np.array([1, 0, 0]), np.array([0.9, 0.2, 0.1]), 100) == (None, None)
    assert bootstrap_ece(np.array([1]), np.array([0.9]), 10, 100) == (None, None)
    lo, hi = bootstrap_auc(np.array([1, 1, 0, 0]), np.array([0.9, 0.8, 0.2, 0.1]), 100)
    assert lo is not None and hi is not None


def test_paired_auc_difference_and_its_interval() -> None:
    rng = np.random.default_rng(3)
    y = np.repeat([0, 1], 150)
    good = y + rng.normal(0, 0.6, len(y))   # AUC about 0.88
    weak = y + rng.normal(0, 2.0, len(y))   # AUC about 0.64
    d, (lo, hi) = metrics.bootstrap_auc_difference(y, good, weak, 500, seed=1)
    assert d == pytest.approx(roc_auc_score(y, good) - roc_auc_score(y, weak))
    assert lo is not None and hi is not None and 0 < lo < d < hi
    # A model against itself differs by exactly nothing in every paired draw.
    d0, ci0 = metrics.bootstrap_auc_difference(y, good, good, 200)
    assert d0 == 0 and ci0 == (0.0, 0.0)
    # Paired draws: a monotone transform of the same scores is the same ranking.
    d1, ci1 = metrics.bootstrap_auc_difference(y, good, np.exp(good), 200)
    assert d1 == 0 and ci1 == (0.0, 0.0)
    assert metrics.bootstrap_auc_difference(y[:3], good[:3], weak[:3], 100)[1] == (None, None)
