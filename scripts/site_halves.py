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
folder, so pass that folder as ``--images``) and prints their counts.
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

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


def main() -> int:
    """Write the two halves and print their sizes."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--manifest", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=20261203)
    args = ap.parse_args()
    with args.manifest.open(newline="") as fh:
        reader = csv.DictReader(fh)
        fields = list(reader.fieldnames or [])
        rows = list(reader)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, part in halves(rows, args.seed).items():
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
