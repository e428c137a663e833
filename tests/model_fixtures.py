"""Shared builders for the model tests: a tiny synthetic labelled set and a tiny trained model.

The model is built once per test session (cached) because training, calibrating
and exporting it takes a few seconds even at 64 px.
"""

from __future__ import annotations

import atexit
import csv
import dataclasses
import functools
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from tests.synth import phantom

SIZE = 64
SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def shared_dir() -> Path:
    """Return ../shared (or $TRIAGE_SHARED)."""
    import os

    return Path(os.environ.get("TRIAGE_SHARED", SHARED))


def synthetic_image(label: int, seed: int, size: int = 160) -> np.ndarray:
    """Return an 8-bit phantom radiograph; abnormal ones have a bright opacity in a lung."""
    img = phantom(size, size, bits_stored=8, seed=seed).astype(np.float32)
    if label:
        rng = np.random.default_rng(seed)
        yy, xx = np.mgrid[0:size, 0:size] / size
        cx, cy = rng.choice([0.32, 0.68]), rng.uniform(0.4, 0.6)
        img += 110 * np.exp(-(((xx - cx) / 0.1) ** 2 + ((yy - cy) / 0.12) ** 2))
    return np.clip(img, 0, 255).astype(np.uint8)


def write_dataset(root: Path, n_train: int = 48, n_val: int = 24, n_holdout: int = 0) -> Path:
    """Write PNGs and a ``path,label,split,sha256`` manifest under ``root``; return the CSV."""
    rows = []
    offset = {"train": 0, "val": 10_000, "holdout": 20_000}
    for split, n in (("train", n_train), ("val", n_val), ("holdout", n_holdout)):
        for i in range(n):
            label = i % 2
            rel = f"{split}/{'PNEUMONIA' if label else 'NORMAL'}/img{i:03d}.png"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            seed = i + offset[split]
            Image.fromarray(synthetic_image(label, seed)).convert("RGB").save(root / rel)
            rows.append({"path": rel, "label": label, "split": split, "sha256": ""})
    manifest = root / "manifest.csv"
    with manifest.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["path", "label", "split", "sha256"])
        w.writeheader()
        w.writerows(rows)
    return manifest


@dataclasses.dataclass(frozen=True)
class TinyModel:
    """Paths of a tiny trained, calibrated and exported model."""

    root: Path
    manifest: Path
    checkpoint: Path
    calibration: Path
    onnx: Path
    card: Path


@functools.cache
def tiny_model() -> TinyModel:
    """Train (2 short epochs), calibrate and export a 64 px, width 0.35 MobileNetV2 once."""
    from triage.config import CalibrationConfig, PreprocessConfig, TrainConfig
    from triage.training import calibrate, export, train

    root = Path(tempfile.mkdtemp(prefix="triage-tiny-"))
    atexit.register(shutil.rmtree, root, True)
    manifest = write_dataset(root / "data")
    samples = train.read_manifest(manifest)
    tcfg = TrainConfig(input_size=SIZE, width_mult=0.35, epochs=3, batch_size=8, lr=0.003,
                       warmup_epochs=0.0, ema_decay=0.0, threads=2, seed=1)
    pre = PreprocessConfig(min_size_px=32)
    result = train.train(samples, root / "run", tcfg, pre,
                         manifest_sha256=train.file_sha256(manifest))
    ccfg = CalibrationConfig()
    cal_json = root / "run" / "calibration.json"
    calibrate.run(result.best_checkpoint, samples, "val", ccfg, cal_json, root / "run" / "rel.png")
    export.run(result.best_checkpoint, cal_json, samples, root / "models", "tiny", ccfg,
               root / "run" / "export", n_calib=16)
    return TinyModel(root, manifest, result.best_checkpoint, cal_json,
                     root / "models" / "tiny.onnx", root / "models" / "tiny.json")
