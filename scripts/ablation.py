"""Compare training recipes image by image on the same validation split.

Each argument is ``NAME=REPORT`` where REPORT is the JSON written by
``triage calibrate`` (it carries every image's calibrated probability). The
first one is the baseline. For each recipe the script prints, as a Markdown
table: the AUC with a percentile-bootstrap interval, the specificity at the
lowest threshold reaching 95 % sensitivity (chosen on the same images, so an
optimistic in-sample figure, but equally so for every row) with its
Clopper-Pearson interval, and the paired-bootstrap difference of both against
the baseline (the same resampled patients, with all their images, for both
models, which removes the variance the two share). ``NAME=A.json+B.json`` averages
the models' probabilities (an ensemble of two).

    .venv/bin/python scripts/ablation.py base=runs/A/calibration.json \\
        strong=runs/B/calibration.json strong+flip=runs/B/calibration-flip.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from triage.core import metrics
from triage.training.splits import patient_id

TARGET = 0.95


def _robust(path: Path) -> float | None:
    """The pooled AUC under perturbations, when the report has it (``--robustness``)."""
    value = json.loads(path.read_text()).get("robustness_auc", {}).get("pooled")
    return None if value is None else float(value)


def _load(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    rep = json.loads(path.read_text())
    if "scores" not in rep:
        sys.exit(f"{path}: no per-image scores (calibrate it again with this version)")
    keys = [Path(s["path"]).name for s in rep["scores"]]
    y = np.array([s["label"] for s in rep["scores"]], dtype=int)
    p = np.array([s["probability"] for s in rep["scores"]], dtype=np.float64)
    return keys, y, p


def _spec_at_sens(y: np.ndarray, p: np.ndarray) -> tuple[float, metrics.Rate]:
    t = metrics.select_threshold(y, p, "sensitivity", TARGET, False, 0.95)
    _, spec = metrics.sens_spec(y, p, t, 0.95)
    return t, spec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", metavar="NAME=REPORT")
    ap.add_argument("--iterations", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=20261201)
    args = ap.parse_args(argv)

    named = []
    robust: dict[str, float | None] = {}
    for item in args.runs:
        name, _, path = item.partition("=")
        if not path:
            ap.error(f"{item!r}: expected NAME=REPORT[+REPORT...]")
        # REPORT+REPORT: the average of the models' calibrated probabilities (an ensemble)
        paths = [Path(p) for p in path.split("+")]
        parts = [_load(p) for p in paths]
        robust[name] = _robust(paths[0]) if len(paths) == 1 else None
        keys, y, p = parts[0]
        for k2, y2, p2 in parts[1:]:
            if k2 != keys or not np.array_equal(y2, y):
                sys.exit(f"{name}: the averaged reports scored different images")
            p = p + p2
        named.append((name, keys, y, p / len(parts)))
    base_keys = named[0][1]
    order = {k: i for i, k in enumerate(base_keys)}
    if len(order) != len(base_keys):
        sys.exit(f"{named[0][0]}: two images share a file name; cannot pair them")
    aligned = []
    for name, keys, y, p in named:
        if sorted(keys) != sorted(base_keys):
            sys.exit(f"{name}: scored a different set of images than {named[0][0]}")
        idx = np.argsort([order[k] for k in keys])
        aligned.append((name, y[idx], p[idx]))
    y0 = aligned[0][1]
    for name, y, _ in aligned:
        if not np.array_equal(y, y0):
            sys.exit(f"{name}: labels differ from the baseline's")

    # Images of one patient are correlated: resample patients (with all their images),
    # not images, so that the intervals are not too narrow.
    groups: dict[str, list[int]] = {}
    for i, k in enumerate(base_keys):
        groups.setdefault(patient_id(k), []).append(i)
    members = [np.asarray(v) for v in groups.values()]
    rng = np.random.default_rng(args.seed)
    n = len(y0)
    draws = []
    while len(draws) < args.iterations:
        i = np.concatenate([members[j] for j in rng.integers(0, len(members), len(members))])
        if 0 < y0[i].sum() < len(i):
            draws.append(i)

    def boot(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        aucs = np.array([roc_auc_score(y0[i], p[i]) for i in draws])
        specs = np.array([_spec_at_sens(y0[i], p[i])[1].value for i in draws])
        return aucs, specs

    base_auc, base_spec = boot(aligned[0][2])
    print(f"{n} images ({int(y0.sum())} abnormal) of {len(members)} patients; "
          f"{args.iterations} paired bootstrap draws of patients\n")
    print("| recipe | AUC [95% CI] | spec. at sens. >= 0.95 [95% CI] | dAUC vs base [95% CI] "
          "| d spec. vs base [95% CI] | perturbed AUC (pooled) |")
    print("|---|---|---|---|---|---|")
    for k, (name, _, p) in enumerate(aligned):
        aucs, specs = (base_auc, base_spec) if k == 0 else boot(p)
        a = roc_auc_score(y0, p)
        lo, hi = np.percentile(aucs, [2.5, 97.5])
        _, spec = _spec_at_sens(y0, p)
        row = (f"| {name} | {a:.4f} [{lo:.4f}, {hi:.4f}] | {spec.value:.3f} "
               f"[{spec.lower:.3f}, {spec.upper:.3f}] ({spec.k}/{spec.n}) |")
        if k == 0:
            row += " — | — |"
        else:
            da = np.percentile(aucs - base_auc, [2.5, 97.5])
            ds = np.percentile(specs - base_spec, [2.5, 97.5])
            d_auc = a - roc_auc_score(y0, aligned[0][2])
            d_spec = spec.value - _spec_at_sens(y0, aligned[0][2])[1].value
            row += (f" {d_auc:+.4f} [{da[0]:+.4f}, {da[1]:+.4f}] |"
                    f" {d_spec:+.3f} [{ds[0]:+.3f}, {ds[1]:+.3f}] |")
        r = robust[name]
        print(row + (f" {r:.4f} |" if r is not None else " — |"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
