"""The replay report's numbers (pure): per-study records and labels in, a JSON-ready dict out.

Metrics are computed over studies that are both labelled and scored. A study's
score is the daemon's: the highest probability of its eligible images.
Unscored studies are counted, with their reasons, but cannot enter the ROC;
in the turnaround simulation they take part with the ``unscored`` tier, as on
the worklist. Nothing here touches disk, clock or network.
"""

from __future__ import annotations

import datetime as _dt
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from triage.core import metrics, tiers, turnaround
from triage.core.drift import METADATA_FIELDS, assess
from triage.core.metrics import bootstrap_auc, bootstrap_ece, delong
from triage.core.site import CannotGuarantee, Target, fit_points, min_cases, targets_of
from triage.replay.labels import LabelRow, Labels, dicom_datetime
from triage.replay.records import StudyRecord

SUBGROUP_FIELDS = {"manufacturer": "manufacturer", "photometric": "photometric",
                   "view_position": "view_position", "sex": "patient_sex"}
UNKNOWN = "unknown"


@dataclass(frozen=True)
class Joined:
    """A study's record with its label row (None when the CSV has no row for it)."""

    record: StudyRecord
    row: LabelRow | None

    @property
    def label(self) -> int | None:
        """1, 0, or None when unlabelled."""
        return None if self.row is None else self.row.label

    @property
    def scored(self) -> bool:
        """True when the study has a probability."""
        return self.record.probability is not None

    @property
    def arrival(self) -> _dt.datetime | None:
        """The CSV's arrival_time, else StudyDate + StudyTime, else None."""
        if self.row is not None and self.row.arrival is not None:
            return self.row.arrival
        return dicom_datetime(self.record.study_date, self.record.study_time)


def join(records: Sequence[StudyRecord], labels: Labels) -> list[Joined]:
    """Return each record with its label row, matched by StudyInstanceUID, then AccessionNumber."""
    return [Joined(r, labels.lookup(r.study_uid, r.accession_number)) for r in records]


# --- discrimination -------------------------------------------------------------

def operating_point(labels: np.ndarray, probs: np.ndarray, name: str, threshold: float | None,
                    confidence: float = 0.95) -> dict[str, Any]:
    """Return one operating point: threshold, confusion matrix and rates with exact CIs.

    A study is called abnormal when its probability reaches the threshold
    (``p >= t``, as :func:`triage.core.tiers.priority`); a None threshold calls nothing.
    """
    y = np.asarray(labels).astype(int)
    called = np.zeros(len(y), bool) if threshold is None else np.asarray(probs) >= threshold
    tp = int((called & (y == 1)).sum())
    fp = int((called & (y == 0)).sum())
    fn = int((~called & (y == 1)).sum())
    tn = int((~called & (y == 0)).sum())

    def r(k: int, n: int) -> dict[str, float | int]:
        return metrics.rate(k, n, confidence).to_dict()

    return {"name": name, "threshold": threshold, "sensitivity": r(tp, tp + fn),
            "specificity": r(tn, tn + fp), "ppv": r(tp, tp + fp), "npv": r(tn, tn + fn),
            "flagged": r(tp + fp, len(y)), "confusion": {"tp": tp, "fp": fp, "tn": tn, "fn": fn}}


def ordered_points(thresholds: Mapping[str, float | None]) -> list[tuple[str, float | None]]:
    """Return operating points from the lowest threshold up (a None threshold last)."""
    return tiers.ordered(thresholds)


def discrimination(labels: np.ndarray, probs: np.ndarray, thresholds: Mapping[str, float | None],
                   confidence: float) -> dict[str, Any]:
    """Return n, n_pos, n_neg, AUC with its DeLong interval, and every operating point."""
    y = np.asarray(labels).astype(int)
    auc, ci = delong(y, probs, confidence)
    return {"n": len(y), "n_pos": int(y.sum()), "n_neg": int((1 - y).sum()),
            "auc": auc, "auc_ci": list(ci),
            "operating_points": [operating_point(y, probs, n, t, confidence)
                                 for n, t in ordered_points(thresholds)]}


# --- study attributes, unscored, subgroups, drift ------------------------------------

def deciding_image(rec: StudyRecord) -> Mapping[str, Any]:
    """Return the image that set the study's probability (else its first image, else {})."""
    scored = [i for i in rec.images if i.get("probability") is not None]
    if scored:
        return max(scored, key=lambda i: i["probability"])
    return rec.images[0] if rec.images else {}


def attribute(rec: StudyRecord, field: str) -> str:
    """Return a subgroup value of a study: its deciding image's metadata, or its patient sex."""
    if field == "patient_sex":
        v = rec.patient_sex
    else:
        v = deciding_image(rec).get(field)
    return str(v).strip() if v not in (None, "") else UNKNOWN


def _reason_text(reason: str) -> str:
    """Drop the "image <hash>: " prefix so reasons can be counted."""
    head, sep, rest = reason.partition(": ")
    return rest if sep and head.startswith("image ") else reason


def unscored_summary(joined: Sequence[Joined]) -> dict[str, Any]:
    """Return the count of unscored studies, how many were labelled 1/0, and reasons by count.

    A study with several reasons counts once under each distinct reason.
    """
    un = [j for j in joined if not j.scored]
    reasons: Counter[str] = Counter()
    for j in un:
        reasons.update({_reason_text(r) for r in j.record.reasons} or {"no reason recorded"})
    return {"count": len(un), "labelled_pos": sum(j.label == 1 for j in un),
            "labelled_neg": sum(j.label == 0 for j in un),
            "reasons": dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])))}


def subgroups(joined: Sequence[Joined], thresholds: Mapping[str, float | None],
              confidence: float) -> dict[str, dict[str, Any]]:
    """Return, per subgroup field and value, the discrimination metrics and unscored count."""
    out: dict[str, dict[str, Any]] = {}
    labelled = [j for j in joined if j.label is not None]
    for name, field in SUBGROUP_FIELDS.items():
        groups: dict[str, list[Joined]] = {}
        for j in labelled:
            groups.setdefault(attribute(j.record, field), []).append(j)
        out[name] = {}
        for value in sorted(groups):
            rows = [j for j in groups[value] if j.scored]
            y = np.array([j.label for j in rows], dtype=int)
            p = np.array([j.record.probability for j in rows], dtype=np.float64)
            out[name][value] = {**discrimination(y, p, thresholds, confidence),
                                "unscored": len(groups[value]) - len(rows)}
    return out


def drift_section(records: Sequence[StudyRecord], card: Mapping[str, Any] | None,
                  drift_cfg: Any) -> dict[str, Any]:
    """Return the daemon's drift verdict over every scored image of the replay.

    Without a model card reference, says so instead.
    """
    if not card or "reference_scores" not in card:
        return {"available": False, "summary": "no model card reference to compare with"}
    imgs = [i for r in records for i in r.images if i.get("probability") is not None]
    v = assess(card, [float(i["probability"]) for i in imgs],
               [{f: i.get(f) for f in METADATA_FIELDS} for i in imgs], drift_cfg)
    return {"available": True, "n_images": v.n, "psi": v.psi, "ks": v.ks, "unseen": v.unseen,
            "alert": v.alert, "summary": v.summary, "kind": v.kind, "p_value": v.p_value,
            "prevalence_estimate": v.prevalence, "action": v.action, "alpha": drift_cfg.alpha,
            "min_samples": drift_cfg.min_samples}


# --- turnaround -------------------------------------------------------------------

def arrivals_of(joined: Sequence[Joined]) -> tuple[np.ndarray | None, str, int]:
    """Return (arrival minutes from the first arrival, source, studies without a time).

    When any study lacks a time the array is None and the source "poisson".
    """
    times = [j.arrival for j in joined]
    missing = sum(t is None for t in times)
    if not times or missing:
        return None, "poisson", missing
    t0 = min(t for t in times if t is not None)
    mins = np.array([(t - t0).total_seconds() / 60.0 for t in times if t is not None])
    csv = sum(j.row is not None and j.row.arrival is not None for j in joined)
    source = "csv" if csv == len(joined) else "dicom" if csv == 0 else "csv+dicom"
    return mins, source, 0


def observed_turnaround(joined: Sequence[Joined]) -> dict[str, Any] | None:
    """Return the historical time to read from the CSV's arrival_time and read_time, if given."""
    rows = [(j.label, (j.row.read - j.row.arrival).total_seconds() / 60.0) for j in joined
            if j.row is not None and j.row.read is not None and j.row.arrival is not None]
    if not rows:
        return None
    return {cls: turnaround.summary(np.array([m for lab, m in rows if lab == v]))
            for cls, v in (("pos", 1), ("neg", 0))}


def turnaround_section(joined: Sequence[Joined], thresholds: Mapping[str, float | None],
                       replay_cfg: Any, max_wait_min: float, confidence: float
                       ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return (the report's turnaround section, inputs for the figures).

    Every study takes part in the queue (unlabelled and unscored ones too);
    only labelled studies are summarised as positives or negatives.
    """
    th = dict(thresholds)
    ranks = np.array([tiers.rank(j.record.tier, th) for j in joined], dtype=int)
    labels = np.array([-1 if j.label is None else j.label for j in joined], dtype=int)
    arrivals, source, missing = arrivals_of(joined)
    lift = tiers.LIFT_RANK if tiers.lift_tier(th) is not None else None
    model = turnaround.ReaderModel(replay_cfg.readers, replay_cfg.minutes_per_study,
                                   replay_cfg.reading_time_cv)
    agg, _ = turnaround.simulate_seeds(arrivals, ranks, labels, model, max_wait_min,
                                       range(replay_cfg.seeds), replay_cfg.poisson_rate_per_hour,
                                       confidence, lift)
    section = {
        "unit": "minutes", "definition": "time from arrival until the read is finished",
        "arrival_source": source, "studies_without_arrival_time": missing,
        "readers": model.readers, "minutes_per_study": model.minutes_per_study,
        "reading_time_cv": model.reading_time_cv, "ageing_max_wait_min": max_wait_min,
        "poisson_rate_per_hour": replay_cfg.poisson_rate_per_hour if arrivals is None else None,
        **agg, "observed": observed_turnaround(joined)}
    return section, {"arrivals": arrivals, "ranks": ranks, "labels": labels, "model": model,
                     "max_wait_min": max_wait_min, "lift": lift, "rate": replay_cfg.poisson_rate_per_hour}


# --- advice and warnings for the site ----------------------------------------------

# Splits of the shared data sets that the shipped models trained or stopped early on.
IN_SAMPLE_SPLITS = frozenset({"train", "val"})
FEW_STUDIES = 100
FEW_PER_CLASS = 30


def warnings_for(labels: Labels, joined: Sequence[Joined], auc_ci: Sequence[float | None],
                 n_pos: int, n_neg: int) -> list[str]:
    """Return what a QA reader must know before trusting a replay's figures."""
    out = []
    splits = {j.row.split for j in joined if j.row is not None and j.row.split}
    inside = sorted(splits & IN_SAMPLE_SPLITS)
    if inside:
        out.append(f"in-sample labels: the archive was built from the {'/'.join(inside)} split of "
                   "the data the model was trained or early-stopped on, so these figures are "
                   "optimistic; replay studies the model has never seen")
    lo, hi = auc_ci[0] if auc_ci else None, auc_ci[1] if len(auc_ci) > 1 else None
    if lo is not None and hi is not None and hi - lo < 1e-9:
        out.append(f"degenerate interval: AUC [{lo:.3f}, {hi:.3f}] from {n_pos} abnormal and "
                   f"{n_neg} normal studies says nothing about the uncertainty")
    if n_pos + n_neg < FEW_STUDIES or min(n_pos, n_neg) < FEW_PER_CLASS:
        out.append(f"too few labelled studies ({n_pos} abnormal, {n_neg} normal): intervals are "
                   f"wide; aim for at least {FEW_PER_CLASS} of each and {FEW_STUDIES} in all")
    return out


def site_advice(y: np.ndarray, p: np.ndarray, targets: Sequence[Target],
           confidence: float) -> dict[str, Any]:
    """Return the report's "what this site should use": fitted points, or why none can be."""
    try:
        points = fit_points(y, p, targets, confidence)
    except CannotGuarantee as e:
        need = {t.name: min_cases(t.target, confidence) for t in targets}
        return {"available": False, "reason": str(e), "minimum_cases": need,
                "confidence": confidence}
    return {"available": True, "confidence": confidence,
            "operating_points": [pt.to_dict() for pt in points],
            "command": "triage site calibrate REPLAY_DIR --out PROFILE.toml"}


# --- the whole report ------------------------------------------------------------------

def card_comparison(card: Mapping[str, Any] | None, report: Mapping[str, Any]) -> dict[str, Any]:
    """Return the model card's validation figures beside the replay's, with differences."""
    if not card or "validation" not in card:
        return {}
    val = card["validation"]
    out: dict[str, Any] = {"split": val.get("split"), "n": val.get("n"),
                           "auc": _pair(val.get("auc"), report.get("auc")),
                           "ece": _pair(card.get("ece", val.get("ece")), report.get("ece"))}
    mine = {op["name"]: op for op in report.get("operating_points", [])}
    for op in card.get("operating_points", []):
        if op.get("name") in mine:
            for rate in ("sensitivity", "specificity"):
                out[f"{op['name']}_{rate}"] = _pair(op.get(rate, {}).get("value"),
                                                     mine[op["name"]][rate]["value"])
    return out


def _pair(card_value: Any, replay_value: Any) -> dict[str, Any]:
    ok = all(isinstance(v, (int, float)) and math.isfinite(v) for v in (card_value, replay_value))
    return {"card": card_value, "replay": replay_value,
            "difference": float(replay_value - card_value) if ok else None}


def build_report(records: Sequence[StudyRecord], labels: Labels, thresholds: Mapping[str, float | None],
                 card: Mapping[str, Any] | None, cfg: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return (report, figure inputs) for the replayed ``records`` (pure).

    ``cfg`` is the whole :class:`triage.config.Config` ([replay], [calibration],
    [drift], [worklist]).
    """
    conf = cfg.calibration.confidence
    joined = join(records, labels)
    usable = [j for j in joined if j.label is not None and j.scored]
    y = np.array([j.label for j in usable], dtype=int)
    p = np.array([j.record.probability for j in usable], dtype=np.float64)
    rel = metrics.reliability(y, p, cfg.calibration.ece_bins)
    disc = discrimination(y, p, thresholds, conf)
    report: dict[str, Any] = {
        "studies": len(joined), "scored": sum(j.scored for j in joined),
        "unlabelled": sum(j.label is None for j in joined),
        "n": disc["n"], "n_pos": disc["n_pos"], "n_neg": disc["n_neg"],
        "prevalence": float(y.mean()) if len(y) else None,
        "unscored": unscored_summary(joined),
        "unmatched_labels": _unmatched(labels, records),
        "thresholds": dict(thresholds),
        "auc": disc["auc"], "auc_ci": disc["auc_ci"], "auc_ci_method": "DeLong",
        "auc_ci_bootstrap": list(bootstrap_auc(y, p, cfg.replay.bootstrap, 0, conf)),
        "average_precision": _average_precision(y, p), "confidence": conf,
        "operating_points": disc["operating_points"],
        "ece": rel.ece if len(y) else None, "ece_bins": cfg.calibration.ece_bins,
        "ece_ci_bootstrap": list(bootstrap_ece(y, p, cfg.calibration.ece_bins,
                                               cfg.replay.bootstrap, 0, conf)),
        "reliability": {"edges": rel.edges.tolist(), "counts": rel.counts.tolist(),
                        "mean_confidence": rel.mean_confidence.tolist(),
                        "accuracy": rel.accuracy.tolist()},
        "subgroups": subgroups(joined, thresholds, conf),
        "drift": drift_section(records, card, cfg.drift),
    }
    report["turnaround"], fig_tat = turnaround_section(
        joined, thresholds, cfg.replay, cfg.worklist.routine_max_wait_min, conf)
    report["card_comparison"] = card_comparison(card, report)
    report["site_advice"] = site_advice(y, p, targets_of(cfg.calibration.operating_points, None),
                                        conf)
    report["quality_warnings"] = warnings_for(labels, joined, disc["auc_ci"], disc["n_pos"],
                                              disc["n_neg"])
    figures = {"labels": y, "probs": p, "reliability": rel, "turnaround": fig_tat}
    return clean(report), figures


def _unmatched(labels: Labels, records: Sequence[StudyRecord], shown: int = 200) -> dict[str, Any]:
    keys = labels.unmatched((r.study_uid, r.accession_number) for r in records)
    return {"count": len(keys), "keys": keys[:shown], "keys_truncated": len(keys) > shown}


def _average_precision(y: np.ndarray, p: np.ndarray) -> float | None:
    if not len(y) or y.sum() == 0:
        return None
    from sklearn.metrics import average_precision_score

    return float(average_precision_score(y, p))


def clean(obj: Any) -> Any:
    """Return ``obj`` with NaN/inf floats as None and numpy scalars as Python numbers."""
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj

