"""Drift statistics: are today's inputs and scores still like the model's reference? (pure)

Two kinds of drift are told apart, because they call for different actions:

- **input drift**: the images are unlike what the model was made for (the
  input guard refuses more of them than on validation, patients outside the
  training ages, acquisition values the model never saw);
- **output drift**: the distribution of scores differs from the reference.
  A change in *prevalence* (fewer or more abnormal studies than in
  validation) changes the score distribution without anything being wrong
  with the model; a change in *ranking* (abnormal studies scoring like normal
  ones, or the reverse) means the model may not hold here. When the reference
  carries the scores of abnormal and normal studies separately, the recent
  scores are fitted as a mixture of the two: if some prevalence explains them,
  the verdict is a prevalence shift; if none does, the ranking is suspect.

Alarms are calibrated against sampling noise: an alarm means the difference
is unlikely (p below ``drift.alpha``) under the reference, judged by the exact
Kolmogorov-Smirnov distribution at the sample size (reduced for the finite
reference), not by a fixed PSI or KS cut-off that a small sample exceeds by
chance. PSI is still reported, on equal-mass bins, for dashboards.

The scheduled job that reads recent results from the database is
:mod:`triage.service.drift_watch`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from scipy import optimize, stats

_EPS = 1e-4
METADATA_FIELDS = ("manufacturer", "photometric", "bits_stored", "view_position", "transfer_syntax",
                   "patient_age_years")
REPLAY_ADVICE = ("replay local labelled studies and re-fit the operating points "
                 "(docs/site-calibration.md)")


class DriftSettings(Protocol):
    """The ``[drift]`` settings the statistics read."""

    @property
    def min_samples(self) -> int: ...
    @property
    def alpha(self) -> float: ...
    @property
    def population_age_years(self) -> tuple[float, ...]: ...
    @property
    def population_alert_fraction(self) -> float: ...


def psi(ref_counts: Sequence[float] | np.ndarray, edges: Sequence[float] | np.ndarray,
        sample: Sequence[float] | np.ndarray) -> float:
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


def reference_cdf(reference: Mapping[str, Any]) -> Any:
    """Return the reference's CDF: piecewise linear through its (quantile, level) points."""
    q = np.asarray(reference["quantiles"], dtype=np.float64)
    lv = np.asarray(reference["quantile_levels"], dtype=np.float64)
    if len(q) < 2:
        raise ValueError("the reference needs at least two quantiles")
    return lambda x: np.interp(x, q, lv, left=0.0, right=1.0)


def ks(levels: Sequence[float], quantiles: Sequence[float], sample: Sequence[float]) -> float:
    """Return the Kolmogorov-Smirnov statistic of ``sample`` against a reference given by quantiles.

    The reference CDF is the piecewise-linear curve through (quantile, level).
    """
    x = np.asarray(sample, dtype=np.float64)
    if len(x) == 0:
        raise ValueError("KS needs a non-empty sample")
    cdf = reference_cdf({"quantiles": quantiles, "quantile_levels": levels})
    return _ks_stat(np.sort(x), cdf)


def _ks_stat(x_sorted: np.ndarray, cdf: Any) -> float:
    n = len(x_sorted)
    f = cdf(x_sorted)
    above = np.arange(1, n + 1) / n - f
    below = f - np.arange(0, n) / n
    return float(max(above.max(), below.max()))


def ks_pvalue(d: float, n: int, reference_n: int | None = None) -> float:
    """Return the p-value of a KS statistic ``d`` for ``n`` samples against a reference.

    The exact one-sample distribution (SciPy's ``kstwo``) at the effective size
    n N / (n + N) when the reference itself was estimated from N values.
    """
    n_eff = n if not reference_n else n * reference_n / (n + reference_n)
    return float(stats.kstwo.sf(d, max(1, round(n_eff))))


def equal_mass_psi(reference: Mapping[str, Any], sample: Sequence[float] | np.ndarray,
                   bins: int = 10) -> float:
    """Return PSI over bins that hold equal shares of the reference (deciles by default)."""
    q = np.asarray(reference["quantiles"], dtype=np.float64)
    lv = np.asarray(reference["quantile_levels"], dtype=np.float64)
    edges = np.unique(np.interp(np.linspace(0, 1, bins + 1), lv, q))
    if len(edges) < 3:
        return 0.0
    cdf = reference_cdf(reference)
    expected = np.diff(cdf(edges))
    expected[0] += float(cdf(edges[0]))
    expected[-1] += 1.0 - float(cdf(edges[-1]))
    return psi(expected, edges, sample)


def unseen_metadata(seen: Mapping[str, Sequence[Any]],
                    rows: Iterable[Mapping[str, Any]]) -> dict[str, list[str]]:
    """Return, per field, the values in ``rows`` that the reference metadata never had.

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


# --- output drift: the scores ---------------------------------------------------------------


@dataclass(frozen=True)
class ScoreDrift:
    """How recent scores compare with the reference."""

    n: int
    ks: float
    p_value: float
    psi: float
    shifted: bool
    kind: str  # "none" | "prevalence" | "ranking"
    prevalence: float | None = None  # estimated share of abnormal studies, when it explains them
    reference_prevalence: float | None = None
    mixture_p_value: float | None = None


def fit_prevalence(x_sorted: np.ndarray, pos: Mapping[str, Any], neg: Mapping[str, Any]
                   ) -> tuple[float, float]:
    """Return (prevalence, KS statistic) of the mixture of the abnormal and normal references
    closest to the sample (the minimum-distance estimate)."""
    f1, f0 = reference_cdf(pos), reference_cdf(neg)
    c1, c0 = f1(x_sorted), f0(x_sorted)

    def distance(pi: float) -> float:
        return _ks_stat(x_sorted, lambda _x: pi * c1 + (1 - pi) * c0)

    res = optimize.minimize_scalar(distance, bounds=(0.0, 1.0), method="bounded",
                                   options={"xatol": 1e-3})
    return float(res.x), float(res.fun)


def score_drift(card: Mapping[str, Any], scores: Sequence[float], alpha: float) -> ScoreDrift:
    """Judge recent ``scores`` against the card's (or a site profile's) reference (pure).

    Raises KeyError when the card has no ``reference_scores``.
    """
    ref = card["reference_scores"]
    x = np.sort(np.asarray(scores, dtype=np.float64))
    n, ref_n = len(x), _reference_n(ref)
    d = _ks_stat(x, reference_cdf(ref))
    p = ks_pvalue(d, n, ref_n)
    score_psi = equal_mass_psi(ref, x)
    pos, neg = card.get("reference_scores_pos"), card.get("reference_scores_neg")
    ref_prev = card.get("reference_prevalence")
    if p >= alpha:
        return ScoreDrift(n, d, p, score_psi, False, "none", reference_prevalence=ref_prev)
    if pos is None or neg is None:
        return ScoreDrift(n, d, p, score_psi, True, "ranking", reference_prevalence=ref_prev)
    prev, dm = fit_prevalence(x, pos, neg)
    pm = ks_pvalue(dm, n, _mixture_n(prev, _reference_n(pos), _reference_n(neg)))
    kind = "prevalence" if pm >= alpha else "ranking"
    return ScoreDrift(n, d, p, score_psi, True, kind, prev, ref_prev, pm)


def _mixture_n(prevalence: float, n_pos: int | None, n_neg: int | None) -> int | None:
    """Return the effective size of a mixture reference: 1 / (pi^2 / N1 + (1 - pi)^2 / N0)."""
    if not n_pos or not n_neg:
        return None
    inv = prevalence ** 2 / n_pos + (1 - prevalence) ** 2 / n_neg
    return round(1 / inv) if inv > 0 else None


def _reference_n(ref: Mapping[str, Any]) -> int | None:
    counts = ref.get("counts")
    return int(sum(counts)) if counts else None


# --- input drift -----------------------------------------------------------------------------


def refusal_excess(refused: int, n: int, expected_rate: float, alpha: float) -> str | None:
    """Return a sentence when the input guard refuses more images than it did on validation.

    A one-sided binomial test of ``refused`` of ``n`` against ``expected_rate``.
    """
    if n == 0 or refused == 0:
        return None
    p = float(stats.binomtest(refused, n, max(expected_rate, 1e-6), alternative="greater").pvalue)
    if p >= alpha:
        return None
    return (f"the input guard refused {refused} of {n} recent images ({refused / n:.0%}; "
            f"about {expected_rate:.1%} on validation): many inputs are not what the model was "
            "made for")


# --- the verdict ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DriftVerdict:
    """The outcome of one drift assessment, in numbers and in words."""

    n: int
    psi: float | None
    ks: float | None
    unseen: dict[str, list[str]] = field(default_factory=dict)
    alert: bool = False
    summary: str = ""
    kind: str = "none"  # "none" | "inputs" | "prevalence" | "ranking" | "inputs+ranking" ...
    p_value: float | None = None
    prevalence: float | None = None
    action: str = ""


def _pct(v: float | None) -> str:
    return "unknown" if v is None or not math.isfinite(v) else f"{v:.0%}"


def assess(card: Mapping[str, Any], scores: Sequence[float], meta_rows: Sequence[Mapping[str, Any]],
           cfg: DriftSettings, refused: int = 0, judged: int = 0,
           expected_refusal_rate: float | None = None) -> DriftVerdict:
    """Compare recent scores and inputs with the reference; return the verdict (pure).

    ``refused`` of ``judged`` recent images were refused by the input guard.
    Too few scored images give no score verdict (inputs are still judged).
    """
    inputs: list[str] = []
    unseen = unseen_metadata(card.get("training_metadata", {}), meta_rows)
    if unseen:
        inputs.append("acquisition values the model never saw: " + ", ".join(
            f"{k}={'/'.join(v[:3])}" for k, v in unseen.items()))
    outside = population_shift(meta_rows, cfg)
    if outside:
        unseen["patient_age"] = [outside]
        inputs.append(outside)
    if expected_refusal_rate is not None:
        excess = refusal_excess(refused, judged, expected_refusal_rate, cfg.alpha)
        if excess:
            inputs.append(excess)
    n = len(scores)
    kinds = ["inputs"] if inputs else []
    if n < cfg.min_samples or "reference_scores" not in card:
        why = (f"{n} scored image(s), fewer than {cfg.min_samples}" if n < cfg.min_samples
               else "no reference scores")
        parts = [f"{why}: no verdict on scores yet", *inputs]
        return DriftVerdict(n, None, None, unseen, bool(inputs), "; ".join(parts),
                            "+".join(kinds) or "none", action=_action(kinds))
    sd = score_drift(card, scores, cfg.alpha)
    parts = [f"{n} recent images: KS {sd.ks:.3f} (p {sd.p_value:.3g}), PSI {sd.psi:.3f}"]
    if sd.kind == "prevalence":
        kinds.append("prevalence")
        parts.append(f"scores are explained by a different share of abnormal studies "
                     f"(about {_pct(sd.prevalence)}, validation {_pct(sd.reference_prevalence)}): "
                     "a prevalence shift, not a ranking problem")
    elif sd.kind == "ranking":
        kinds.append("ranking")
        parts.append("recent scores differ from validation in a way a change in prevalence does "
                     "not explain: the model's ranking may not hold here")
    parts += inputs
    alert = bool(inputs) or sd.kind == "ranking"
    return DriftVerdict(n, sd.psi, sd.ks, unseen, alert, "; ".join(parts),
                        "+".join(kinds) or "none", sd.p_value, sd.prevalence, _action(kinds))


def _action(kinds: Sequence[str]) -> str:
    if "ranking" in kinds:
        return f"Recent scores differ from validation: {REPLAY_ADVICE}."
    if "inputs" in kinds:
        return ("Inputs differ from what the model was made for: check which studies are routed "
                "to triage and the refusals on the worklist; " + REPLAY_ADVICE + ".")
    if "prevalence" in kinds:
        return ("Fewer or more abnormal studies than in validation: positive predictive values "
                "change; no action on the model is needed.")
    return ""
