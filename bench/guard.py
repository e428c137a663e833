"""What the input guard costs per image, against the main model measured in the same run.

Run: .venv/bin/python bench/guard.py [--threads 2] [--batch 32] [--images 64]

Both sessions are the configured files (``model.path`` and ``guard.path``),
run by onnxruntime on the same decoded images; preprocessing is each card's
MONAI chain on the same 2048 px grey image (the guard's from the 8-bit
display copy, as the daemon does; the display copy is made anyway for the
heatmap overlay, so it is not counted to the guard). Prints milliseconds per image for each
part and the guard's share of the main model's inference and of its
preprocessing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.synth import phantom  # noqa: E402  (a chest-like phantom; no data needed)
from triage.config import load  # noqa: E402
from triage.inference.model import INPUT_NAME, onnx_session  # noqa: E402


def per_image_ms(run: Callable[[], object], n_images: int, min_seconds: float = 2.0) -> float:
    """Return milliseconds per image of ``run`` (which handles ``n_images``), after a warm-up."""
    run()
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min_seconds:
        run()
        done += n_images
    return 1000.0 * (time.perf_counter() - t0) / done


def main() -> int:
    """Print the table; returns the exit status."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--images", type=int, default=64, help="phantoms (2048 px) to preprocess")
    args = ap.parse_args()
    from triage.imaging.transforms import InputSpec, build_transforms, preprocess_of

    cfg = load()
    if cfg.guard.onnx_path is None:
        print("guard.path is empty: nothing to measure", file=sys.stderr)
        return 2
    cards = {"model": json.loads(cfg.model.card_path.read_text()),
             "guard": json.loads(cfg.guard.onnx_path.with_suffix(".json").read_text())}
    paths = {"model": cfg.model.onnx_path, "guard": cfg.guard.onnx_path}
    greys = [phantom(2048, 2048, 12, seed=i).astype(np.float32) / 4095.0
             for i in range(min(args.images, 8))]
    rows: dict[str, dict[str, float]] = {}
    import torch

    from triage.imaging.prepare import display_copy

    torch.set_num_threads(1)  # as each decoder process runs its chain (prepare.init)

    for name, card in cards.items():
        chain = build_transforms(preprocess_of(card), InputSpec.from_dict(card["input"]), train=False)
        if name == "guard":  # as prepare.guard_input does: from the 8-bit display copy
            shown = [display_copy(g).astype(np.float32) / 255.0 for g in greys]

            def run(c: object = chain, imgs: list[np.ndarray] = shown) -> object:
                return [c(d) for d in imgs]  # type: ignore[operator]
        else:
            def run(c: object = chain) -> object:
                return [c(g) for g in greys]  # type: ignore[operator]
        pre = per_image_ms(run, len(greys))
        x = np.stack([np.asarray(chain(greys[i % len(greys)]), np.float32)
                      for i in range(args.batch)])
        sess = onnx_session(paths[name], args.threads)
        inf = per_image_ms(lambda s=sess, b=x: s.run(None, {INPUT_NAME: b}), args.batch)  # type: ignore[misc]
        rows[name] = {"preprocess_ms": pre, "inference_ms": inf,
                      "file_mb": paths[name].stat().st_size / 2**20}
    print(f"{'':8} {'preprocess ms/img':>18} {'inference ms/img':>17} {'file MB':>8}")
    for name, r in rows.items():
        print(f"{name:8} {r['preprocess_ms']:18.2f} {r['inference_ms']:17.3f} {r['file_mb']:8.2f}")
    g, m = rows["guard"], rows["model"]
    print(f"guard / model inference: {g['inference_ms'] / m['inference_ms']:.3f}; "
          f"guard / model preprocessing: {g['preprocess_ms'] / m['preprocess_ms']:.3f}; "
          f"guard total / model total: {(g['inference_ms'] + g['preprocess_ms']) / (m['inference_ms'] + m['preprocess_ms']):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
