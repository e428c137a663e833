"""triage.core.tiers: the one order of operating points and tiers."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from triage.core import tiers

THRESHOLDS = {"abnormal": 0.3, "urgent": 0.8}


@given(st.dictionaries(st.integers(0, 50), st.floats(0, 1), max_size=6))
def test_study_score_is_the_maximum_and_its_tier_follows_the_thresholds(probs: dict[int, float]) -> None:
    p, tier = tiers.study_outcome(probs.values(), THRESHOLDS)
    if not probs:
        assert (p, tier) == (None, "unscored")
    else:
        assert p == max(probs.values()) and tier == tiers.priority(p, THRESHOLDS)


@given(st.floats(0, 1), st.floats(0, 1), st.floats(0, 1))
def test_priority_is_the_highest_threshold_reached(p: float, a: float, b: float) -> None:
    th = {"abnormal": min(a, b), "urgent": max(a, b)}
    expected = "urgent" if p >= th["urgent"] else "abnormal" if p >= th["abnormal"] else "routine"
    assert tiers.priority(p, th) == expected


def test_priority_edges() -> None:
    assert tiers.priority(None, THRESHOLDS) == "unscored"
    assert tiers.priority(float("nan"), THRESHOLDS) == "unscored"
    assert tiers.priority(0.9, {"abnormal": 0.3, "urgent": None}) == "abnormal"  # None: never reached
    assert tiers.priority(0.3, THRESHOLDS) == "abnormal"  # reaching means >=


def test_ranks_bands_and_lift_agree_on_one_order() -> None:
    ranks = [tiers.rank(t, THRESHOLDS) for t in ("pending", "routine", "abnormal", "urgent")]
    assert ranks == sorted(ranks) and len(set(ranks)) == 4
    # A refused or unreadable study is read in its first-come place among routine ones.
    assert tiers.rank("unscored", THRESHOLDS) == tiers.rank("routine", THRESHOLDS)
    assert tiers.rank("retired-tier", THRESHOLDS) == tiers.rank("routine", THRESHOLDS)
    assert tiers.band_order(THRESHOLDS) == ["urgent", "abnormal", "routine", "pending"]
    assert tiers.band_order(THRESHOLDS, ["old"]) == ["urgent", "abnormal", "old", "routine",
                                                     "pending"]
    assert tiers.lift_tier(THRESHOLDS) == "abnormal" and tiers.lift_tier({"a": None}) is None
    assert tiers.rank(tiers.lift_tier(THRESHOLDS) or "", THRESHOLDS) == tiers.LIFT_RANK
    assert tiers.ordered({"u": None, **THRESHOLDS}) == [("abnormal", 0.3), ("urgent", 0.8),
                                                        ("u", None)]


def test_change_is_rise_or_fall_by_rank() -> None:
    assert tiers.change(None, "urgent", THRESHOLDS) is None
    assert tiers.change("urgent", "urgent", THRESHOLDS) is None
    assert tiers.change("routine", "abnormal", THRESHOLDS) == "rise"
    assert tiers.change("urgent", "unscored", THRESHOLDS) == "fall"
    assert tiers.change("routine", "unscored", THRESHOLDS) is None  # same place in the queue
