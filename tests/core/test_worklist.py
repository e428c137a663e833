"""The worklist's order (pure, with hypothesis) and the rows it is built from (real SQLite)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from triage.core.tiers import PENDING, band_order
from triage.core.tiers import lift_tier as lift_band
from triage.core.worklist import (
    Row,
    arrange,
    format_study_datetime,
    format_wait,
    place,
)

THRESHOLDS = {"abnormal": 0.3, "urgent": 0.8}
TIERS = ["urgent", "abnormal", "routine", "unscored", PENDING]
NOW = 1_000_000.0
MAX_WAIT = 60.0  # minutes

rows_st = st.lists(
    st.tuples(st.sampled_from(TIERS), st.floats(0, NOW, allow_nan=False)), max_size=30,
).map(lambda xs: [Row(study_id=i, tier=t, waiting_since=w) for i, (t, w) in enumerate(xs)])


def _rank(band: str) -> int:
    return band_order(THRESHOLDS).index(band)


# --- pure ordering -----------------------------------------------------------------


def test_bands_run_from_the_highest_threshold_down_then_routine_and_pending() -> None:
    assert band_order(THRESHOLDS) == ["urgent", "abnormal", "routine", PENDING]
    assert band_order({"a": 0.9, "b": None, "c": 0.5}, ["old"]) == [
        "a", "c", "b", "old", "routine", PENDING]
    assert lift_band(THRESHOLDS) == "abnormal" and lift_band({}) is None


@given(rows_st, st.floats(0, 10 * MAX_WAIT))
def test_nothing_is_dropped_and_the_order_is_band_then_longest_wait(rows: list[Row], max_wait: float) -> None:
    out = arrange(rows, NOW, THRESHOLDS, max_wait)
    assert sorted(p.row.study_id for p in out) == [r.study_id for r in rows]
    assert sum(p.row.tier == "unscored" for p in out) == sum(r.tier == "unscored" for r in rows)
    for a, b in itertools.pairwise(out):
        assert (_rank(a.band), -a.waited_s) <= (_rank(b.band), -b.waited_s)


@given(rows_st, st.floats(1, 10 * MAX_WAIT))
def test_ageing_lifts_only_studies_without_a_finding_and_only_into_the_lowest_point(
        rows: list[Row], max_wait: float) -> None:
    for p in arrange(rows, NOW, THRESHOLDS, max_wait):
        should_lift = p.row.tier in ("routine", "unscored", PENDING) and p.waited_s / 60 > max_wait
        assert p.aged == should_lift
        own = "routine" if p.row.tier == "unscored" else p.row.tier  # never demoted
        assert p.band == ("abnormal" if should_lift else own)
    # an urgent study is never overtaken by a lifted one
    out = arrange(rows, NOW, THRESHOLDS, max_wait)
    urgent = [i for i, p in enumerate(out) if p.row.tier == "urgent"]
    lifted = [i for i, p in enumerate(out) if p.aged]
    assert not urgent or not lifted or max(urgent) < min(lifted)


@given(st.sampled_from(TIERS), st.floats(0, NOW), st.floats(0, NOW))
def test_waiting_longer_never_moves_a_study_down(tier: str, since: float, extra: float) -> None:
    row = Row(study_id=1, tier=tier, waiting_since=since)
    early, late = place(row, NOW, THRESHOLDS, MAX_WAIT), place(row, NOW + extra, THRESHOLDS, MAX_WAIT)
    assert _rank(late.band) <= _rank(early.band)


def test_ageing_off_keeps_every_study_in_its_tier() -> None:
    rows = [Row(1, "routine", 0.0), Row(2, "abnormal", 0.0)]
    assert [p.band for p in arrange(rows, NOW, THRESHOLDS, 0.0)] == ["abnormal", "routine"]


def test_an_unscored_study_keeps_its_first_come_place_among_routine_ones() -> None:
    rows = [Row(1, "routine", NOW - 60), Row(2, "unscored", NOW - 300), Row(3, "routine", NOW - 600)]
    out = arrange(rows, NOW, THRESHOLDS, 0.0)
    assert [p.row.study_id for p in out] == [3, 2, 1]
    assert {p.band for p in out} == {"routine"} and out[1].row.tier == "unscored"


def test_a_concrete_worklist_in_order() -> None:
    rows = [
        Row(1, "routine", NOW - 60), Row(2, "urgent", NOW - 10), Row(3, "abnormal", NOW - 600),
        Row(4, "routine", NOW - 7200), Row(5, "unscored", NOW - 30), Row(6, PENDING, NOW - 5),
        Row(7, "urgent", NOW - 20), Row(8, "routine", NOW - 120),
    ]
    out = arrange(rows, NOW, THRESHOLDS, MAX_WAIT)
    assert [p.row.study_id for p in out] == [7, 2, 4, 3, 8, 1, 5, 6]
    assert [p.band for p in out][:4] == ["urgent", "urgent", "abnormal", "abnormal"]
    assert out[2].aged and not out[3].aged


@pytest.mark.parametrize("seconds, text", [(0, "0 s"), (59.9, "59 s"), (61, "1 min"),
                                           (3600 + 5 * 60, "1 h 05 min"), (2 * 86400 + 4 * 3600, "2 d 4 h")])
def test_waiting_time_is_readable(seconds: float, text: str) -> None:
    assert format_wait(seconds) == text


def test_study_date_and_time_are_formatted_from_dicom() -> None:
    assert format_study_datetime("20260105", "093000.123") == "2026-01-05 09:30"
    assert format_study_datetime(None, None) == ""
    assert format_study_datetime("2026", None) == "2026"
