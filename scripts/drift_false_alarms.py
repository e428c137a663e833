"""How often does the drift watch alarm on samples of its own reference? (false-alarm rate)

Draws N samples of the given card's reference scores (inverse CDF through its
quantiles) at each sample size and prints the share that raise an alarm.

    .venv/bin/python scripts/drift_false_alarms.py [--card models/cxr-pneumonia-mnv2.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from triage.config import DriftConfig  # noqa: E402
from triage.core.drift import assess  # noqa: E402


def main() -> int:
    """Print the false-alarm rate per sample size."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--card", default="models/cxr-pneumonia-mnv2.json")
    ap.add_argument("--draws", type=int, default=1000)
    ap.add_argument("--sizes", default="30,60,100,200")
    args = ap.parse_args()
    card = json.loads(Path(args.card).read_text())
    ref = card["reference_scores"]
    rng = np.random.default_rng(0)
    print(f"card {args.card}: {args.draws} samples of its reference per size")
    for n in map(int, args.sizes.split(",")):
        cfg = DriftConfig(min_samples=min(n, 50))
        alarms = sum(assess(card, list(np.interp(rng.random(n), ref["quantile_levels"],
                                                 ref["quantiles"])), [], cfg).alert
                     for _ in range(args.draws))
        print(f"n={n:4d}: false alarms {alarms / args.draws:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
