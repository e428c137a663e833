"""Does this CPU score a model as its reference meaning does? `triage score` in three sessions.

Scores every image under DIR with ``triage score --json --no-guard`` (a user's own
command, in a subprocess) once per onnxruntime session kind: ``reference`` (every
graph optimisation off: each node as written), ``onnxruntime-default`` (integer
QDQ fusion on, what another program loading the file gets) and ``daemon`` (the
daemon's session), then prints, for each against ``reference``: max, p95 and
median |dp|, tier changes and, when the images sit under NORMAL/ and PNEUMONIA/
folders, the AUC. The CPU's kernel-relevant flags head the output. ``--json``
writes the figures.

    PYTHONPATH=. .venv/bin/python scripts/session_agreement.py \\
        --images ../shared/data/cxr-pediatric-siteb [--model models/OTHER.onnx] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from triage.inference.selftest import cpu_features, describe  # noqa: E402

SESSIONS = ("reference", "onnxruntime-default", "daemon")


def score(images: Path, session: str, model: str | None) -> dict[str, tuple[float, str]]:
    """Return {path: (probability, tier)} for every scored image, from ``triage score``."""
    cmd = [sys.executable, "-m", "triage", "score", "--json", "--no-guard", "--session",
           session, str(images)] + (["--model", model] if model else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.strip()]
    return {r["path"]: (r["probability"], r["tier"]) for r in rows
            if r["probability"] is not None}


def compare(ref: dict[str, tuple[float, str]], other: dict[str, tuple[float, str]]
            ) -> dict[str, Any]:
    """Return the agreement of ``other`` with ``ref`` over the images both scored."""
    from sklearn.metrics import roc_auc_score

    keys = sorted(set(ref) & set(other))
    d = np.abs(np.array([other[k][0] - ref[k][0] for k in keys]))
    out: dict[str, Any] = {"n": len(keys), "max_abs_diff": float(d.max()),
                           "p95_abs_diff": float(np.percentile(d, 95)),
                           "median_abs_diff": float(np.median(d)),
                           "tier_changes": sum(other[k][1] != ref[k][1] for k in keys)}
    labels = [0 if "/NORMAL/" in k else 1 if "/PNEUMONIA/" in k else -1 for k in keys]
    if -1 not in labels and len(set(labels)) == 2:
        out["auc"] = float(roc_auc_score(labels, [other[k][0] for k in keys]))
        out["auc_reference"] = float(roc_auc_score(labels, [ref[k][0] for k in keys]))
    return out


def main() -> int:
    """Print the table; returns the exit status (1 when any session is off by more than 0.01)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=Path, required=True, help="a folder of DICOM/PNG/JPEG files")
    ap.add_argument("--model", help="ONNX model (default: model.path)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    print(f"CPU: {describe(cpu_features())}")
    scores = {s: score(args.images, s, args.model) for s in SESSIONS}
    result = {"cpu": cpu_features(), "model": args.model or "model.path",
              "sessions": {s: compare(scores["reference"], scores[s]) for s in SESSIONS[1:]}}
    for s, r in result["sessions"].items():
        auc = f", AUC {r['auc']:.4f} (reference {r['auc_reference']:.4f})" if "auc" in r else ""
        print(f"{s:20s} vs reference, {r['n']} images: max |dp| {r['max_abs_diff']:.2e}, "
              f"p95 {r['p95_abs_diff']:.2e}, median {r['median_abs_diff']:.2e}, "
              f"tier changes {r['tier_changes']}{auc}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    bad = any(r["max_abs_diff"] > 0.01 or r["tier_changes"] for r in result["sessions"].values())
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
