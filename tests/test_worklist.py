"""The worklist's order (pure, with hypothesis) and the rows it is built from (real SQLite)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from triage import db
from triage.config import WorklistConfig
from triage.db import Result, Study
from triage.pages import ModelInfo, Pages, load_rows
from triage.store import Store
from triage.worklist import (
    PENDING,
    Row,
    arrange,
    band_order,
    format_study_datetime,
    format_wait,
    lift_band,
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


def test_bands_run_from_the_highest_threshold_down_then_routine_unscored_pending() -> None:
    assert band_order(THRESHOLDS) == ["urgent", "abnormal", "routine", "unscored", PENDING]
    assert band_order({"a": 0.9, "b": None, "c": 0.5}, ["old"]) == [
        "a", "c", "b", "old", "routine", "unscored", PENDING]
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
        assert p.band == ("abnormal" if should_lift else p.row.tier)
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
    rows = [Row(1, "routine", 0.0), Row(2, "unscored", 0.0)]
    assert [p.band for p in arrange(rows, NOW, THRESHOLDS, 0.0)] == ["routine", "unscored"]


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


# --- rows from the database ----------------------------------------------------------


def add_study(store: Store, uid: str, state: str, since: float, results: list[tuple[str, float | None]] = (),
              reported_at: float | None = None, accession: str | None = None,
              reasons: list[str] | None = None) -> int:
    """Insert a study and its result versions directly (tier, probability per version)."""
    with store.write() as s:
        study = Study(study_uid=uid, state=state, version=max(1, len(results)), n_instances=1,
                      first_received_at=since, last_received_at=since, reported_at=reported_at,
                      accession_number=accession or uid, patient_name="SYNTHETIC^PATIENT")
        s.add(study)
        s.flush()
        prev = None
        for v, (tier, p) in enumerate(results, start=1):
            change = None if prev is None or prev == tier else (
                "fall" if _rank(tier) > _rank(prev) else "rise")
            s.add(Result(study_id=study.id, version=v, tier=tier, probability=p, previous_tier=prev,
                         tier_change=change,
                         state=db.SCORED if p is not None else db.UNSCORED,
                         reasons=json.dumps(reasons or []), model_name="m", model_sha256="0" * 64,
                         thresholds=json.dumps(THRESHOLDS), timings="{}", created_at=since + v))
            prev = tier
        return study.id


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(db.open_db(tmp_path / "t.sqlite"), clock=lambda: NOW)


def test_every_active_study_has_a_row_and_reported_ones_go_to_history(store: Store, tmp_path: Path) -> None:
    add_study(store, "recv", db.RECEIVING, NOW - 50)
    add_study(store, "queued", db.COMPLETE, NOW - 40)
    add_study(store, "urg", db.SCORED, NOW - 30, [("urgent", 0.9)])
    add_study(store, "fell", db.SCORED, NOW - 20, [("urgent", 0.9), ("routine", 0.1)])
    add_study(store, "lat", db.UNSCORED, NOW - 10, [("unscored", None)], reasons=["image x: lateral view"])
    add_study(store, "again", db.RECEIVING, NOW - 5, [("abnormal", 0.5)])  # reopened by a late image
    add_study(store, "done", db.SCORED, NOW - 60, [("urgent", 0.95)], reported_at=NOW - 1, accession="ACC-77")
    pages = Pages(store, tmp_path / "www", ModelInfo("m", "0" * 64, "", THRESHOLDS),
                  WorklistConfig(routine_max_wait_min=0), clock=lambda: NOW)
    placed = pages.render_worklist()
    order = [p.row.accession_number for p in placed]
    assert order == ["urg", "again", "fell", "lat", "recv", "queued"]
    by = {p.row.accession_number: p for p in placed}
    assert by["again"].row.rescoring and by["again"].band == "abnormal"
    assert by["recv"].band == PENDING and by["recv"].row.reason == "receiving images"
    assert by["queued"].row.reason == "queued for scoring"
    assert by["fell"].row.tier_change == "fall" and by["fell"].row.previous_tier == "urgent"
    assert by["lat"].row.reason == "image x: lateral view"
    doc = json.loads(pages.worklist_json.read_text())
    assert [s["accession_number"] for s in doc["studies"]] == order
    html = pages.worklist_html.read_text()
    assert html.index(">urg<") < html.index(">again<") < html.index(">fell<") < html.index(">lat<")
    assert "fell from urgent" in html and "Not for diagnostic use: triage aid" in html
    assert sorted(p.name for p in pages.out_dir.iterdir()) == ["worklist.html", "worklist.json"]
    assert [r.accession_number for r in load_rows(store, reported=True)] == ["ACC-77"]
    assert [r.accession_number for r in load_rows(store, reported=True, accession="C-7")] == ["ACC-77"]
    assert load_rows(store, reported=True, accession="%") == []  # LIKE wildcards are literal


def test_marking_reported_moves_a_study_and_a_second_mark_keeps_the_first_time(store: Store) -> None:
    sid = add_study(store, "a", db.SCORED, NOW - 30, [("routine", 0.1)])
    assert store.mark_reported(sid) and store.mark_reported(sid)
    with store.read() as s:
        assert s.get(Study, sid).reported_at == NOW
    assert load_rows(store) == [] and len(load_rows(store, reported=True)) == 1
    assert store.mark_reported(sid, reported=False)
    assert len(load_rows(store)) == 1
    assert not store.mark_reported(9999)
