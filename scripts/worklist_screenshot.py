"""Regenerate docs/worklist.png: the worklist page for a handful of synthetic studies.

Usage: .venv/bin/python scripts/worklist_screenshot.py [OUT.png]

The studies, their probabilities and the alert are made up for the picture (no
patient data exists here); the page itself is rendered by the daemon's own
code (triage.web.pages) into a temporary data directory and photographed in
Debian's headless Chromium.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from triage.config import WorklistConfig
from triage.store import schema as db
from triage.store.database import open_db
from triage.store.repository import Store
from triage.store.schema import Alert, Result, Study
from triage.web.pages import ModelInfo, Pages

REPO = Path(__file__).resolve().parents[1]

THRESHOLDS = {"abnormal": 0.31, "urgent": 0.78}
MIN = 60.0
# accession, patient, state, minutes waiting, [(tier, probability) per version], note
STUDIES = [
    ("ACC-24117", "DEMO^ALPHA", db.SCORED, 4, [("urgent", 0.91)], None),
    ("ACC-24102", "DEMO^BRAVO", db.SCORED, 22, [("urgent", 0.86)], None),
    ("ACC-24110", "DEMO^CHARLIE", db.SCORED, 12, [("abnormal", 0.58)], None),
    ("ACC-24089", "DEMO^DELTA", db.SCORED, 41, [("urgent", 0.81), ("abnormal", 0.47)], None),
    ("ACC-24061", "DEMO^ECHO", db.SCORED, 135, [("routine", 0.12)], None),
    ("ACC-24113", "DEMO^FOXTROT", db.SCORED, 16, [("routine", 0.07)], None),
    ("ACC-24120", "DEMO^GOLF", db.SCORED, 3, [("routine", 0.21)], None),
    ("ACC-24108", "DEMO^HOTEL", db.UNSCORED, 19, [("unscored", None)],
     ["image 3fa2c1d9e0b4: lateral view (ViewPosition LL)"]),
    ("ACC-24097", "DEMO^KILO", db.UNSCORED, 27, [("unscored", None)],
     ["image 81c0e2a7b5d3: outside the model's population: 45 y (model: children)"]),
    ("ACC-24115", "DEMO^LIMA", db.UNSCORED, 9, [("unscored", None)],
     ["image 0d94b6e13a27: looks like an adult's radiograph (no age in the header; "
      "model: children; input guard, P(adult) 0.98)"]),
    ("ACC-24118", "DEMO^MIKE", db.UNSCORED, 6, [("unscored", None)],
     ["image 5e7f20c9d1b8: does not look like a frontal chest radiograph "
      "(input guard, P(frontal) 0.00)"]),
    ("ACC-24122", "DEMO^INDIA", db.RECEIVING, 1, [], None),
    ("ACC-24121", "DEMO^JULIET", db.COMPLETE, 2, [], None),
]


def populate(store: Store, now: float) -> None:
    """Insert the synthetic studies, their result versions and one drift alert."""
    with store.write() as s:
        for i, (acc, name, state, waited, results, reasons) in enumerate(STUDIES):
            since = now - waited * MIN
            study = Study(study_uid=f"2.25.{1000 + i}", accession_number=acc, patient_name=name,
                          patient_id=f"SYN{1000 + i}", study_description="CHEST PA", modality="DX",
                          study_date=time.strftime("%Y%m%d", time.localtime(since)),
                          study_time=time.strftime("%H%M%S", time.localtime(since)), state=state,
                          version=max(1, len(results)), n_instances=2 if i % 3 == 0 else 1,
                          first_received_at=since, last_received_at=since)
            s.add(study)
            s.flush()
            prev = None
            for v, (tier, p) in enumerate(results, start=1):
                change = None if prev in (None, tier) else "fall"
                s.add(Result(study_id=study.id, version=v, state=state, probability=p, tier=tier,
                             previous_tier=prev, tier_change=change, reasons=json.dumps(reasons or []),
                             model_name="demo", model_sha256="0" * 64,
                             thresholds=json.dumps(THRESHOLDS), timings="{}", created_at=since + v))
                prev = tier
        s.add(Alert(at=now - 50 * MIN, kind="drift", active=True,
                    message="500 recent images: KS 0.214 (p 2e-19), PSI 0.312; recent scores "
                            "differ from validation in a way a change in prevalence does not "
                            "explain: the model's ranking may not hold here. Recent scores differ "
                            "from validation: replay local labelled studies (docs/drift.md)"))


def main(out: Path) -> None:
    """Render the synthetic worklist and save a screenshot of it at ``out``."""
    from playwright.sync_api import sync_playwright

    root = Path(tempfile.mkdtemp(prefix="triage-shot-"))
    now = time.time()
    store = Store(open_db(root / "triage.sqlite"), clock=lambda: now)
    populate(store, now)
    model = ModelInfo("demo-model", "0" * 64, "", THRESHOLDS)
    pages = Pages(store, root / "www", model, WorklistConfig(refresh_s=0), clock=lambda: now)
    pages.render_worklist()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1280, "height": 760})
        page.goto(pages.worklist_html.as_uri())
        page.screenshot(path=str(out), full_page=True)
        browser.close()
    print(out)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "docs" / "worklist.png")
