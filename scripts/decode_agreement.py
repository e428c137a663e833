"""Does decoding reduced change the shipped model's scores? Full-resolution decode against reduced.

For every DICOM file of an archive (``triage archive build``'s layout, with its
``labels.csv``), scores the image three ways through the model card's chain:
decoded at full resolution (the chain box-reduces it), decoded reduced to twice
the input size, and decoded reduced to the daemon's working side
(:func:`triage.imaging.prepare.working_side`). Prints each way's AUC and how far
its scores lie from the full-resolution ones.

    .venv/bin/python scripts/decode_agreement.py runs/arch-holdout [--model models/cxr-pneumonia-mnv2.onnx]
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dicom_io.reading import read_dataset  # noqa: E402
from triage.core.errors import UnscorableError  # noqa: E402
from triage.imaging.loading import load_dicom  # noqa: E402
from triage.imaging.prepare import working_side  # noqa: E402
from triage.imaging.transforms import InputSpec, build_transforms, one_thread, preprocess_of  # noqa: E402
from triage.inference.model import OnnxModel  # noqa: E402


def main() -> int:
    """Print AUC and score differences per decoding."""
    from sklearn.metrics import roc_auc_score

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("archive", type=Path)
    ap.add_argument("--model", type=Path, default=Path("models/cxr-pneumonia-mnv2.onnx"))
    args = ap.parse_args()
    one_thread()
    model = OnnxModel.load_files(args.model, threads=1)
    card = dict(model.card)
    spec = InputSpec.from_dict(card["input"])
    chain = build_transforms(preprocess_of(card), spec)
    labels = {r["StudyInstanceUID"]: int(r["label"])
              for r in csv.DictReader((args.archive / "labels.csv").open())}
    ways = {"full resolution": None, f"reduced to {2 * spec.size} px": 2 * spec.size,
            f"reduced to {working_side(spec.size)} px (daemon)": working_side(spec.size)}
    rows = []
    for f in tqdm(sorted(args.archive.rglob("*.dcm")), desc="images"):
        ds = read_dataset(f)
        y = labels.get(str(ds.get("StudyInstanceUID", "")))
        if y is None:
            continue
        try:
            xs = [np.asarray(chain(load_dicom(ds, min_side=side)), np.float32)
                  for side in ways.values()]
        except UnscorableError:
            continue
        p, _ = model.predict(np.stack(xs))
        rows.append((y, *map(float, p)))
    a = np.array(rows)
    print(f"{len(a)} labelled images ({int(a[:, 0].sum())} abnormal)")
    for i, name in enumerate(ways, 1):
        d = np.abs(a[:, i] - a[:, 1])
        print(f"{name:32} AUC {roc_auc_score(a[:, 0], a[:, i]):.4f}   |p - p_full| mean "
              f"{d.mean():.4f}, p95 {np.percentile(d, 95):.4f}, max {d.max():.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
