"""Fitting a site profile from a labelled replay, and the replay report's advice to the site.

:func:`labelled_scores` reads a replay folder back (its per-study results and
the labels CSV it was run with); :func:`fit` places the operating points with
:func:`triage.core.site.fit_points` and returns the profile document;
 the report's section "what this site should use" is
:func:`triage.replay.report.site_advice`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from triage import __version__
from triage.core import metrics
from triage.core.errors import InputError
from triage.core.site import SitePoint, Target, fit_points, targets_of  # noqa: F401
from triage.profile import FORMAT, now_iso
from triage.replay.labels import read_labels
from triage.replay.records import ResultsFile, StudyRecord
from triage.replay.report import Joined, join


@dataclass(frozen=True)
class Labelled:
    """A replay's labelled, scored studies, with what is needed to describe them."""

    labels: np.ndarray
    scores: np.ndarray
    image_scores: np.ndarray
    joined: list[Joined]
    records: list[StudyRecord]
    replay_dir: Path
    labels_path: Path


def labelled_scores(replay_dir: str | Path, labels_path: str | Path | None = None) -> Labelled:
    """Return the labelled, scored studies of a replay folder.

    The labels CSV defaults to the one the replay recorded in ``report.json``.
    Raises InputError when the folder holds no results or no labels are found.
    """
    folder = Path(replay_dir)
    records = list(ResultsFile.read_only(folder).values())
    if not records:
        raise InputError(f"{folder} holds no replay results (results.jsonl); run `triage replay`")
    if labels_path is None:
        try:
            labels_path = json.loads((folder / "report.json").read_text())["meta"]["labels"]
        except (OSError, ValueError, KeyError) as e:
            raise InputError(f"{folder}/report.json does not name its labels CSV; pass --labels") from e
    labels = read_labels(labels_path)
    joined = join(records, labels)
    usable = [j for j in joined if j.label is not None and j.scored]
    images = [float(i["probability"]) for j in usable for i in j.record.images
              if i.get("probability") is not None]
    return Labelled(np.array([j.label for j in usable], dtype=int),
                    np.array([j.record.probability for j in usable], dtype=np.float64),
                    np.array(images, dtype=np.float64), joined, records, folder,
                    Path(labels_path))


def _model_sha(records: Sequence[StudyRecord]) -> str:
    shas = {r.model_sha256 for r in records if r.model_sha256}
    if len(shas) != 1:
        raise InputError(f"the replay's results come from {len(shas)} models; "
                         "a profile is fitted for exactly one")
    return shas.pop()


def _dates(records: Sequence[StudyRecord]) -> tuple[str | None, str | None]:
    days = sorted(r.study_date for r in records if r.study_date and len(r.study_date) == 8)
    fmt = lambda d: f"{d[:4]}-{d[4:6]}-{d[6:]}"  # noqa: E731
    return (fmt(days[0]), fmt(days[-1])) if days else (None, None)


def fit(data: Labelled, targets: Sequence[Target], confidence: float, site: str = "",
        card: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], list[SitePoint]]:
    """Return (profile document, fitted points). Raises CannotGuarantee or InputError."""
    if len(data.labels) == 0:
        raise InputError("the replay has no labelled, scored studies")
    points = fit_points(data.labels, data.scores, targets, confidence)
    first, last = _dates(data.records)
    n, n_pos = len(data.labels), int(data.labels.sum())
    card_points = [{"name": op["name"], "threshold": op["threshold"],
                    **_rates_at(data, op["threshold"], confidence)}
                   for op in (card or {}).get("operating_points", []) if op.get("threshold") is not None]
    doc = {
        "profile": {"format": FORMAT, "created": now_iso(), "site": site,
                    "model_sha256": _model_sha(data.records),
                    "model_name": str((card or {}).get("name", "")),
                    "confidence": confidence, "triage_version": __version__,
                    "method": "each point's target holds at the lower Clopper-Pearson bound"},
        "site": {"replay": str(data.replay_dir), "labels": str(data.labels_path),
                 "studies": len(data.records), "labelled_scored": n, "positives": n_pos,
                 "negatives": n - n_pos, "prevalence": n_pos / n,
                 "auc": metrics.auc(data.labels, data.scores),
                 "first_study_date": first, "last_study_date": last},
        "operating_points": [p.to_dict() for p in points],
        "card_operating_points": card_points,
        "reference_scores": metrics.score_distribution(data.image_scores),
        # Per-class references let the drift watch tell a change in this site's prevalence
        # from a change in how the model ranks its studies (study-level scores).
        "reference_scores_pos": metrics.score_distribution(data.scores[data.labels == 1]),
        "reference_scores_neg": metrics.score_distribution(data.scores[data.labels == 0]),
    }
    return doc, points


def _rates_at(data: Labelled, threshold: float, confidence: float) -> dict[str, Any]:
    sens, spec = metrics.sens_spec(data.labels, data.scores, threshold, confidence)
    return {"sensitivity": sens.value, "sensitivity_ci": [sens.lower, sens.upper],
            "specificity": spec.value, "specificity_ci": [spec.lower, spec.upper]}


def roc_png(data: Labelled, card_thresholds: Mapping[str, float | None],
            points: Sequence[SitePoint], path: Path) -> Path:
    """Draw the site's ROC with the card's and the site's operating points; return the path."""
    from matplotlib.figure import Figure
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(data.labels, data.scores)
    fig = Figure(figsize=(5.2, 4.8))
    ax = fig.add_subplot()
    ax.plot(fpr, tpr, color="black", lw=1.4,
            label=f"this site (AUC {metrics.auc(data.labels, data.scores):.3f})")
    ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1)
    for name, t in card_thresholds.items():
        if t is not None:
            sens, spec = metrics.sens_spec(data.labels, data.scores, t)
            ax.plot(1 - spec.value, sens.value, "s", mfc="none", ms=8, label=f"card {name} (p >= {t:.3f})")
    for p in points:
        ax.plot(1 - p.specificity.value, p.sensitivity.value, "o", ms=7,
                label=f"site {p.name} (p >= {p.threshold:.3f})")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1.01),
           title=f"Site ROC: {len(data.labels)} labelled studies")
    ax.legend(loc="lower right", fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path
