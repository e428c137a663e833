"""Per-site operating points with a conservative guarantee (pure).

A threshold chosen on one population does not carry its sensitivity to
another. Given a site's labelled studies (their scores and labels), each
operating point is placed so that its target holds at the lower bound of the
exact (Clopper-Pearson) interval at the chosen confidence, not merely at the
point estimate: for a sensitivity target, the largest threshold whose
sensitivity's lower bound reaches the target. With too few positives no
threshold can give that guarantee, and :func:`fit_points` says so instead of
returning a point that only looks safe.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from triage.core import metrics
from triage.core.errors import TriageError


class CannotGuarantee(TriageError):
    """The labelled studies are too few for a target at the asked confidence."""


@dataclass(frozen=True)
class Target:
    """What one operating point must achieve: a sensitivity or specificity at least ``target``."""

    name: str
    metric: str  # "sensitivity" | "specificity"
    target: float


@dataclass(frozen=True)
class SitePoint:
    """A fitted operating point with the rates it achieves on the site's studies."""

    name: str
    metric: str
    target: float
    threshold: float
    sensitivity: metrics.Rate
    specificity: metrics.Rate

    def to_dict(self) -> dict[str, object]:
        """Return the point as a profile and a report store it."""
        return {"name": self.name, "metric": self.metric, "target": self.target,
                "threshold": self.threshold, "conservative": True,
                "sensitivity": self.sensitivity.value,
                "sensitivity_ci": [self.sensitivity.lower, self.sensitivity.upper],
                "specificity": self.specificity.value,
                "specificity_ci": [self.specificity.lower, self.specificity.upper]}


def min_cases(target: float, confidence: float) -> int:
    """Return the fewest cases of a class for which any threshold can guarantee ``target``.

    Even when every case is called correctly, the Clopper-Pearson lower bound
    of n/n is (alpha / 2) ** (1 / n); it must reach the target.
    """
    alpha = 1.0 - confidence
    return math.ceil(math.log(alpha / 2) / math.log(target))


def fit_points(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray,
               targets: Sequence[Target], confidence: float = 0.95) -> list[SitePoint]:
    """Return each target's threshold fitted conservatively on labelled scores.

    Raises CannotGuarantee (naming the point, the cases it had and how many it
    would need) when a target cannot hold at the lower confidence bound.
    """
    y = np.asarray(labels).astype(int)
    s = np.asarray(scores, dtype=np.float64)
    out = []
    for t in targets:
        n_class = int((y == 1).sum()) if t.metric == "sensitivity" else int((y == 0).sum())
        need = min_cases(t.target, confidence)
        thr = metrics.select_threshold(y, s, t.metric, t.target, True, confidence)
        if not math.isfinite(thr):
            kind = "abnormal" if t.metric == "sensitivity" else "normal"
            raise CannotGuarantee(
                f"operating point {t.name}: {n_class} labelled {kind} studies cannot guarantee "
                f"{t.metric} {t.target:g} at {confidence:.0%} confidence (at least {need} "
                f"are needed even if every one is called correctly, more if some are missed)")
        sens, spec = metrics.sens_spec(y, s, thr, confidence)
        out.append(SitePoint(t.name, t.metric, t.target, thr, sens, spec))
    return out


def targets_of(points: Sequence[Any], sensitivity: float | None) -> list[Target]:
    """Return the operating points to fit: the configured ones, the most sensitive at ``sensitivity``.

    ``points`` are ``[calibration] operating_points`` (name, metric, target).
    """
    out = [Target(p.name, p.metric, p.target) for p in points]
    sens = [t for t in out if t.metric == "sensitivity"]
    if sensitivity is not None and sens:
        lowest = max(sens, key=lambda t: t.target)  # the highest sensitivity: the lowest threshold
        out = [Target(t.name, t.metric, sensitivity) if t is lowest else t for t in out]
    return out
