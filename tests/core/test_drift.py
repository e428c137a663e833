"""triage.core.drift: PSI, KS, unseen metadata and the population check (pure)."""

from __future__ import annotations

import numpy as np
import pytest

from triage.config import DriftConfig
from triage.core.drift import assess, ks, psi
from triage.core.metrics import score_distribution


def _card(ref: np.ndarray) -> dict:
    return {"reference_scores": score_distribution(ref),
            "training_metadata": {"photometric": ["MONOCHROME2"]}}


def test_drift_alerts_on_a_shifted_distribution_and_not_on_a_matching_one() -> None:
    rng = np.random.default_rng(0)
    ref = rng.beta(5, 2, 2000)
    card, cfg = _card(ref), DriftConfig(min_samples=50)
    same = assess(card, list(rng.beta(5, 2, 400)), [{"photometric": "MONOCHROME2"}] * 400, cfg)
    shifted = assess(card, list(rng.beta(2, 5, 400)), [{"photometric": "MONOCHROME2"}] * 400, cfg)
    assert not same.alert and same.psi < 0.1 and same.ks < 0.1
    assert shifted.alert and shifted.psi > cfg.psi_alert and shifted.ks > cfg.ks_alert
    foreign = assess(card, list(rng.beta(5, 2, 400)), [{"photometric": "MONOCHROME1"}] * 400, cfg)
    assert foreign.alert and foreign.unseen == {"photometric": ["MONOCHROME1"]}


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


def test_population_shift_is_named_when_adults_arrive() -> None:
    card, cfg = _card(np.random.default_rng(2).beta(5, 2, 500)), DriftConfig(min_samples=5)
    kids = [{"patient_age_years": a} for a in (2, 3, 4, 5, None)]
    adults = kids + [{"patient_age_years": a} for a in (45, 61, 38)]
    assert not assess(card, [0.8] * 5, kids, cfg).unseen
    v = assess(card, [0.8] * 8, adults, cfg)
    assert v.alert and "3 of 7 images" in v.summary and "not trained on this population" in v.summary
