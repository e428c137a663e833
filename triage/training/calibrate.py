"""``triage calibrate``: temperature scaling and operating points on the calibration split.

The pure core (:func:`calibrate_logits`, :func:`operating_points`) takes logits
or probabilities with labels and returns plain values; :func:`run` is the edge
that loads a checkpoint, scores the split and writes the JSON report and the
reliability diagram.

Class-weighted training shifts every logit by ``log(pos_weight)``; that shift
is removed before the temperature is fitted (a temperature alone cannot undo
an offset), so the calibrated probability is ``sigmoid((logit - shift) / T)``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from triage.config import CalibrationConfig, OperatingPointConfig
from triage.core import metrics
from triage.files import write_atomic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OperatingPoint:
    """A named threshold on the calibrated probability, with its measured rates."""

    name: str
    metric: str
    target: float
    conservative: bool
    threshold: float | None
    sensitivity: metrics.Rate
    specificity: metrics.Rate

    def to_dict(self) -> dict[str, Any]:
        """Return the point as the model card stores it (threshold None: never reached)."""
        return {"name": self.name, "metric": self.metric, "target": self.target,
                "conservative": self.conservative, "threshold": self.threshold,
                "sensitivity": self.sensitivity.to_dict(),
                "specificity": self.specificity.to_dict()}


def _finite_threshold(t: float) -> float | None:
    """Map -inf to 0 (everything reaches it) and +inf to None (nothing does)."""
    if math.isinf(t):
        return 0.0 if t < 0 else None
    return float(t)


def operating_points(labels: np.ndarray, probs: np.ndarray,
                     points: Sequence[OperatingPointConfig], conservative: bool = False,
                     confidence: float = 0.95) -> list[OperatingPoint]:
    """Return each configured operating point's threshold and sensitivity/specificity with CIs."""
    out = []
    for op in points:
        strict = conservative if op.conservative is None else op.conservative
        t = metrics.select_threshold(labels, probs, op.metric, op.target, strict, confidence)
        thr = _finite_threshold(t)
        sens, spec = metrics.sens_spec(labels, probs, thr if thr is not None else math.inf,
                                       confidence)
        if thr is None:
            log.warning("operating point %s: target %.3f cannot be met", op.name, op.target)
        out.append(OperatingPoint(op.name, op.metric, op.target, strict, thr, sens, spec))
    return out


@dataclass(frozen=True)
class Calibration:
    """The result of calibrating one model on one split."""

    temperature: float
    prior_shift: float
    auc: float
    ece_before: float
    ece: float
    nll_before: float
    nll: float
    points: list[OperatingPoint]
    reliability: metrics.Reliability
    distribution: dict[str, list[float]]
    n: int
    n_pos: int

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready report."""
        rel = self.reliability
        return {
            "temperature": self.temperature, "prior_shift": self.prior_shift, "auc": self.auc,
            "ece_before": self.ece_before, "ece": self.ece,
            "nll_before": self.nll_before, "nll": self.nll, "n": self.n, "n_pos": self.n_pos,
            "operating_points": [p.to_dict() for p in self.points],
            "reliability": {"edges": rel.edges.tolist(), "counts": rel.counts.tolist(),
                            "mean_confidence": _nan_to_none(rel.mean_confidence),
                            "observed_rate": _nan_to_none(rel.accuracy)},
            "score_distribution": self.distribution,
        }


def _nan_to_none(a: np.ndarray) -> list[float | None]:
    """Return a list with NaN as None (JSON has no NaN)."""
    return [None if not np.isfinite(v) else float(v) for v in a]


def calibrate_logits(logits: np.ndarray, labels: np.ndarray, prior_shift: float,
                     cfg: CalibrationConfig) -> Calibration:
    """Fit the temperature on ``logits`` and place the operating points.

    Returns a :class:`Calibration`. Raises ValueError when there are no logits.
    """
    y = np.asarray(labels).astype(int)
    z = np.asarray(logits, dtype=np.float64) - prior_shift
    temperature = metrics.fit_temperature(z, y)
    before = metrics.sigmoid(z)
    probs = metrics.sigmoid(z / temperature)
    points = operating_points(y, probs, cfg.operating_points, cfg.conservative, cfg.confidence)
    return Calibration(
        temperature=temperature, prior_shift=prior_shift, auc=metrics.auc(y, probs),
        ece_before=metrics.ece(y, before, cfg.ece_bins), ece=metrics.ece(y, probs, cfg.ece_bins),
        nll_before=metrics.nll(z, y), nll=metrics.nll(z / temperature, y), points=points,
        reliability=metrics.reliability(y, probs, cfg.ece_bins),
        distribution=metrics.score_distribution(probs), n=len(y), n_pos=int(y.sum()),
    )


def reliability_png(rel: metrics.Reliability, path: str | Path, title: str = "") -> Path:
    """Write a reliability diagram (observed positive rate vs mean probability) as PNG.

    Returns the path. Raises OSError when it cannot be written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, axh) = plt.subplots(2, 1, figsize=(5, 6), gridspec_kw={"height_ratios": [3, 1]},
                                  sharex=True)
    centres = (rel.edges[:-1] + rel.edges[1:]) / 2
    width = rel.edges[1] - rel.edges[0]
    ok = rel.counts > 0
    ax.bar(centres[ok], rel.accuracy[ok], width=width * 0.9, edgecolor="k", label="observed")
    ax.plot([0, 1], [0, 1], "r--", label="perfect calibration")
    ax.set_ylabel("observed abnormal rate")
    ax.set_title(title or f"Reliability (ECE {rel.ece:.3f})")
    ax.legend(loc="upper left")
    axh.bar(centres, rel.counts, width=width * 0.9, color="grey")
    axh.set_xlabel("calibrated probability")
    axh.set_ylabel("count")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def split_logits(checkpoint: str | Path, samples: Sequence[Any], split: str, tta: str = "none",
                 perturb: Callable[[np.ndarray], np.ndarray] | None = None
                 ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Score one split with a checkpoint through its own preprocessing chain.

    ``perturb`` changes each decoded grey image before the chain (robustness
    checks). Returns (logits, labels, checkpoint metadata). Raises InputError.
    """
    from triage.core.errors import InputError
    from triage.imaging.transforms import InputSpec, build_transforms, preprocess_of, split_cached
    from triage.training import train

    model, meta = train.load_checkpoint(checkpoint)
    chosen = [s for s in samples if s.split == split]
    if not chosen:
        raise InputError(f"no samples in split {split!r}")
    pre = preprocess_of(meta)
    prefix, rest = split_cached(build_transforms(pre, InputSpec.from_dict(meta["input"])))
    first: Callable[[Any], Any] = prefix if perturb is None else (lambda g: prefix(perturb(g)))
    kept: list[Any] = []
    images, labels = train.cache_images(chosen, first, pre, f"cache {split}", kept)
    # "kept": the samples behind each logit (gated or undecodable ones are skipped)
    return train.predict_logits(model, images, rest, tta=tta), labels, {**meta, "kept": kept}


def robustness(checkpoint: str | Path, samples: Sequence[Any], split: str, tta: str = "none",
               ) -> dict[str, float]:
    """Return the AUC on ``split`` under each fixed perturbation and over all of them pooled.

    A check of what generalises that the validation images alone cannot give:
    the perturbations (:data:`triage.training.robustness.PERTURBATIONS`) mimic
    exposure, contrast, framing and resolution differing between sites.
    """
    from triage.training.robustness import PERTURBATIONS

    out: dict[str, float] = {}
    pooled_z, pooled_y = [], []
    for name, fn in PERTURBATIONS.items():
        z, y, _ = split_logits(checkpoint, samples, split, tta, fn)
        out[name] = metrics.auc(y, z)
        pooled_z.append(z)
        pooled_y.append(y)
    out["pooled"] = metrics.auc(np.concatenate(pooled_y), np.concatenate(pooled_z))
    return out


def run(checkpoint: str | Path, samples: Sequence[Any], split: str, cfg: CalibrationConfig,
        out_json: str | Path, out_png: str | Path | None = None, tta: str = "none",
        check_robustness: bool = False, bootstrap: int = 1000) -> Calibration:
    """Calibrate ``checkpoint`` on ``split`` and write the JSON report (and PNG).

    ``tta`` is recorded, and ``triage export`` bakes the same averaging into the
    graph. The report carries a bootstrap interval of the AUC and, with
    ``check_robustness``, the AUC under fixed perturbations. Returns the
    :class:`Calibration`. Raises InputError on unusable inputs.
    """
    logits, labels, meta = split_logits(checkpoint, samples, split, tta)
    cal = calibrate_logits(logits, labels, float(meta.get("prior_shift", 0.0)), cfg)
    chosen = meta["kept"]
    probs = metrics.sigmoid((np.asarray(logits, dtype=np.float64) - cal.prior_shift)
                            / cal.temperature)
    report = {"checkpoint": str(checkpoint), "split": split, "config": asdict(cfg), "tta": tta,
              **cal.to_dict(),
              "auc_ci_bootstrap": list(metrics.bootstrap_auc(labels, logits, bootstrap, 0,
                                                             cfg.confidence)),
              # Per-image calibrated probabilities, so that recipes can be compared
              # image by image (paired bootstrap) without scoring again.
              "scores": [{"path": str(s.path), "label": int(y), "probability": float(p)}
                         for s, y, p in zip(chosen, labels, probs, strict=True)]}
    if check_robustness:
        report["robustness_auc"] = robustness(checkpoint, samples, split, tta)
    write_atomic(out_json, json.dumps(report, indent=2, allow_nan=False), mode=0o644)
    if out_png is not None:
        reliability_png(cal.reliability, out_png)
    return cal
