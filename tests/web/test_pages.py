"""The worklist pages from real database rows: every active study has a row, in order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.core.test_worklist import NOW, THRESHOLDS, _rank
from triage.config import WorklistConfig
from triage.core.tiers import PENDING
from triage.store import schema as db
from triage.store.database import open_db
from triage.store.repository import Store
from triage.store.schema import Result, Study
from triage.web.pages import ModelInfo, Pages, load_rows


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
    return Store(open_db(tmp_path / "t.sqlite"), clock=lambda: NOW)


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


LONG_ACC = "ACC-" + "9" * 52  # 56 characters, as some RIS systems send


def test_worklist_rows_as_radiologists_see_them(store: Store, tmp_path: Path) -> None:
    import re

    from triage import resources

    long_id = add_study(store, "long", db.SCORED, NOW - 50, [("urgent", 0.95)], accession=LONG_ACC)
    bare_id = add_study(store, "bare", db.SCORED, NOW - 40, [("routine", 0.10)])
    with store.write() as s:
        st = s.get(Study, long_id)
        assert st is not None
        st.patient_age, st.patient_sex = "064Y", "F"
        bare = s.get(Study, bare_id)
        assert bare is not None
        bare.study_description = bare.study_date = bare.modality = None
    pages = Pages(store, tmp_path / "www", ModelInfo("m", "0" * 64, "", THRESHOLDS),
                  WorklistConfig(), clock=lambda: NOW)
    pages.render_worklist()
    html = pages.worklist_html.read_text()
    rows = re.findall(r'<tr class="study".*?</tr>', html, re.S)
    assert len(rows) == 2
    # Age and sex on every row, in words; unknown said so rather than left blank.
    assert all('class="agesex"' in r for r in rows)
    assert "64 y, female" in html and "age, sex unknown" in html
    # The long accession number is cut by the stylesheet, the full text on hover.
    assert f'title="{LONG_ACC}"' in html
    css = (resources.path("templates") / "style.css").read_text()
    rule = re.search(r"td\.acc[^{]*\{[^}]*\}", css.split("td.date, td.acc")[1])
    assert rule is not None and "text-overflow: ellipsis" in rule.group(0)
    assert "max-width" in rule.group(0)
    # A study page with empty fields has no empty separators.
    page = pages.study_page(bare_id)
    assert page is not None
    meta = re.search(r'<p class="meta">.*?</p>', page, re.S)
    assert meta is not None
    assert not re.search(r"&middot;\s*&middot;|·\s*·", meta.group(0)), meta.group(0)


def test_unreadable_image_reasons_are_words_not_exception_names(tmp_path: Path) -> None:
    from triage.core.errors import UnscorableError
    from triage.imaging.loading import load_image

    bad = tmp_path / "x.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    with pytest.raises(UnscorableError) as e:
        load_image(bad)
    assert e.value.reason == "image cannot be decoded"


def test_a_render_reuses_unchanged_rows_and_equals_a_render_from_scratch(store: Store, tmp_path: Path) -> None:
    clock = [NOW]
    ids = [add_study(store, f"s{i}", db.SCORED, NOW - 60 * i, [("routine", 0.1 + i / 100)])
           for i in range(5)]
    model = ModelInfo("m", "0" * 64, "", THRESHOLDS)
    pages = Pages(store, tmp_path / "www", model, WorklistConfig(routine_max_wait_min=0),
                  clock=lambda: clock[0])
    pages.render_worklist()
    before = dict(pages._row_cache)
    with store.write() as s:  # one study gets a new result: only its row changes
        s.add(Result(study_id=ids[2], version=2, tier="urgent", probability=0.97, previous_tier="routine",
                     tier_change="rise", state=db.SCORED, reasons="[]", model_name="m",
                     model_sha256="0" * 64, thresholds=json.dumps(THRESHOLDS), timings="{}",
                     created_at=NOW))
        s.get(Study, ids[2]).version = 2
    pages.render_worklist()
    after = pages._row_cache
    reused = [k for k in after if k in before and after[k] is before[k]]
    assert len(after) == 5 and len(reused) == 4 and all(k[0].study_id != ids[2] for k in reused)
    cached_html = pages.worklist_html.read_text()
    scratch = Pages(store, tmp_path / "www2", model, WorklistConfig(routine_max_wait_min=0),
                    clock=lambda: clock[0])
    scratch.render_worklist()
    assert cached_html == scratch.worklist_html.read_text()
    assert "rose from routine" in cached_html
    clock[0] = NOW + 3600  # an hour later every displayed wait has changed: nothing is reused
    pages.render_worklist()
    assert not any(pages._row_cache.get(k) is v for k, v in after.items())
