"""Add the drift watch's references to a shipped model's card, without retraining the model.

Run: .venv/bin/python scripts/card_references.py [--card models/cxr-pneumonia-mnv2.json]
       [--manifest ../shared/data/cxr-pediatric-224/manifest.csv] [--split val]

Cards written before the drift watch learned to tell prevalence from ranking
lack the per-class score distributions, the reference prevalence, the
training metadata and the population. This scores the card's own validation
split with the shipped ONNX file (through the card's preprocessing chain),
checks that the overall distribution matches the card's recorded one, and
writes the missing keys. The model file and its sha256 are unchanged.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from triage.core import metrics  # noqa: E402
from triage.files import write_atomic  # noqa: E402
from triage.inference.model import onnx_session  # noqa: E402
from triage.training import export, train  # noqa: E402


def main() -> int:
    """Write the references into the card; returns the exit status."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--card", default="models/cxr-pneumonia-mnv2.json")
    ap.add_argument("--manifest", default="../shared/data/cxr-pediatric-224/manifest.csv")
    ap.add_argument("--split", default="val")
    args = ap.parse_args()
    card_path = Path(args.card)
    card = json.loads(card_path.read_text())
    samples = [s for s in train.read_manifest(args.manifest, None) if s.split == args.split]
    x, y = export._prepared(samples, card, f"prepare {args.split}")
    sess = onnx_session(card_path.with_name(card["file"]), 2)
    p = export.run_session(sess, x, outputs=("probability",))["probability"].reshape(-1)
    auc = metrics.auc(y, p)
    recorded = card["validation"]["auc"]
    print(f"{len(y)} {args.split} images, AUC {auc:.4f} (card: {recorded:.4f})")
    if abs(auc - recorded) > 0.002:
        print("the split does not reproduce the card's validation AUC: not writing", file=sys.stderr)
        return 2
    card["reference_scores_pos"] = metrics.score_distribution(p[y == 1])
    card["reference_scores_neg"] = metrics.score_distribution(p[y == 0])
    card["reference_prevalence"] = float(np.mean(y))
    card.setdefault("training_metadata", export.TRAINING_METADATA)
    card.setdefault("population", {"label": "children", "age_years": [0.0, 17.0],
                                   "trained_on": "patients aged about 1 to 5"})
    write_atomic(card_path, json.dumps(card, indent=2, allow_nan=False) + "\n", mode=0o644)
    print(f"wrote {card_path}: per-class references, prevalence {np.mean(y):.3f}, "
          "training metadata, population")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
