"""triage.core.drift: alarms calibrated against sampling noise; prevalence told from ranking."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from tests.conftest import REPO
from triage.config import DriftConfig
from triage.core.drift import assess, equal_mass_psi, ks, psi, refusal_excess, score_drift
from triage.core.metrics import score_distribution

POS, NEG = stats.beta(5, 1.6), stats.beta(1.4, 6)  # scores of abnormal and normal studies
REF_PREVALENCE = 0.74  # the validation split's share of abnormal studies


def _mixture(rng: np.random.Generator, n: int, prevalence: float) -> np.ndarray:
    k = rng.binomial(n, prevalence)
    return np.r_[POS.rvs(k, random_state=rng), NEG.rvs(n - k, random_state=rng)]


def _card(rng: np.random.Generator, n_ref: int = 745) -> dict:
    """A card whose reference is one validation set of ``n_ref`` studies, as export writes it."""
    k = round(n_ref * REF_PREVALENCE)
    pos, neg = POS.rvs(k, random_state=rng), NEG.rvs(n_ref - k, random_state=rng)
    return {"reference_scores": score_distribution(np.r_[pos, neg]),
            "reference_scores_pos": score_distribution(pos),
            "reference_scores_neg": score_distribution(neg),
            "reference_prevalence": k / n_ref,
            "training_metadata": {"photometric": ["MONOCHROME1", "MONOCHROME2"]}}


def _draw_reference(rng: np.random.Generator, ref: dict, n: int) -> np.ndarray:
    """Draw ``n`` scores from the reference itself (inverse CDF through its quantiles)."""
    return np.interp(rng.random(n), ref["quantile_levels"], ref["quantiles"])


@pytest.mark.parametrize("n", [30, 50, 100, 400])
def test_samples_of_the_reference_raise_at_most_5_percent_false_alarms(n: int) -> None:
    rng = np.random.default_rng(n)
    card = _card(rng)
    cfg = DriftConfig(min_samples=min(n, 50))
    draws = 1000
    alarms = sum(assess(card, list(_draw_reference(rng, card["reference_scores"], n)),
                        [], cfg).alert for _ in range(draws))
    assert alarms / draws <= 0.05


def test_the_same_population_as_the_reference_rarely_alarms() -> None:
    rng = np.random.default_rng(11)
    card = _card(rng)
    cfg = DriftConfig()
    alarms = sum(assess(card, list(_mixture(rng, 100, REF_PREVALENCE)), [], cfg).alert
                 for _ in range(300))
    assert alarms / 300 <= 0.05


def test_a_site_with_fewer_abnormal_studies_is_a_prevalence_shift_not_an_alarm() -> None:
    rng = np.random.default_rng(3)
    card = _card(rng)
    v = assess(card, list(_mixture(rng, 400, 0.25)), [], DriftConfig())
    assert v.kind == "prevalence" and not v.alert
    assert v.prevalence == pytest.approx(0.25, abs=0.08)
    assert "prevalence shift, not a ranking problem" in v.summary and "validation 74%" in v.summary
    assert "no action on the model" in v.action


def test_abnormal_studies_scoring_like_normal_ones_is_a_ranking_alarm() -> None:
    rng = np.random.default_rng(4)
    card = _card(rng)
    # Most studies now score in the uncertain middle, which no share of abnormal and normal
    # studies produces. (Scores alone cannot tell "all normal" from "every abnormal study
    # scored as normal": only shapes no mixture explains are called a ranking problem.)
    broken = np.r_[stats.beta(3, 3).rvs(300, random_state=rng), NEG.rvs(100, random_state=rng)]
    v = assess(card, list(broken), [], DriftConfig())
    assert v.alert and v.kind == "ranking"
    assert "ranking may not hold" in v.summary and "replay local labelled studies" in v.action


def test_input_drift_is_named_separately_from_the_scores() -> None:
    rng = np.random.default_rng(5)
    card, cfg = _card(rng), DriftConfig(min_samples=5)
    kids = [{"patient_age_years": a, "photometric": "MONOCHROME2"} for a in (2, 3, 4, 5, None)]
    adults = kids + [{"patient_age_years": a, "photometric": "MONOCHROME2"} for a in (45, 61, 38)]
    assert not assess(card, [0.8] * 5, kids, cfg).unseen
    v = assess(card, list(_mixture(rng, 200, REF_PREVALENCE)), adults, cfg)
    assert v.alert and v.kind == "inputs" and "3 of 7 images" in v.summary
    assert "not trained on this population" in v.summary
    foreign = assess(card, [0.5] * 3, [{"photometric": "RGB"}] * 3, cfg)
    assert foreign.alert and foreign.unseen == {"photometric": ["RGB"]} and foreign.kind == "inputs"


def test_refusals_alarm_only_beyond_what_validation_refused() -> None:
    assert refusal_excess(2, 200, 0.01, 0.01) is None  # 1% of 200 is about 2: expected
    msg = refusal_excess(40, 200, 0.01, 0.01)
    assert msg is not None and "refused 40 of 200" in msg
    v = assess(_card(np.random.default_rng(6)), [0.9] * 10, [], DriftConfig(), refused=40,
               judged=200, expected_refusal_rate=0.01)
    assert v.alert and v.kind == "inputs" and "no verdict on scores yet" in v.summary


def test_psi_and_ks_match_direct_computation() -> None:
    from scipy.stats import ks_2samp

    rng = np.random.default_rng(1)
    ref, sample = rng.uniform(0, 1, 50_000), rng.beta(2, 3, 3000)
    counts, edges = np.histogram(ref, bins=20, range=(0, 1))
    got, _ = np.histogram(sample, bins=edges)
    p, q = counts / counts.sum(), got / got.sum()
    assert psi(counts, edges, sample) == pytest.approx(np.sum((q - p) * np.log(q / p)), rel=1e-6)
    levels = np.linspace(0, 1, 101)
    assert ks(levels, np.quantile(ref, levels), sample) == pytest.approx(
        ks_2samp(ref, sample).statistic, abs=0.02)
    same = equal_mass_psi(score_distribution(ref), rng.uniform(0, 1, 5000))
    assert same < 0.01


def test_the_shipped_card_is_judged_without_class_references() -> None:
    card = json.loads((REPO / "models" / "cxr-pneumonia-mnv2.json").read_text())
    sd = score_drift(card, list(np.linspace(0.01, 0.2, 200)), 0.01)  # everything low: shifted
    assert sd.shifted and sd.kind in ("prevalence", "ranking")
