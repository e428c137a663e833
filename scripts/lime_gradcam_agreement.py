"""How often do LIME and Grad-CAM point at the same part of the image? (validation images)

For N images drawn at random from the patient-level ``val`` part of the shipped
model's split (made again from its card, as ``triage benchmark --few-shot`` does),
each image goes through the daemon's preparation (the card's chain), the model
gives its Grad-CAM map (upsampled as the study page's overlay is) and LIME
explains its P(abnormal) with the daemon's settings (1,000 samples, about 50 SLIC
superpixels, seed 0). Two measures, each with a 95 % interval:

- IoU of the top 20 % of pixels of each map (bootstrap over images);
- the share of images whose top LIME superpixel lies mostly inside Grad-CAM's top
  20 % (Clopper-Pearson).

Each is set beside the same measure on mismatched pairs (image i's LIME against
image i+1's Grad-CAM), which is what two maps agree by where maps of chest
radiographs tend to sit anyway. Maps that are constant (no region stands out)
are counted and left out.

    PYTHONPATH=. .venv/bin/python scripts/lime_gradcam_agreement.py \\
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

from triage.core.metrics import clopper_pearson  # noqa: E402
from triage.inference.explain import (  # noqa: E402
    SAMPLES,
    SEGMENTS,
    TOP_FRACTION,
    LimeMap,
    iou,
    lime_map,
    top_mask,
    top_superpixel_hit,
)


def bootstrap_mean(values: np.ndarray, iterations: int = 5000, seed: int = 0) -> tuple[float, float]:
    """Return the 95 % percentile-bootstrap interval of the mean of ``values``."""
    rng = np.random.default_rng(seed)
    v = np.asarray(values, dtype=np.float64)
    means = v[rng.integers(0, len(v), (iterations, len(v)))].mean(axis=1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def emit(report: dict[str, Any], out: str | None) -> None:
    """Print ``report`` as JSON, and write it to ``out`` when given."""
    text = json.dumps(report, indent=1)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")


def explain_images(paths: list[Path], card: dict[str, Any], model: Path, threads: int,
                   samples: int, segments: int) -> list[dict[str, Any]]:
    """Return, per image: P(abnormal), the Grad-CAM heat and the LIME map (144 px)."""
    from tqdm import tqdm

    from triage.imaging.heatmap import upsample
    from triage.imaging.prepare import init, prepare
    from triage.inference.model import onnx_session

    init(card)
    sess = onnx_session(model, threads)
    mean, std = float(card["preprocess"]["mean"]), float(card["preprocess"]["std"])

    def predict(grey: np.ndarray) -> np.ndarray:
        x = ((grey - mean) / std)[:, None].astype(np.float32)
        return np.asarray(sess.run(["probability"], {"image": x})[0])

    out = []
    for path in tqdm(paths, desc="LIME and Grad-CAM", unit="img"):
        p = prepare(0, str(path))
        if p.x is None:
            continue
        prob, cam = sess.run(["probability", "cam"], {"image": p.x[None]})
        grey = np.asarray(p.x[0], dtype=np.float64) * std + mean
        out.append({"path": path.name, "p": float(prob[0]),
                    "gradcam": upsample(cam[0], grey.shape),
                    "lime": lime_map(grey, predict, samples, segments, seed=0)})
    return out


def agreement(maps: list[dict[str, Any]], shift: int) -> list[tuple[float, bool] | None]:
    """Return per image (IoU, top-superpixel hit), pairing image i's LIME with image
    (i + shift)'s Grad-CAM (shift 0: the same image); None where a map is constant."""
    out: list[tuple[float, bool] | None] = []
    n = len(maps)
    for i in range(n):
        lm: LimeMap = maps[i]["lime"]
        a, b = top_mask(lm.heat, TOP_FRACTION), top_mask(maps[(i + shift) % n]["gradcam"],
                                                         TOP_FRACTION)
        hit = top_superpixel_hit(lm, b) if b is not None else None
        out.append(None if a is None or b is None or hit is None else (iou(a, b), hit))
    return out


def summary(pairs: list[tuple[float, bool] | None]) -> dict[str, Any]:
    """Return the mean IoU and the hit rate over the defined pairs, each with its 95 % interval."""
    ok = [p for p in pairs if p is not None]
    ious = np.array([p[0] for p in ok])
    k, n = int(sum(p[1] for p in ok)), len(ok)
    return {"n": n, "left_out": len(pairs) - n, "iou_mean": float(ious.mean()),
            "iou_ci95": bootstrap_mean(ious), "hits": k, "hit_rate": k / n,
            "hit_ci95": clopper_pearson(k, n)}


def main() -> int:
    """Measure and print the agreement; write the figures as JSON with --out."""
    from triage.training.fewshot import card_split

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--manifest", required=True, help="cxr-pediatric-224's manifest.csv")
    ap.add_argument("--model", default="models/cxr-pneumonia-mnv2.onnx")
    ap.add_argument("--n", type=int, default=100, help="validation images (default 100)")
    ap.add_argument("--samples", type=int, default=SAMPLES)
    ap.add_argument("--segments", type=int, default=SEGMENTS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="JSON with the figures")
    args = ap.parse_args()
    t0 = time.monotonic()
    model = Path(args.model)
    card = json.loads(model.with_suffix(".json").read_text())
    manifest = Path(args.manifest)
    items, _ = card_split(card, manifest, manifest.parent)
    val = [it for it in items if it.part == "val"]
    rng = np.random.default_rng(args.seed)
    pick = [val[i] for i in sorted(rng.choice(len(val), min(args.n, len(val)), replace=False))]
    maps = explain_images([it.path for it in pick], card, model, args.threads, args.samples,
                          args.segments)
    threshold = {op["name"]: op["threshold"] for op in card["operating_points"]}["abnormal"]
    report: dict[str, Any] = {"images": len(maps), "top_fraction": TOP_FRACTION,
                              "samples": args.samples, "segments": args.segments}
    for name, subset in (("all", maps), ("called abnormal", [m for m in maps
                                                            if m["p"] >= threshold])):
        if len(subset) < 3:
            continue
        same, other = agreement(subset, 0), agreement(subset, 1)
        both = [(a[0] - b[0]) for a, b in zip(same, other, strict=True)
                if a is not None and b is not None]
        report[name] = {"same image": summary(same), "mismatched pairs": summary(other),
                        "iou_difference_mean": float(np.mean(both)),
                        "iou_difference_ci95": bootstrap_mean(np.array(both))}
    report["minutes"] = (time.monotonic() - t0) / 60
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
