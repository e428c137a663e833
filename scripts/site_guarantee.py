"""How often a site profile's guarantee fails, in simulation: conservative fit against point estimate.

Run: .venv/bin/python scripts/site_guarantee.py [--draws 2000]

Abnormal scores ~ Beta(4, 2), normal ~ Beta(2, 4) (a known population, so the true
sensitivity at any threshold is exact). For each size, many calibration sets are
drawn; each is fitted for a sensitivity target at a confidence, conservatively
(the lower Clopper-Pearson bound) and at the point estimate; prints the share of
fits whose true sensitivity falls below the target, and the median true
specificity each fit buys.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from triage.core import metrics  # noqa: E402
from triage.core.site import Target, fit_points  # noqa: E402

POS, NEG = stats.beta(4, 2), stats.beta(2, 4)


def main() -> int:
    """Print the table; returns the exit status."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--draws", type=int, default=2000)
    ap.add_argument("--target", type=float, default=0.95)
    ap.add_argument("--confidence", type=float, default=0.95)
    args = ap.parse_args()
    rng = np.random.default_rng(20261201)
    print(f"target sensitivity {args.target}, confidence {args.confidence}, {args.draws} draws each")
    print(f"{'abnormal':>8} {'normal':>7} | {'below target: conservative':>27} {'point':>7} |"
          f" {'median true spec: conservative':>31} {'point':>7}")
    for n_pos, n_neg in ((100, 100), (150, 150), (300, 300), (554, 191)):
        below_c = below_p = 0
        spec_c, spec_p = [], []
        for _ in range(args.draws):
            y = np.r_[np.ones(n_pos, int), np.zeros(n_neg, int)]
            s = np.r_[POS.rvs(n_pos, random_state=rng), NEG.rvs(n_neg, random_state=rng)]
            [p] = fit_points(y, s, [Target("abnormal", "sensitivity", args.target)], args.confidence)
            t = metrics.threshold_for_sensitivity(y, s, args.target)
            below_c += POS.sf(p.threshold) < args.target
            below_p += POS.sf(t) < args.target
            spec_c.append(NEG.cdf(p.threshold))
            spec_p.append(NEG.cdf(t))
        print(f"{n_pos:8d} {n_neg:7d} | {below_c / args.draws:27.3f} {below_p / args.draws:7.3f} |"
              f" {np.median(spec_c):31.3f} {np.median(spec_p):7.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
