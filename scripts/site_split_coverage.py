"""Does a site profile fitted on some of a site's studies hold on the others? Random patient splits.

Takes a replay of a site's labelled archive (``triage replay ... --out DIR``: its
``results.jsonl``), the archive's ``labels.csv`` (``triage archive build`` writes a
``source`` column naming each study's image) and the image manifest with a
``patient`` column. For each of ``--splits`` random splits by patient (half to
fit, half to check), fits the abnormal point as ``triage site calibrate`` does
(sensitivity ``--target`` at the lower Clopper-Pearson bound, ``--confidence``)
and, for comparison, at the point estimate; then measures sensitivity and
specificity on the check half. Prints how often the check half's sensitivity
reaches the target, and the check half's specificity (median, 5th-95th
percentile). Unscored studies (refused by the input guard) are left out, as the
metrics of a replay leave them out.

    PYTHONPATH=. .venv/bin/python scripts/site_split_coverage.py --replay runs/replay-siteb \\
        --labels runs/arch-siteb/labels.csv \\
        --manifest ../shared/data/cxr-pediatric-siteb/manifest.csv [--splits 1000] [--json OUT]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from triage.core import metrics  # noqa: E402
from triage.core.site import CannotGuarantee, Target, fit_points  # noqa: E402


def load(replay: Path, labels: Path, manifest: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (labels, probabilities, patient ids) of the scored, labelled studies."""
    with manifest.open() as fh:
        patient = {r["path"]: r["patient"] for r in csv.DictReader(fh)}
    with labels.open() as fh:
        rows = {r["StudyInstanceUID"]: r for r in csv.DictReader(fh)}
    y, p, g = [], [], []
    for line in (replay / "results.jsonl").read_text().splitlines():
        r = json.loads(line)
        lab = rows.get(r["study_uid"])
        if lab is None or r.get("probability") is None:
            continue
        y.append(int(lab["label"]))
        p.append(float(r["probability"]))
        g.append(patient[lab["source"]])
    return np.array(y), np.array(p), np.array(g)


def one_split(y: np.ndarray, p: np.ndarray, groups: np.ndarray, rng: np.random.Generator,
              target: float, confidence: float) -> dict[str, Any] | None:
    """Fit on a random half of the patients, check on the other; None when the fit half
    cannot guarantee the target."""
    pats = np.unique(groups)
    fit_pats = set(rng.choice(pats, len(pats) // 2, replace=False))
    fit = np.array([g in fit_pats for g in groups])
    out: dict[str, Any] = {}
    try:
        point = fit_points(y[fit], p[fit], [Target("abnormal", "sensitivity", target)],
                           confidence)[0]
    except CannotGuarantee:
        return None
    thr_point = metrics.select_threshold(y[fit], p[fit], "sensitivity", target, False, confidence)
    for name, thr in (("conservative", point.threshold), ("point", thr_point)):
        sens, spec = metrics.sens_spec(y[~fit], p[~fit], thr, confidence)
        out[name] = {"threshold": float(thr), "sensitivity": sens.value, "specificity": spec.value}
    return out


def main() -> int:
    """Print the coverage table; returns the exit status."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--replay", type=Path, required=True)
    ap.add_argument("--labels", type=Path, required=True)
    ap.add_argument("--manifest", type=Path, required=True)
    ap.add_argument("--splits", type=int, default=1000)
    ap.add_argument("--target", type=float, default=0.95)
    ap.add_argument("--confidence", type=float, default=0.95)
    ap.add_argument("--seed", type=int, default=20261203)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    y, p, groups = load(args.replay, args.labels, args.manifest)
    rng = np.random.default_rng(args.seed)
    runs = [one_split(y, p, groups, rng, args.target, args.confidence) for _ in range(args.splits)]
    ok = [r for r in runs if r is not None]
    print(f"{len(y)} scored studies ({int(y.sum())} abnormal) of {len(np.unique(groups))} patients; "
          f"{args.splits} patient splits, {args.splits - len(ok)} could not guarantee the target")
    summary: dict[str, Any] = {"n": int(len(y)), "n_pos": int(y.sum()), "splits": args.splits,
                               "cannot_guarantee": args.splits - len(ok)}
    for name in ("conservative", "point"):
        sens = np.array([r[name]["sensitivity"] for r in ok])
        spec = np.array([r[name]["specificity"] for r in ok])
        lo, med, hi = np.percentile(spec, [5, 50, 95])
        reach = float(np.mean(sens >= args.target))
        summary[name] = {"check_sensitivity_reaches_target": reach,
                         "check_sensitivity_median": float(np.median(sens)),
                         "check_specificity_median": float(med),
                         "check_specificity_p5_p95": [float(lo), float(hi)]}
        print(f"{name:12s}: check-half sensitivity >= {args.target} in {reach:.1%} of splits "
              f"(median {np.median(sens):.3f}); specificity median {med:.3f} [{lo:.3f}, {hi:.3f}]")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
