"""What one worklist render costs, against the number of active studies.

Fills a fresh SQLite database (migrated as the daemon's) with N active scored
studies and times the daemon's render (``Pages.render_worklist``: load the rows,
arrange them, Jinja2 HTML and JSON, both written atomically), split by stage:
a render from scratch, and a render that finds every row unchanged (rows are
rendered again only when something they show has changed).

    .venv/bin/python bench/worklist.py [--sizes 100,1000,5000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from triage.config import WorklistConfig  # noqa: E402
from triage.store import schema as db  # noqa: E402
from triage.store.database import open_db  # noqa: E402
from triage.store.repository import Store  # noqa: E402
from triage.store.schema import Result, Study  # noqa: E402
from triage.web import pages as pages_mod  # noqa: E402
from triage.web.pages import ModelInfo, Pages  # noqa: E402

THRESHOLDS = {"abnormal": 0.5, "urgent": 0.9}


def fill(store: Store, n: int, now: float) -> None:
    """Insert ``n`` active scored studies, one result each, waiting up to two hours."""
    rng = np.random.default_rng(0)
    with store.write() as s:
        for i in range(n):
            p = float(rng.random())
            tier = "urgent" if p >= 0.9 else "abnormal" if p >= 0.5 else "routine"
            since = now - float(rng.uniform(0, 7200))
            study = Study(study_uid=f"1.2.826.0.1.{i}", state=db.SCORED, version=1, n_instances=1,
                          first_received_at=since, last_received_at=since,
                          accession_number=f"ACC{i:06d}", patient_name="SYNTHETIC^PATIENT")
            s.add(study)
            s.flush()
            s.add(Result(study_id=study.id, version=1, tier=tier, probability=p, state=db.SCORED,
                         reasons="[]", model_name="m", model_sha256="0" * 64,
                         thresholds=json.dumps(THRESHOLDS), timings="{}", created_at=since + 5))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100,1000,5000")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    now = time.time()
    print(f"{'active studies':>14} {'load rows':>10} {'arrange':>8} {'render, new':>14} "
          f"{'render, unchanged':>16}  (median ms; a render includes loading the rows)")
    for n in map(int, args.sizes.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            store = Store(open_db(Path(tmp) / "t.sqlite"), clock=lambda: now)
            fill(store, n, now)

            def fresh_pages(i: int, store: Store = store, tmp: str = tmp) -> Pages:
                return Pages(store, Path(tmp) / f"www{i}", ModelInfo("m", "0" * 64, "", THRESHOLDS),
                             WorklistConfig(), clock=lambda: now)

            warm = fresh_pages(0)
            warm.render_worklist()
            load, arrange, scratch, again = [], [], [], []
            for i in range(args.repeat):
                t0 = time.perf_counter()
                rows = pages_mod.load_rows(store)
                t1 = time.perf_counter()
                pages_mod.arrange(rows, now, THRESHOLDS, 60)
                t2 = time.perf_counter()
                fresh_pages(i + 1).render_worklist()  # every row rendered
                t3 = time.perf_counter()
                warm.render_worklist()  # nothing changed: every row reused
                t4 = time.perf_counter()
                load.append(t1 - t0)
                arrange.append(t2 - t1)
                scratch.append(t3 - t2)
                again.append(t4 - t3)
            ms = [1000 * statistics.median(x) for x in (load, arrange, scratch, again)]
            print(f"{n:>14} {ms[0]:>10.1f} {ms[1]:>8.1f} {ms[2]:>14.1f} {ms[3]:>16.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
