"""Split a site's labelled manifest by patient into a half to choose on and a half to report on.

Every choice made with a site's labels (which training recipe, which guard
rule, which adaptation) is made on the ``choose`` half only; the ``report``
half is scored once the choices are fixed, so the figures given for the site
are not the ones that were tuned. Patients are stratified by label (a patient
whose images disagree counts as abnormal), and each half keeps the manifest's
columns, so either one is a manifest ``triage archive build`` reads.

    .venv/bin/python scripts/site_halves.py \\
        --manifest ../shared/data/cxr-pediatric-siteb/manifest.csv \\
        --out runs/siteb-halves [--seed 20261203]

writes ``choose.csv`` and ``report.csv`` (paths relative to the manifest's
folder, so pass that folder as ``--images``) and prints their counts. With
``--replay DIR --labels LABELS.csv`` (a replay of an archive that ``triage
archive build`` made from the whole manifest; its labels CSV names each
study's image in ``source``) it prints, per half and for all, the studies,
the unscored ones with their reasons, the AUC with its DeLong interval and the
specificity at the lowest threshold reaching 95% sensitivity, with its exact
interval.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np


def halves(rows: list[dict[str, str]], seed: int) -> dict[str, list[dict[str, str]]]:
    """Return {"choose": rows, "report": rows}: patients split in two, stratified by label."""
    by_patient: dict[str, list[dict[str, str]]] = defaultdict(list)
    for r in rows:
        by_patient[r["patient"]].append(r)
    rng = np.random.default_rng(seed)
    out: dict[str, list[dict[str, str]]] = {"choose": [], "report": []}
    for label in ("1", "0"):
        pats = sorted(p for p, rs in by_patient.items()
                      if ("1" if any(r["label"] == "1" for r in rs) else "0") == label)
        order = rng.permutation(len(pats))
        for i, k in enumerate(order):
            out["choose" if i % 2 == 0 else "report"].extend(by_patient[pats[k]])
    return out


def _scores(replay: Path, labels: Path, half: dict[str, str]) -> list[tuple[str, int, Any, Any, str]]:
    """(half, label, probability or None, images, study uid) of each study in a replay."""
    with labels.open(newline="") as fh:
        by_uid = {r["StudyInstanceUID"]: r for r in csv.DictReader(fh)}
    rows = []
    for line in (replay / "results.jsonl").read_text().splitlines():
        r = json.loads(line)
        lab = by_uid[r["study_uid"]]
        rows.append((half[lab["source"]], int(lab["label"]), r["probability"], r["images"],
                     r["study_uid"]))
    return rows


def report(replay: Path, labels: Path, parts: dict[str, list[dict[str, str]]],
           baseline: Path | None = None) -> None:
    """Print the replay's figures per half (see the module's docstring): AUC (DeLong),
    specificity at sensitivity >= 0.95 and at the replay's own abnormal threshold, and with
    ``baseline`` (another replay of the same archive) the paired bootstrap difference in AUC
    over the studies both scored."""
    import sys
    from collections import Counter

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from triage.core import metrics

    half = {r["path"]: name for name, rows in parts.items() for r in rows}
    rows = _scores(replay, labels, half)
    point = json.loads((replay / "report.json").read_text())["thresholds"]["abnormal"]
    base = {r[4]: r[2] for r in _scores(baseline, labels, half)} if baseline else {}
    for name in (*parts, "all"):
        sel = [r for r in rows if name == "all" or r[0] == name]
        scored = [r for r in sel if r[2] is not None]
        y = np.array([r[1] for r in scored])
        p = np.array([r[2] for r in scored], dtype=np.float64)
        auc, (lo, hi) = metrics.delong(y, p)
        t = metrics.select_threshold(y, p, "sensitivity", 0.95, False, 0.95)
        sens, spec = metrics.sens_spec(y, p, t)
        why = Counter(i["reason"].split(" (")[0] for r in sel if r[2] is None
                      for i in r[3] if i.get("reason"))
        print(f"{name}: {len(sel)} studies, {len(sel) - len(scored)} unscored {dict(why)}; "
              f"AUC {auc:.4f} [{lo:.4f}, {hi:.4f}]; specificity {spec.value:.3f} "
              f"[{spec.lower:.3f}, {spec.upper:.3f}] at sensitivity {sens.value:.3f}")
        sens, spec = metrics.sens_spec(y, p, point)
        print(f"  at the abnormal threshold {point:.4f}: sensitivity {sens.value:.3f} "
              f"[{sens.lower:.3f}, {sens.upper:.3f}], specificity {spec.value:.3f} "
              f"[{spec.lower:.3f}, {spec.upper:.3f}]")
        both = [r for r in scored if base.get(r[4]) is not None]
        if both:
            yb = np.array([r[1] for r in both])
            pa = np.array([r[2] for r in both], dtype=np.float64)
            pb = np.array([base[r[4]] for r in both], dtype=np.float64)
            diff, (lo, hi) = metrics.bootstrap_auc_difference(yb, pa, pb, 2000)
            print(f"  AUC minus the baseline's on the {len(both)} studies both scored: "
                  f"{diff:+.4f} [{lo:+.4f}, {hi:+.4f}] "
                  "(paired bootstrap by study, 2000 resamples)")


def main() -> int:
    """Write the two halves and print their sizes."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--manifest", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=20261203)
    ap.add_argument("--replay", type=Path, help="a replay folder to report per half")
    ap.add_argument("--labels", type=Path, help="the replayed archive's labels.csv")
    ap.add_argument("--baseline", type=Path, help="another replay of the archive to compare with")
    args = ap.parse_args()
    with args.manifest.open(newline="") as fh:
        reader = csv.DictReader(fh)
        fields = list(reader.fieldnames or [])
        rows = list(reader)
    parts = halves(rows, args.seed)
    if args.replay is not None:
        if args.labels is None:
            ap.error("--replay needs --labels")
        report(args.replay, args.labels, parts, args.baseline)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, part in parts.items():
        with (args.out / f"{name}.csv").open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=fields)
            w.writeheader()
            w.writerows(sorted(part, key=lambda r: r["path"]))
        pos = sum(r["label"] == "1" for r in part)
        print(f"{name}: {len(part)} images of {len({r['patient'] for r in part})} patients, "
              f"{pos} abnormal / {len(part) - pos} normal")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
