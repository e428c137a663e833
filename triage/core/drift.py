"""Drift statistics: are today's scores and inputs still like the model's reference? (pure)

:func:`psi`, :func:`ks`, :func:`unseen_metadata` and :func:`assess` take values
and return values; the scheduled job that reads recent scores from the
database and records checks and alerts is :mod:`triage.service.drift_watch`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

_EPS = 1e-4
METADATA_FIELDS = ("manufacturer", "photometric", "bits_stored", "view_position", "transfer_syntax",
                   "patient_age_years")


class DriftSettings(Protocol):
    """The ``[drift]`` settings the statistics read."""

    @property
    def min_samples(self) -> int: ...
    @property
    def psi_alert(self) -> float: ...
    @property
    def ks_alert(self) -> float: ...
    @property
    def population_age_years(self) -> tuple[float, ...]: ...
    @property
    def population_alert_fraction(self) -> float: ...


def psi(ref_counts: Sequence[float], edges: Sequence[float], sample: Sequence[float]) -> float:
    """Return the Population Stability Index of ``sample`` against a reference histogram.

    Bins are the reference's ``edges``; empty bins are floored at 1e-4 so the
    index stays finite. Raises ValueError on an empty reference or sample.
    """
    ref = np.asarray(ref_counts, dtype=np.float64)
    if ref.sum() <= 0 or len(sample) == 0:
        raise ValueError("PSI needs a non-empty reference and sample")
    got, _ = np.histogram(np.clip(sample, edges[0], edges[-1]), bins=np.asarray(edges))
    p = np.maximum(ref / ref.sum(), _EPS)
    q = np.maximum(got / got.sum(), _EPS)
    return float(np.sum((q - p) * np.log(q / p)))


def ks(levels: Sequence[float], quantiles: Sequence[float], sample: Sequence[float]) -> float:
    """Return the two-sample Kolmogorov-Smirnov statistic against a reference given by quantiles.

    The reference CDF is the piecewise-linear curve through (quantile, level).
    """
    q = np.asarray(quantiles, dtype=np.float64)
    lv = np.asarray(levels, dtype=np.float64)
    x = np.sort(np.asarray(sample, dtype=np.float64))
    if len(x) == 0 or len(q) < 2:
        raise ValueError("KS needs a non-empty sample and at least two reference quantiles")
    grid = np.unique(np.concatenate([x, q]))
    ref_cdf = np.interp(grid, q, lv, left=0.0, right=1.0)
    emp_right = np.searchsorted(x, grid, side="right") / len(x)
    emp_left = np.searchsorted(x, grid, side="left") / len(x)
    return float(max(np.max(np.abs(emp_right - ref_cdf)), np.max(np.abs(emp_left - ref_cdf))))


def unseen_metadata(seen: Mapping[str, Sequence[Any]],
                    rows: Iterable[Mapping[str, Any]]) -> dict[str, list[str]]:
    """Return, per field, the values in ``rows`` that the training metadata never had.

    Fields the card does not describe are not judged.
    """
    out: dict[str, set[str]] = {}
    known = {k: {str(v) for v in vals} for k, vals in seen.items()}
    for row in rows:
        for name, values in known.items():
            v = row.get(name)
            if v is not None and str(v) not in values:
                out.setdefault(name, set()).add(str(v))
    return {k: sorted(v) for k, v in out.items()}


@dataclass(frozen=True)
class DriftVerdict:
    """The outcome of one drift assessment."""

    n: int
    psi: float | None
    ks: float | None
    unseen: dict[str, list[str]] = field(default_factory=dict)
    alert: bool = False
    summary: str = ""


def assess(card: Mapping[str, Any], scores: Sequence[float], meta_rows: Sequence[Mapping[str, Any]],
           cfg: DriftSettings) -> DriftVerdict:
    """Compare recent ``scores`` and input metadata with the card's reference (pure).

    Returns a verdict; too few samples give no statistics and no alert.
    """
    n = len(scores)
    unseen = unseen_metadata(card.get("training_metadata", {}), meta_rows)
    outside = population_shift(meta_rows, cfg)
    if outside:
        unseen["patient_age"] = [outside]
    if n < cfg.min_samples:
        return DriftVerdict(n, None, None, unseen, bool(unseen),
                            f"{n} scored image(s), fewer than {cfg.min_samples}: no score verdict"
                            + (f"; inputs unlike training: {_fmt(unseen)}" if unseen else ""))
    ref = card["reference_scores"]
    p = psi(ref["counts"], ref["bin_edges"], scores)
    k = ks(ref["quantile_levels"], ref["quantiles"], scores)
    shifted = p >= cfg.psi_alert or k >= cfg.ks_alert
    parts = [f"PSI {p:.3f} (alert at {cfg.psi_alert}), KS {k:.3f} (alert at {cfg.ks_alert}) over {n} images"]
    if shifted:
        parts.append("score distribution has shifted from the validation reference")
    if unseen:
        parts.append(f"inputs unlike training: {_fmt(unseen)}")
    return DriftVerdict(n, p, k, unseen, shifted or bool(unseen), "; ".join(parts))


def population_shift(meta_rows: Sequence[Mapping[str, Any]], cfg: DriftSettings) -> str | None:
    """Return a sentence when too many images come from patients outside the training ages.

    Images without a stated age are not judged. Returns None when the share of
    aged images outside ``cfg.population_age_years`` is below the alert fraction.
    """
    ages = [float(r["patient_age_years"]) for r in meta_rows if r.get("patient_age_years") is not None]
    lo, hi = cfg.population_age_years
    out = [a for a in ages if not lo <= a <= hi]
    if not ages or len(out) / len(ages) < cfg.population_alert_fraction:
        return None
    return (f"{len(out)} of {len(ages)} images are from patients aged outside {lo:g}-{hi:g} years "
            f"(median {float(np.median(out)):.0f}); the model was not trained on this population")


def _fmt(unseen: Mapping[str, Sequence[str]]) -> str:
    return ", ".join(v[0] if k == "patient_age" else f"{k}={'/'.join(v[:3])}"
                     for k, v in unseen.items())
