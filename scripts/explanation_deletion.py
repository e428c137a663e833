"""Does hiding what a map points at lower the score? A deletion check of Grad-CAM and LIME.

LIME and Grad-CAM agree no better than chance on validation images
(scripts/lime_gradcam_agreement.py). That alone does not say which, if either,
follows the model. Here, for N patient-level ``val`` images the shipped model
calls abnormal, the top 20 % of each map's pixels are replaced by a strongly
blurred copy of the image (Gaussian, sigma 8 px at 144 px: the region loses its
detail but keeps its brightness, so the model does not meet a hole it never saw)
and the drop in the model's logit is measured. A map that follows the model
lowers the logit more than a region of the same size chosen without looking at
this image: the top 20 % of another image's Grad-CAM map (where maps of chest
radiographs tend to sit) and, as a floor, the bottom 20 % of the image's own
Grad-CAM map. Means with 95 % bootstrap intervals over images, paired
differences, and how many calls fall below the ``abnormal`` threshold.

    PYTHONPATH=. .venv/bin/python scripts/explanation_deletion.py \\
        --manifest ../shared/data/cxr-pediatric-224/manifest.csv --n 100
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# The sibling script's helpers (its directory is on sys.path when this one runs as a script).
from lime_gradcam_agreement import bootstrap_mean, emit  # noqa: E402

from triage.core.metrics import clopper_pearson  # noqa: E402
from triage.inference.explain import SAMPLES, SEGMENTS, TOP_FRACTION, lime_map, top_mask  # noqa: E402

BLUR_SIGMA = 8.0


def main() -> int:
    """Measure and print the deletion figures; write them as JSON with --out."""
    from scipy.ndimage import gaussian_filter
    from tqdm import tqdm

    from triage.imaging.heatmap import upsample
    from triage.imaging.prepare import init, prepare
    from triage.inference.model import onnx_session
    from triage.training.fewshot import card_split

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--manifest", required=True, help="cxr-pediatric-224's manifest.csv")
    ap.add_argument("--model", default="models/cxr-pneumonia-mnv2.onnx")
    ap.add_argument("--n", type=int, default=100, help="val images called abnormal (default 100)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="JSON with the figures")
    args = ap.parse_args()
    t0 = time.monotonic()
    model = Path(args.model)
    card = json.loads(model.with_suffix(".json").read_text())
    threshold = {op["name"]: op["threshold"] for op in card["operating_points"]}["abnormal"]
    manifest = Path(args.manifest)
    items, _ = card_split(card, manifest, manifest.parent)
    val = [it for it in items if it.part == "val"]
    order = np.random.default_rng(args.seed).permutation(len(val))
    init(card)
    sess = onnx_session(model, args.threads)
    mean, std = float(card["preprocess"]["mean"]), float(card["preprocess"]["std"])

    def run(greys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = ((greys - mean) / std)[:, None].astype(np.float32)
        logit, prob = sess.run(["logit", "probability"], {"image": x})
        return np.asarray(logit).reshape(-1), np.asarray(prob).reshape(-1)

    def probability(greys: np.ndarray) -> np.ndarray:
        return run(greys)[1]

    # Images the model calls abnormal, with their Grad-CAM and LIME maps.
    cases: list[dict[str, Any]] = []
    bar = tqdm(total=args.n, desc="maps", unit="img")
    for i in order:
        if len(cases) >= args.n:
            break
        p = prepare(0, str(val[i].path))
        if p.x is None:
            continue
        prob, cam = sess.run(["probability", "cam"], {"image": p.x[None]})
        if float(prob[0]) < threshold:
            continue
        grey = np.asarray(p.x[0], dtype=np.float64) * std + mean
        gc = upsample(cam[0], grey.shape)
        lm = lime_map(grey, probability, SAMPLES, SEGMENTS, seed=0)
        cases.append({"grey": grey, "gradcam": gc, "lime": lm.heat})
        bar.update(1)
    bar.close()

    n = len(cases)
    regions = {
        "Grad-CAM top 20 %": lambda k: top_mask(cases[k]["gradcam"], TOP_FRACTION),
        "LIME top 20 %": lambda k: top_mask(cases[k]["lime"], TOP_FRACTION),
        "another image's Grad-CAM top 20 %": lambda k: top_mask(cases[(k + 1) % n]["gradcam"],
                                                               TOP_FRACTION),
        "Grad-CAM bottom 20 %": lambda k: top_mask(-cases[k]["gradcam"], TOP_FRACTION),
    }
    drops: dict[str, list[float | None]] = {name: [] for name in regions}
    flips: dict[str, list[bool | None]] = {name: [] for name in regions}
    for k in tqdm(range(n), desc="deletion", unit="img"):
        grey = cases[k]["grey"]
        blurred = gaussian_filter(grey, BLUR_SIGMA)
        base_logit, _ = run(grey[None])
        for name, region in regions.items():
            mask = region(k)
            if mask is None:
                drops[name].append(None)
                flips[name].append(None)
                continue
            logit, prob = run(np.where(mask, blurred, grey)[None])
            drops[name].append(float(base_logit[0] - logit[0]))
            flips[name].append(bool(prob[0] < threshold))

    report: dict[str, Any] = {"images": n, "top_fraction": TOP_FRACTION,
                              "blur_sigma_px": BLUR_SIGMA, "threshold": threshold,
                              "lime_samples": SAMPLES, "lime_segments": SEGMENTS, "regions": {}}
    for name in regions:
        d = np.array([v for v in drops[name] if v is not None])
        f = [v for v in flips[name] if v is not None]
        k = int(sum(f))
        report["regions"][name] = {
            "n": len(d), "logit_drop_mean": float(d.mean()), "logit_drop_ci95": bootstrap_mean(d),
            "logit_drop_median": float(np.median(d)), "below_threshold": k,
            "below_threshold_rate": k / len(f), "below_threshold_ci95": list(clopper_pearson(k, len(f)))}
    baseline = "another image's Grad-CAM top 20 %"
    for name in ("Grad-CAM top 20 %", "LIME top 20 %"):
        pairs = np.array([a - b for a, b in zip(drops[name], drops[baseline], strict=True)
                          if a is not None and b is not None])
        report["regions"][name]["minus_other_image_mean"] = float(pairs.mean())
        report["regions"][name]["minus_other_image_ci95"] = bootstrap_mean(pairs)
        report["regions"][name]["larger_than_other_image"] = int((pairs > 0).sum())
    report["minutes"] = (time.monotonic() - t0) / 60
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
