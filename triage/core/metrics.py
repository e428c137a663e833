"""Pure metrics: AUC with DeLong and bootstrap intervals, Clopper-Pearson intervals, ECE,
threshold selection, temperature scaling.

Everything here takes arrays and returns numbers; nothing touches disk or models.
Scores are "higher means more likely abnormal"; label 1 is abnormal. The AUC is
scikit-learn's, exact binomial intervals and bootstrap intervals are SciPy's;
what has no library equivalent (DeLong's variance, temperature scaling, the
conservative threshold search) is written here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import optimize, special, stats
from sklearn.metrics import roc_auc_score


def auc(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """Return the ROC AUC (ties count one half); NaN when a class is missing."""
    y = np.asarray(labels).astype(int)
    if len(y) == 0 or y.min() == y.max():
        return float("nan")
    return float(roc_auc_score(y, np.asarray(scores, dtype=np.float64)))


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Return the exact (Clopper-Pearson) interval for ``k`` successes in ``n`` trials.

    Returns (nan, nan) when ``n`` is 0. Raises ValueError when k is outside 0..n.
    """
    if not 0 <= k <= n:
        raise ValueError(f"k={k} outside 0..{n}")
    if n == 0:
        return float("nan"), float("nan")
    # The exact interval's closed form in beta quantiles: the same numbers as SciPy's
    # binomtest(...).proportion_ci(method="exact"), about 15 times faster.
    alpha = 1 - confidence
    lo = 0.0 if k == 0 else float(stats.beta.ppf(alpha / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(stats.beta.ppf(1 - alpha / 2, k + 1, n - k))
    return lo, hi


def delong(labels: np.ndarray, scores: np.ndarray, confidence: float = 0.95
           ) -> tuple[float, tuple[float | None, float | None]]:
    """Return (AUC, DeLong confidence interval), the interval clipped to [0, 1].

    Uses the midrank form of DeLong et al. (1988) (Sun and Xu, 2014). The
    interval is (None, None) with fewer than two studies in either class.
    """
    y = np.asarray(labels).astype(int)
    s = np.asarray(scores, dtype=np.float64)
    pos, neg = s[y == 1], s[y == 0]
    m, n = len(pos), len(neg)
    a = auc(y, s)
    if m < 2 or n < 2:
        return a, (None, None)
    tz = stats.rankdata(np.concatenate([pos, neg]))
    v10 = (tz[:m] - stats.rankdata(pos)) / n
    v01 = 1.0 - (tz[m:] - stats.rankdata(neg)) / m
    se = math.sqrt(v10.var(ddof=1) / m + v01.var(ddof=1) / n)
    z = float(stats.norm.ppf(0.5 + confidence / 2))
    return a, (max(0.0, a - z * se), min(1.0, a + z * se))


def bootstrap_auc(labels: np.ndarray, scores: np.ndarray, iterations: int, seed: int = 0,
                  confidence: float = 0.95) -> tuple[float | None, float | None]:
    """Return a percentile interval of the AUC, resampling positives and negatives separately.

    (None, None) when a class is empty or ``iterations`` is 0.
    """
    y = np.asarray(labels).astype(int)
    s = np.asarray(scores, dtype=np.float64)
    pos, neg = s[y == 1], s[y == 0]
    if len(pos) < 2 or len(neg) < 2 or iterations <= 0:  # a bootstrap needs two of each
        return None, None

    def stat(p: np.ndarray, q: np.ndarray) -> float:
        # The Mann-Whitney form of the AUC: memory linear in the sample, not quadratic.
        r = stats.rankdata(np.concatenate([p, q]))[:len(p)]
        return float((r.sum() - len(p) * (len(p) + 1) / 2) / (len(p) * len(q)))

    return _bootstrap((pos, neg), stat, iterations, seed, confidence, paired=False)


def bootstrap_auc_difference(labels: np.ndarray, a: np.ndarray, b: np.ndarray,
                             iterations: int, seed: int = 0, confidence: float = 0.95
                             ) -> tuple[float, tuple[float | None, float | None]]:
    """Return AUC(a) − AUC(b) on the same studies, with a paired percentile-bootstrap
    interval (each draw resamples studies, keeping both scores of a study together).

    The interval is (None, None) with fewer than two studies in either class or no iterations.
    """
    y = np.asarray(labels).astype(int)
    sa, sb = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    diff = auc(y, sa) - auc(y, sb)
    if min(int(y.sum()), int((y == 0).sum())) < 2 or iterations <= 0:
        return diff, (None, None)

    def stat(yb: np.ndarray, pa: np.ndarray, pb: np.ndarray) -> float:
        if yb.min() == yb.max():  # a draw with one class has no AUC (then no interval)
            return float("nan")
        return float(roc_auc_score(yb, pa) - roc_auc_score(yb, pb))

    return diff, _bootstrap((y, sa, sb), stat, iterations, seed, confidence, paired=True)


def bootstrap_ece(labels: np.ndarray, probs: np.ndarray, bins: int, iterations: int,
                  seed: int = 0, confidence: float = 0.95) -> tuple[float | None, float | None]:
    """Return a percentile interval of the ECE from a bootstrap over studies."""
    y = np.asarray(labels, dtype=np.float64)
    p = np.asarray(probs, dtype=np.float64)
    if len(y) < 2 or iterations <= 0:
        return None, None

    def stat(yb: np.ndarray, pb: np.ndarray) -> float:
        return ece(yb, pb, bins)

    return _bootstrap((y, p), stat, iterations, seed, confidence, paired=True)


def _bootstrap(data: tuple[np.ndarray, ...], stat: Any, iterations: int, seed: int,
               confidence: float, paired: bool) -> tuple[float | None, float | None]:
    """SciPy's percentile bootstrap of ``stat`` over ``data``; (None, None) if undefined."""
    res = stats.bootstrap(data, stat, n_resamples=iterations, confidence_level=confidence,
                          method="percentile", paired=paired, vectorized=False,
                          rng=np.random.default_rng(seed))
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return (lo, hi) if math.isfinite(lo) and math.isfinite(hi) else (None, None)


@dataclass(frozen=True)
class Rate:
    """A proportion with its exact interval."""

    value: float
    k: int
    n: int
    lower: float
    upper: float

    def to_dict(self) -> dict[str, float | int]:
        """Return the rate as a JSON-ready dict."""
        return {"value": self.value, "k": self.k, "n": self.n,
                "ci_lower": self.lower, "ci_upper": self.upper}


def rate(k: int, n: int, confidence: float = 0.95) -> Rate:
    """Return k/n with its Clopper-Pearson interval (value NaN when n is 0)."""
    lo, hi = clopper_pearson(k, n, confidence)
    return Rate(k / n if n else float("nan"), k, n, lo, hi)


def sens_spec(labels: np.ndarray, scores: np.ndarray, threshold: float,
              confidence: float = 0.95) -> tuple[Rate, Rate]:
    """Return (sensitivity, specificity) when ``score >= threshold`` calls abnormal."""
    y = np.asarray(labels).astype(int)
    pos = np.asarray(scores) >= threshold
    tp = int((pos & (y == 1)).sum())
    tn = int((~pos & (y == 0)).sum())
    return rate(tp, int((y == 1).sum()), confidence), rate(tn, int((y == 0).sum()), confidence)


def _meets(k: int, n: int, target: float, conservative: bool, confidence: float) -> bool:
    """True when k/n (or, if conservative, its interval's lower bound) is >= target."""
    if n == 0:
        return False
    value = clopper_pearson(k, n, confidence)[0] if conservative else k / n
    return value >= target - 1e-12


def _fewest(n: int, target: float, conservative: bool, confidence: float) -> int | None:
    """Return the smallest k in 1..n with k/n (or its lower bound) meeting ``target``, or None.

    Meeting is monotone in k, so a binary search needs only a few interval computations.
    """
    if n == 0 or not _meets(n, n, target, conservative, confidence):
        return None
    lo, hi = 1, n
    while lo < hi:
        mid = (lo + hi) // 2
        if _meets(mid, n, target, conservative, confidence):
            hi = mid
        else:
            lo = mid + 1
    return lo


def threshold_for_sensitivity(labels: np.ndarray, scores: np.ndarray, target: float,
                              conservative: bool = False, confidence: float = 0.95) -> float:
    """Return the largest threshold whose sensitivity (score >= t) meets ``target``.

    The threshold equals an observed positive score: the k-th highest, for the
    fewest k positives that meet the target (ties at that score are called
    too, which only raises sensitivity). Returns -inf when no threshold can
    meet the target (e.g. conservative mode with too few positives), which
    calls everything abnormal.
    """
    y = np.asarray(labels).astype(int)
    pos = np.sort(np.asarray(scores, dtype=np.float64)[y == 1])[::-1]
    k = _fewest(len(pos), target, conservative, confidence)
    return float("-inf") if k is None else float(pos[k - 1])


def threshold_for_specificity(labels: np.ndarray, scores: np.ndarray, target: float,
                              conservative: bool = False, confidence: float = 0.95) -> float:
    """Return the smallest threshold whose specificity (score < t is normal) meets ``target``.

    The threshold lies just above the k-th lowest negative score, for the
    fewest k negatives that meet the target. Returns +inf when the target
    cannot be met.
    """
    y = np.asarray(labels).astype(int)
    neg = np.sort(np.asarray(scores, dtype=np.float64)[y == 0])
    k = _fewest(len(neg), target, conservative, confidence)
    return float("inf") if k is None else float(np.nextafter(neg[k - 1], np.inf))


def select_threshold(labels: np.ndarray, scores: np.ndarray, metric: str, target: float,
                     conservative: bool = False, confidence: float = 0.95) -> float:
    """Return the operating threshold for ``metric`` ("sensitivity" or "specificity").

    Raises ValueError for another metric.
    """
    if metric == "sensitivity":
        return threshold_for_sensitivity(labels, scores, target, conservative, confidence)
    if metric == "specificity":
        return threshold_for_specificity(labels, scores, target, conservative, confidence)
    raise ValueError(f"unknown metric {metric!r}")


@dataclass(frozen=True)
class Reliability:
    """Per-bin calibration statistics over equal-width probability bins."""

    edges: np.ndarray
    counts: np.ndarray
    mean_confidence: np.ndarray
    accuracy: np.ndarray
    ece: float


def reliability(labels: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> Reliability:
    """Return reliability bins and the expected calibration error of P(abnormal).

    ECE is the count-weighted mean of |observed positive rate - mean predicted
    probability| over equal-width bins. Empty bins have NaN statistics.
    """
    y = np.asarray(labels, dtype=np.float64)
    p = np.clip(np.asarray(probs, dtype=np.float64), 0, 1)
    edges = np.linspace(0, 1, n_bins + 1)
    idx = np.clip(np.digitize(p, edges[1:-1], right=False), 0, n_bins - 1)
    counts = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.bincount(idx, weights=p, minlength=n_bins) / counts
        acc = np.bincount(idx, weights=y, minlength=n_bins) / counts
    gaps = np.where(counts > 0, np.abs(acc - conf), 0.0)
    ece = float((counts * gaps).sum() / max(len(p), 1))
    return Reliability(edges, counts, conf, acc, ece)


def ece(labels: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> float:
    """Return the expected calibration error (see :func:`reliability`)."""
    return reliability(labels, probs, n_bins).ece


def sigmoid(z: np.ndarray) -> np.ndarray:
    """Return the logistic function of ``z`` (SciPy's ``expit``, numerically stable)."""
    return np.asarray(special.expit(np.asarray(z, dtype=np.float64)))


def nll(logits: np.ndarray, labels: np.ndarray) -> float:
    """Return the mean binary cross-entropy of ``logits`` against 0/1 ``labels``."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    return float(np.mean(np.logaddexp(0, z) - y * z))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Return the temperature T > 0 minimising the NLL of ``sigmoid(logits / T)``.

    Raises ValueError when there are no logits.
    """
    if len(logits) == 0:
        raise ValueError("no logits to calibrate")
    res = optimize.minimize_scalar(lambda lt: nll(np.asarray(logits) / math.exp(lt), labels),
                                   bounds=(-3.0, 3.0), method="bounded")
    return float(math.exp(res.x))


def score_distribution(probs: np.ndarray, bins: int = 20,
                       levels: int = 101) -> dict[str, list[float]]:
    """Return a reference histogram (equal-width on [0, 1]) and quantiles of ``probs``.

    Used later to measure drift (PSI on the histogram, KS on the quantiles).
    """
    p = np.clip(np.asarray(probs, dtype=np.float64), 0, 1)
    counts, edges = np.histogram(p, bins=bins, range=(0.0, 1.0))
    qs = np.linspace(0, 1, levels)
    return {
        "bin_edges": [float(e) for e in edges],
        "counts": [int(c) for c in counts],
        "quantile_levels": [float(q) for q in qs],
        "quantiles": [float(v) for v in np.quantile(p, qs)] if len(p) else [],
    }
