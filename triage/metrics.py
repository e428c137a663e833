"""Pure metrics: AUC, Clopper-Pearson intervals, ECE, threshold selection, temperature.

Everything here takes arrays and returns numbers; nothing touches disk or models.
Scores are "higher means more likely abnormal"; label 1 is abnormal.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import optimize, stats


def auc(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """Return the ROC AUC (ties count one half); NaN when a class is missing."""
    y = np.asarray(labels).astype(int)
    s = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((1 - y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = stats.rankdata(s)
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Return the exact (Clopper-Pearson) interval for ``k`` successes in ``n`` trials.

    Returns (nan, nan) when ``n`` is 0. Raises ValueError when k is outside 0..n.
    """
    if not 0 <= k <= n:
        raise ValueError(f"k={k} outside 0..{n}")
    if n == 0:
        return float("nan"), float("nan")
    alpha = 1 - confidence
    lo = 0.0 if k == 0 else float(stats.beta.ppf(alpha / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(stats.beta.ppf(1 - alpha / 2, k + 1, n - k))
    return lo, hi


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


def threshold_for_sensitivity(labels: np.ndarray, scores: np.ndarray, target: float,
                              conservative: bool = False, confidence: float = 0.95) -> float:
    """Return the largest threshold whose sensitivity (score >= t) meets ``target``.

    Candidates are the positive scores, so the threshold equals an observed
    score. Returns -inf when no threshold can meet the target (e.g. conservative
    mode with too few positives), which calls everything abnormal.
    """
    y = np.asarray(labels).astype(int)
    pos = np.sort(np.asarray(scores, dtype=np.float64)[y == 1])[::-1]
    n = len(pos)
    for i, t in enumerate(pos):
        # Scores tied with t are all called positive at threshold t.
        k = int(np.searchsorted(-pos, -t, side="right"))
        if k <= i:
            continue
        if _meets(k, n, target, conservative, confidence):
            return float(t)
    return float("-inf")


def threshold_for_specificity(labels: np.ndarray, scores: np.ndarray, target: float,
                              conservative: bool = False, confidence: float = 0.95) -> float:
    """Return the smallest threshold whose specificity (score < t is normal) meets ``target``.

    Candidates are the negative scores nudged just above each one (and the
    smallest score). Returns +inf when the target cannot be met.
    """
    y = np.asarray(labels).astype(int)
    s = np.asarray(scores, dtype=np.float64)
    neg = np.sort(s[y == 0])
    n = len(neg)
    cands = np.unique(np.concatenate([[s.min()] if len(s) else [], np.nextafter(neg, np.inf)]))
    for t in cands:
        k = int(np.searchsorted(neg, t, side="left"))
        if _meets(k, n, target, conservative, confidence):
            return float(t)
    return float("inf")


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
    """Return the logistic function of ``z`` (numerically stable)."""
    z = np.asarray(z, dtype=np.float64)
    return np.where(z >= 0, 1 / (1 + np.exp(-np.abs(z))), np.exp(-np.abs(z)) / (1 + np.exp(-np.abs(z))))


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


def score_distribution(probs: np.ndarray, bins: int = 20) -> dict[str, list[float]]:
    """Return a reference histogram (equal-width on [0, 1]) and quantiles of ``probs``.

    Used later to measure drift (PSI on the histogram, KS on the quantiles).
    """
    p = np.clip(np.asarray(probs, dtype=np.float64), 0, 1)
    counts, edges = np.histogram(p, bins=bins, range=(0.0, 1.0))
    qs = np.linspace(0, 1, 21)
    return {
        "bin_edges": [float(e) for e in edges],
        "counts": [int(c) for c in counts],
        "quantile_levels": [float(q) for q in qs],
        "quantiles": [float(v) for v in np.quantile(p, qs)] if len(p) else [],
    }
