"""Patient-level splits: no patient's images on both sides of a split.

The shared paediatric set's own ``train``/``val`` split is image-level: 343 of
its 524 ``val`` images come from patients who also have images in ``train``,
so early stopping, temperature and thresholds chosen on it are chosen on
patients the model has in effect already seen. :func:`patient_split` pools the
rows and splits them again by patient, stratified by label, with a fixed seed,
into ``train``, ``val`` (early stopping, calibration, thresholds) and
``holdout`` (the final report, touched once).

The patient comes from a ``patient`` column when the CSV has one, else from
the file name, as the Kermany et al. (2018) set names its files:
``personN_bacteria_M`` / ``personN_virus_M`` (patient ``personN``),
``IM-NNNN-MMMM`` and ``NORMAL2-IM-NNNN-MMMM`` (patient ``IM-NNNN`` /
``NORMAL2-IM-NNNN``).
"""

from __future__ import annotations

import csv
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from triage.core.errors import InputError
from triage.manifest import read_labelled_rows

_IM = re.compile(r"^((?:NORMAL\d*-)?IM-\d+)")
SPLITS = ("train", "val", "holdout")


def patient_id(path: str) -> str:
    """Return the patient a Kermany-style file name belongs to.

    Raises InputError for a name that follows neither pattern.
    """
    name = Path(path).stem
    if name.startswith("person") and "_" in name:
        return name.split("_", 1)[0]
    m = _IM.match(name)
    if m is None:
        raise InputError(f"cannot tell the patient of {path!r}: add a 'patient' column")
    return m.group(1)


def subtype(path: str) -> str:
    """Return ``bacteria``, ``virus`` or ``normal`` from a Kermany-style file name."""
    name = Path(path).stem.lower()
    return "bacteria" if "_bacteria" in name else "virus" if "_virus" in name else "normal"


@dataclass(frozen=True)
class SplitSummary:
    """What a split holds, per part: images, positives and patients."""

    images: dict[str, int]
    positives: dict[str, int]
    patients: dict[str, int]


def patient_split(patients: Sequence[str], labels: Sequence[int], seed: int,
                  val_fraction: float = 0.15, holdout_fraction: float = 0.15) -> list[str]:
    """Return a split name per row: every patient's rows in one part, stratified by label.

    Uses scikit-learn's StratifiedGroupKFold with as many folds as the smaller
    fraction allows; one fold becomes ``holdout``, the next ``val``. Raises
    InputError when a patient has rows with different labels or the fractions
    are out of range.
    """
    if not (0 < val_fraction < 0.5 and 0 < holdout_fraction < 0.5):
        raise InputError("val and holdout fractions must each be in (0, 0.5)")
    from sklearn.model_selection import StratifiedGroupKFold

    by_patient: dict[str, set[int]] = {}
    for p, y in zip(patients, labels, strict=True):
        by_patient.setdefault(p, set()).add(int(y))
    mixed = [p for p, ys in by_patient.items() if len(ys) > 1]
    if mixed:
        raise InputError(f"{len(mixed)} patient(s) have both labels, e.g. {mixed[0]}")
    folds = max(3, round(1 / min(val_fraction, holdout_fraction)))
    skf = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    parts = list(skf.split(np.zeros(len(labels)), np.asarray(labels), np.asarray(patients)))
    out = np.array(["train"] * len(labels), dtype=object)
    out[parts[0][1]] = "holdout"
    out[parts[1][1]] = "val"
    return [str(s) for s in out]


def summarise(split: Sequence[str], patients: Sequence[str], labels: Sequence[int]) -> SplitSummary:
    """Return images, positives and distinct patients per part (pure)."""
    images, positives, people = {}, {}, {}
    for part in SPLITS:
        idx = [i for i, s in enumerate(split) if s == part]
        images[part] = len(idx)
        positives[part] = sum(int(labels[i]) for i in idx)
        people[part] = len({patients[i] for i in idx})
    return SplitSummary(images, positives, people)


def write_split(manifest: Path, out: Path, seed: int, val_fraction: float = 0.15,
                holdout_fraction: float = 0.15) -> SplitSummary:
    """Read a ``path,label[,split,sha256,patient]`` CSV, split it by patient, write ``out``.

    Every row of the input is pooled (its own split column is ignored). The
    output has ``path,label,split,sha256,patient``. Raises InputError.
    """
    rows = read_labelled_rows(manifest)
    patients = [(r.get("patient") or "").strip() or patient_id(r["path"]) for r in rows]
    labels = [int(r["label"]) for r in rows]
    split = patient_split(patients, labels, seed, val_fraction, holdout_fraction)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "split", "sha256", "patient"])
        for r, s, p in zip(rows, split, patients, strict=True):
            w.writerow([r["path"], r["label"], s, (r.get("sha256") or "").strip(), p])
    return summarise(split, patients, labels)


def split_record(summary: SplitSummary, seed: int, manifest_sha256: str,
                 fractions: Mapping[str, float]) -> dict[str, object]:
    """Return how a split was made, as the model card records it."""
    return {"method": "patient-level, stratified (scikit-learn StratifiedGroupKFold)",
            "seed": seed, "fractions": dict(fractions), "manifest_sha256": manifest_sha256,
            "images": summary.images, "positives": summary.positives,
            "patients": summary.patients}
