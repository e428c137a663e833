"""The replay's HTML report: matplotlib figures embedded as base64 PNG in a Jinja2 page.

The page (``reports/templates/replay.html``) is self-contained: no script, no
external style sheet or font, so it opens offline and can be archived as is.
Figures are drawn on :class:`matplotlib.figure.Figure` objects directly (no
pyplot state), so rendering is safe in any thread.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from triage import resources
from triage.core import turnaround
from triage.core.tiers import ordered as ordered_points

COLOURS = {"pos": "#c0392b", "neg": "#2471a3", "fifo": "#7f8c8d", "triage": "#d35400"}


def png(fig: Figure) -> str:
    """Return ``fig`` as a base64 PNG data URI."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _no_data(title: str) -> Figure:
    fig = Figure(figsize=(4.2, 3.2))
    ax = fig.add_subplot()
    ax.text(0.5, 0.5, "not enough labelled, scored studies", ha="center", va="center")
    ax.set_title(title)
    ax.set_axis_off()
    return fig


def roc_figure(y: np.ndarray, p: np.ndarray, report: Mapping[str, Any]) -> Figure:
    """Return the ROC curve with the operating points marked."""
    from sklearn.metrics import roc_curve

    if len(set(y.tolist())) < 2:
        return _no_data("ROC")
    fpr, tpr, _ = roc_curve(y, p)
    fig = Figure(figsize=(4.2, 4.0))
    ax = fig.add_subplot()
    ci = report["auc_ci"]
    label = f"AUC {report['auc']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci[0] is not None else "")
    ax.plot(fpr, tpr, color="black", lw=1.5, label=label)
    ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1)
    for op in report["operating_points"]:
        if op["threshold"] is not None:
            ax.plot(1 - op["specificity"]["value"], op["sensitivity"]["value"], "o",
                    label=f"{op['name']} (p >= {op['threshold']:.3f})")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    return fig


def pr_figure(y: np.ndarray, p: np.ndarray, report: Mapping[str, Any]) -> Figure:
    """Return the precision-recall curve with the prevalence as baseline."""
    from sklearn.metrics import precision_recall_curve

    if len(set(y.tolist())) < 2:
        return _no_data("Precision-recall")
    prec, rec, _ = precision_recall_curve(y, p)
    fig = Figure(figsize=(4.2, 4.0))
    ax = fig.add_subplot()
    ax.plot(rec, prec, color="black", lw=1.5, label=f"AP {report['average_precision']:.3f}")
    ax.axhline(y.mean(), ls=":", color="grey", lw=1, label=f"prevalence {y.mean():.2f}")
    ax.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", title="Precision-recall",
           xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower left", fontsize=8)
    return fig


def reliability_figure(rel: Any, ece: float | None) -> Figure:
    """Return the reliability diagram: observed rate against mean predicted probability per bin."""
    fig = Figure(figsize=(4.2, 4.0))
    ax = fig.add_subplot()
    ok = rel.counts > 0
    centres = (rel.edges[:-1] + rel.edges[1:]) / 2
    width = rel.edges[1] - rel.edges[0]
    ax.bar(centres[ok], rel.accuracy[ok], width=width * 0.9, color="#aab7b8", label="observed")
    ax.plot(rel.mean_confidence[ok], rel.accuracy[ok], "o-", color="black", ms=3,
            label="observed vs mean predicted")
    ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1, label="perfect calibration")
    ax.set(xlabel="predicted P(abnormal)", ylabel="fraction abnormal", xlim=(0, 1), ylim=(0, 1),
           title="Reliability" + (f" (ECE {ece:.3f})" if ece is not None else ""))
    ax.legend(loc="upper left", fontsize=8)
    return fig


def histogram_figure(y: np.ndarray, p: np.ndarray, thresholds: Mapping[str, float | None]) -> Figure:
    """Return score histograms of normal and abnormal studies, with the thresholds."""
    fig = Figure(figsize=(5.2, 3.4))
    ax = fig.add_subplot()
    bins = np.linspace(0, 1, 41).tolist()
    for cls, name in ((0, "neg"), (1, "pos")):
        ax.hist(p[y == cls], bins=bins, alpha=0.6, color=COLOURS[name],
                label=f"{'abnormal' if cls else 'normal'} (n={int((y == cls).sum())})")
    for n, t in ordered_points(thresholds):
        if t is not None:
            ax.axvline(t, ls="--", color="black", lw=1)
            ax.text(t, ax.get_ylim()[1] * 0.95, f" {n}", fontsize=8, va="top")
    ax.set(xlabel="study probability", ylabel="studies", title="Scores by class")
    ax.legend(fontsize=8)
    return fig


def confusion_figure(report: Mapping[str, Any]) -> Figure:
    """Return one confusion matrix per operating point."""
    ops = report["operating_points"]
    fig = Figure(figsize=(3.0 * max(len(ops), 1), 2.9))
    for k, op in enumerate(ops):
        ax = fig.add_subplot(1, max(len(ops), 1), k + 1)
        c = op["confusion"]
        m = np.array([[c["tn"], c["fp"]], [c["fn"], c["tp"]]])
        ax.imshow(m, cmap="Greys", vmin=0, vmax=max(int(m.max()), 1) * 1.6)
        for (i, j), v in np.ndenumerate(m):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=11)
        ax.set_xticks([0, 1], ["called normal", "called abnormal"], fontsize=8)
        ax.set_yticks([0, 1], ["normal", "abnormal"], fontsize=8)
        thr = "never" if op["threshold"] is None else f"p >= {op['threshold']:.3f}"
        ax.set_title(f"{op['name']} ({thr})", fontsize=9)
    return fig


def turnaround_figures(tat: Mapping[str, Any], inputs: Mapping[str, Any]) -> list[str]:
    """Return [bar chart of mean/median/p90, ECDF of positives' times] as data URIs."""
    fig = Figure(figsize=(6.4, 3.4))
    ax = fig.add_subplot()
    stats_ = ("mean", "median", "p90")
    x = np.arange(len(stats_) * 2)
    for k, policy in enumerate(turnaround.POLICIES):
        vals = [tat[policy][cls][s] or 0.0 for cls in ("pos", "neg") for s in stats_]
        ax.bar(x + (k - 0.5) * 0.4, vals, width=0.4, color=COLOURS[policy], label=policy.upper()
               if policy == "fifo" else "triage order")
    ax.set_xticks(x, [f"{'abnormal' if c == 'pos' else 'normal'}\n{s}" for c in ("pos", "neg")
                      for s in stats_], fontsize=8)
    ax.set(ylabel="minutes from arrival to read", title="Time to read (seed average)")
    ax.legend(fontsize=8)
    return [png(fig), png(_ecdf_figure(inputs))]


def _ecdf_figure(inputs: Mapping[str, Any]) -> Figure:
    """Return the ECDF of abnormal studies' time to read in one simulation (seed 0)."""
    fig = Figure(figsize=(5.2, 3.4))
    ax = fig.add_subplot()
    rng = np.random.default_rng(0)
    arr = inputs["arrivals"]
    n = len(inputs["ranks"])
    if arr is None:
        arr = turnaround.poisson_arrivals(n, inputs.get("rate", 8.0), rng)[rng.permutation(n)]
    durations = turnaround.reading_times(n, inputs["model"], rng)
    for policy in turnaround.POLICIES:
        fin = turnaround.simulate(arr, inputs["ranks"], durations, inputs["model"].readers, policy,
                                  inputs["max_wait_min"], inputs["lift"])
        t = np.sort((fin - arr)[inputs["labels"] == 1])
        if len(t):
            ax.step(t, np.arange(1, len(t) + 1) / len(t), where="post", color=COLOURS[policy],
                    label="FIFO" if policy == "fifo" else "triage order")
    ax.set(xlabel="minutes from arrival to read", ylabel="fraction of abnormal studies read",
           title="Abnormal studies: time to read (seed 0)", ylim=(0, 1.01))
    if ax.get_lines():
        ax.legend(fontsize=8)
    return fig


def figures(report: Mapping[str, Any], inputs: Mapping[str, Any]) -> dict[str, Any]:
    """Return every figure of the report as a data URI (turnaround: a list of two)."""
    y, p = inputs["labels"], inputs["probs"]
    return {"roc": png(roc_figure(y, p, report)), "pr": png(pr_figure(y, p, report)),
            "reliability": png(reliability_figure(inputs["reliability"], report["ece"])),
            "histogram": png(histogram_figure(y, p, report["thresholds"])),
            "confusion": png(confusion_figure(report)),
            "turnaround": turnaround_figures(report["turnaround"], inputs["turnaround"])}


def render(report: Mapping[str, Any], inputs: Mapping[str, Any],
           templates: Path | None = None) -> str:
    """Return the report page as HTML (autoescaped). Raises jinja2 errors on a broken template."""
    from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

    folder = templates or resources.path("templates")
    env = Environment(loader=FileSystemLoader(str(folder)), undefined=StrictUndefined,
                      autoescape=select_autoescape(["html"]))
    env.filters["num"] = _num
    env.filters["pct"] = _pct
    return env.get_template("replay.html").render(r=report, fig=figures(report, inputs))


def _num(v: Any, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _pct(v: Any, digits: int = 1) -> str:
    return "–" if v is None else f"{100 * v:.{digits}f}%"
