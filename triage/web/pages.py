"""The radiologists' pages: database rows in, HTML (Jinja2, autoescaped) out.

The worklist is rendered by the scheduler, not per request: :meth:`Pages.render_worklist`
writes ``worklist.html`` and ``worklist.json`` from the same ordered rows to
temp files and renames them into place, so a reader never sees half a page and
the JSON is always in the page's order. Study and history pages are rendered
per request. Every value from a DICOM header passes through Jinja2's
autoescaping.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup
from sqlalchemy import and_, func, select

from triage import resources
from triage.config import WorklistConfig
from triage.core import tiers
from triage.core.tiers import PENDING, UNSCORED, priority
from triage.core.worklist import (
    Placed,
    Row,
    arrange,
    bands,
    format_study_datetime,
    format_wait,
    to_json,
)
from triage.files import write_atomic
from triage.store import outbox
from triage.store import schema as db
from triage.store.schema import Alert, ImageResult, Instance, Result, Study, StudyEvent

log = logging.getLogger(__name__)
DISCLAIMER = "Not for diagnostic use: triage aid"
HISTORY_LIMIT = 200
# Inline assets: included verbatim in every page, and allowed by the CSP by hash.
INLINE_ASSETS = {"style": "style.css", "script": "app.js"}


@dataclass(frozen=True)
class ModelInfo:
    """The model the worker scores with, as the banner shows it."""

    name: str
    sha256: str
    created: str
    thresholds: dict[str, float | None]
    thresholds_source: str = "model card"
    # Shown on every page's banner: e.g. a model self-test that failed on this CPU.
    warnings: tuple[str, ...] = ()

    @property
    def version(self) -> str:
        """A short, human-checkable version: name and the first 12 hex digits of its sha256."""
        return f"{self.name} {self.sha256[:12]}".strip()

    @property
    def ordered_thresholds(self) -> list[tuple[str, float | None]]:
        """The operating points, highest threshold first (as the bands run)."""
        order = tiers.band_order(self.thresholds)
        return [(n, self.thresholds[n]) for n in order if n in self.thresholds]


def environment() -> jinja2.Environment:
    """Return the Jinja2 environment: templates in ``reports/templates``, autoescape always on."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(resources.path("templates")),
                             autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True)
    env.filters["wait"] = format_wait
    env.filters["prob"] = lambda p: "–" if p is None else f"{p:.2f}"
    env.filters["pn"] = lambda v: "" if v is None else str(v).replace("^", " ").strip()
    env.filters["when"] = lambda t: "" if t is None else time.strftime(
        "%Y-%m-%d %H:%M", time.localtime(t))
    env.filters["age"] = format_age
    env.filters["sex"] = lambda v: {"M": "male", "F": "female", "O": "other"}.get(
        str(v or "").strip().upper(), "")
    env.globals["study_datetime"] = format_study_datetime
    env.globals["disclaimer"] = DISCLAIMER
    return env


def format_age(value: str | None) -> str:
    """A DICOM Age String as people write it: '064Y' -> '64 y', '006M' -> '6 mo'; '' if none."""
    v = str(value or "").strip().upper()
    units = {"Y": "y", "M": "mo", "W": "wk", "D": "d"}
    if len(v) == 4 and v[:3].isdigit() and v[3] in units:
        return f"{int(v[:3])} {units[v[3]]}"
    return ""


def asset_hashes(env: jinja2.Environment) -> dict[str, str]:
    """Return the CSP source ('sha256-…') of each inline asset, as the pages include it."""
    out = {}
    for kind, name in INLINE_ASSETS.items():
        text = env.get_template(name).render()
        out[kind] = "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"
    return out


# --- database reads --------------------------------------------------------------


def _reason(study: Study, res: Result | None) -> str | None:
    if study.state == db.MOVED:
        return study.note or "every image moved to another study"
    if study.state == db.FAILED:
        return f"scoring failed: {study.failure}" if study.failure else "scoring failed"
    if study.state == db.RECEIVING:
        return "receiving images"
    if study.state == db.COMPLETE:
        if study.attempts:
            return f"scoring failed {study.attempts}×, retrying: {study.failure or 'unknown'}"
        return "queued for scoring"
    if res is None:
        return None
    if res.state != db.SCORED:
        reasons = json.loads(res.reasons or "[]")
        return "; ".join(reasons) or res.state
    return None


def row_of(study: Study, res: Result | None) -> Row:
    """Return the worklist row of a study and its latest result (None: not scored yet)."""
    rescoring = res is not None and study.state in (db.RECEIVING, db.COMPLETE)
    tier = res.tier if res is not None else (PENDING if study.state in (db.RECEIVING, db.COMPLETE)
                                             else UNSCORED)
    return Row(
        study_id=study.id, tier=tier, waiting_since=study.first_received_at,
        probability=res.probability if res else None, state=study.state,
        accession_number=study.accession_number, patient_name=study.patient_name,
        patient_id=study.patient_id, study_description=study.study_description,
        study_date=study.study_date, study_time=study.study_time, modality=study.modality,
        n_images=study.n_instances, reason=_reason(study, res), version=study.version,
        tier_change=res.tier_change if res else None,
        previous_tier=res.previous_tier if res else None, rescoring=rescoring,
        reported_at=study.reported_at, reported_by=study.reported_by,
        patient_sex=study.patient_sex, patient_age=study.patient_age)


def load_rows(store: Any, reported: bool = False, accession: str | None = None,
              limit: int | None = None) -> list[Row]:
    """Return the rows of active studies (or, with ``reported``, of reported ones, newest first).

    ``accession`` keeps only studies whose accession number contains it.
    """
    latest = (select(Result.study_id, func.max(Result.version).label("v"))
              .group_by(Result.study_id).subquery())
    q = (select(Study, Result)
         .outerjoin(latest, latest.c.study_id == Study.id)
         .outerjoin(Result, and_(Result.study_id == Study.id, Result.version == latest.c.v))
         .where(Study.reported_at.is_not(None) if reported else Study.reported_at.is_(None)))
    if accession:
        q = q.where(Study.accession_number.contains(accession, autoescape=True))
    if reported:
        q = q.order_by(Study.reported_at.desc(), Study.id.desc())
    if limit is not None:
        q = q.limit(limit)
    with store.read() as s:
        return [row_of(study, res) for study, res in s.execute(q).all()]


def active_alerts(store: Any) -> list[Alert]:
    """Return the active alerts (drift, for now), newest first."""
    with store.read() as s:
        return list(s.scalars(select(Alert).where(Alert.active.is_(True)).order_by(Alert.at.desc())))


@dataclass(frozen=True)
class ImageView:
    """One image of a result, for the study page."""

    instance_id: int
    probability: float | None
    tier: str
    reason: str | None
    heatmap: str | None  # path relative to the data directory
    view_position: str | None
    rows: int | None
    columns: int | None
    # The nearest few-shot prototype and its distance (None: off or unscored); never a tier.
    prototype_class: str | None = None
    prototype_distance: float | None = None
    # The LIME overlay beside the Grad-CAM one: ready (with its path), computing, failed
    # (with the reason), or None when nobody asked; "off" when the daemon has no explainer.
    lime_state: str | None = "off"
    lime: str | None = None
    lime_reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        """Return the image as ``/api/study/ID`` lists it."""
        from triage.inference.prototypes import as_finding

        return {"instance_id": self.instance_id, "probability": self.probability,
                "tier": self.tier, "reason": self.reason, "view_position": self.view_position,
                "rows": self.rows, "columns": self.columns,
                "heatmap": f"/files/{self.heatmap}" if self.heatmap else None,
                "prototype": as_finding(self.prototype_class, self.prototype_distance),
                "lime": {"state": self.lime_state, "reason": self.lime_reason,
                         "url": f"/files/{self.lime}" if self.lime else None}}


def study_detail(store: Any, study_id: int) -> dict[str, Any] | None:
    """Return what the study page shows (study, results newest first, images), or None.

    Each image's tier is taken at the thresholds its result was scored with.
    """
    with store.read() as s:
        study = s.get(Study, study_id)
        if study is None:
            return None
        results = list(s.scalars(select(Result).where(Result.study_id == study_id)
                                 .order_by(Result.version.desc())))
        thresholds = json.loads(results[0].thresholds) if results else {}
        images: list[ImageView] = []
        if results:
            q = (select(ImageResult).where(ImageResult.result_id == results[0].id)
                 .order_by(ImageResult.id))
            images = [ImageView(ir.instance_id, ir.probability, priority(ir.probability, thresholds),
                                ir.reason, ir.heatmap_path, ir.view_position, ir.rows, ir.columns,
                                ir.prototype_class, ir.prototype_distance)
                      for ir in s.scalars(q)]
        events = list(s.scalars(select(StudyEvent).where(StudyEvent.study_id == study_id)
                                .order_by(StudyEvent.at.desc(), StudyEvent.id.desc())))
    return {"study": study, "row": row_of(study, results[0] if results else None),
            "results": results, "images": images, "thresholds": thresholds, "events": events}


# --- rendering -----------------------------------------------------------------


class Pages:
    """Renders the worklist to files (scheduled) and the study and history pages (per request)."""

    def __init__(self, store: Any, out_dir: Path, model: ModelInfo, cfg: WorklistConfig,
                 clock: Callable[[], float] = time.time,
                 gate: Callable[[], bool] | None = None) -> None:
        self.store, self.out_dir, self.model, self.cfg = store, out_dir, model, cfg
        self.clock = clock
        # Whether this daemon renders the shared worklist now (with several daemons, the
        # leader does; the others' changes reach it through the leader's next look).
        self.gate = gate
        self.env = environment()
        self.csp_hashes = asset_hashes(self.env)
        # One render at a time: a slower, older render must not rename over a newer one.
        self._lock = threading.Lock()
        # Rendered worklist rows by what they show (see _rows_html).
        self._row_cache: dict[tuple[Any, ...], Markup] = {}
        # LIME on demand (triage.service.explain.Explainer); None: not offered.
        self.explainer: Any = None

    @property
    def worklist_html(self) -> Path:
        """The rendered worklist page."""
        return self.out_dir / "worklist.html"

    @property
    def worklist_json(self) -> Path:
        """The rendered worklist, as JSON in the page's order."""
        return self.out_dir / "worklist.json"

    def _banner(self) -> dict[str, Any]:
        return {"alerts": active_alerts(self.store), "model": self.model,
                "outbox_dead": outbox.dead_letter_count(self.store)}

    def render_worklist(self) -> list[Placed]:
        """Render the worklist page and its JSON, then rename both into place; return the rows."""
        with self._lock:
            now = self.clock()
            placed = arrange(load_rows(self.store), now, self.model.thresholds,
                             self.cfg.routine_max_wait_min)
            html = self.env.get_template("worklist.html").render(
                bands=bands(placed, self.model.thresholds), n=len(placed), now=now,
                refresh_s=self.cfg.refresh_s, max_wait_min=self.cfg.routine_max_wait_min,
                row_html=self._rows_html(placed), **self._banner())
            doc = {"rendered_at": now, "model": self.model.version,
                   "thresholds_source": self.model.thresholds_source,
                   "studies": [to_json(p) for p in placed]}
            write_atomic(self.worklist_json, json.dumps(doc, indent=1))
            write_atomic(self.worklist_html, html)
        log.debug("worklist rendered: %d active studies", len(placed))
        return placed

    def _rows_html(self, placed: list[Placed]) -> dict[int, Markup]:
        """Return each study's row HTML, rendering only rows that changed since the last
        render: a row is keyed by everything it shows (its values, its band, whether it was
        lifted, its wait as displayed), so an unchanged row is reused as it was."""
        template = self.env.get_template("worklist_row.html")
        max_wait = self.cfg.routine_max_wait_min
        fresh: dict[tuple[Any, ...], Markup] = {}
        out: dict[int, Markup] = {}
        for p in placed:
            key = (p.row, p.band, p.aged, format_wait(p.waited_s), max_wait)
            html = self._row_cache.get(key) or fresh.get(key)
            if html is None:
                html = Markup(template.render(p=p, max_wait_min=max_wait))
            fresh[key] = out[p.row.study_id] = html
        self._row_cache = fresh  # rows no longer shown are forgotten
        return out

    def mark_reported(self, study_id: int, reported: bool = True, by: str | None = None) -> bool:
        """Mark a study reported by ``by`` (it moves to history) or unread again, then
        re-render at once. Returns False when there is no such study.
        """
        if not self.store.mark_reported(study_id, reported, by):
            return False
        if self.gate is None or self.gate():
            self.render_worklist()
        return True

    def study_page(self, study_id: int) -> str | None:
        """Return the study page's HTML, or None when there is no such study.

        While a LIME explanation is computing the page reloads itself every few seconds.
        """
        detail = self._with_lime(study_detail(self.store, study_id))
        if detail is None:
            return None
        computing = any(im.lime_state == "computing" for im in detail["images"])
        return self.env.get_template("study.html").render(now=self.clock(), **detail,
                                                          refresh_s=3 if computing else 0,
                                                          **self._banner())

    def _with_lime(self, detail: dict[str, Any] | None) -> dict[str, Any] | None:
        """Return ``detail`` with each scored image's LIME state (unchanged without an explainer)."""
        if detail is None or self.explainer is None or not detail["results"]:
            return detail
        from triage.service.explain import lime_relpath

        study, version = detail["study"], detail["results"][0].version
        images = []
        for im in detail["images"]:
            if im.probability is None:
                images.append(dataclasses.replace(im, lime_state=None))
                continue
            rel = lime_relpath(study.study_uid, im.instance_id, version)
            state, reason = self.explainer.state(rel)
            images.append(dataclasses.replace(im, lime_state=state, lime_reason=reason,
                                              lime=rel if state == "ready" else None))
        return {**detail, "images": images}

    def request_lime(self, study_id: int, instance_id: int) -> str | None:
        """Ask for the LIME explanation of a scored image of the study's latest result; return
        its state, or None when the study has no such scored image (or LIME is off)."""
        if self.explainer is None:
            return None
        from triage.service.explain import Target, lime_relpath

        with self.store.read() as s:
            study = s.get(Study, study_id)
            res = s.scalar(select(Result).where(Result.study_id == study_id)
                           .order_by(Result.version.desc()).limit(1))
            if study is None or res is None:
                return None
            row = s.execute(select(ImageResult.probability, Instance.relpath,
                                   Instance.transfer_syntax)
                            .join(Instance, Instance.id == ImageResult.instance_id)
                            .where(ImageResult.result_id == res.id,
                                   ImageResult.instance_id == instance_id)).first()
            if row is None or row.probability is None:
                return None
            target = Target(instance_id, str(self.spool_root / row.relpath), row.transfer_syntax,
                            lime_relpath(study.study_uid, instance_id, res.version))
        return str(self.explainer.request(target))

    @property
    def spool_root(self) -> Path:
        """The spool that instance paths are relative to (the data directory's ``spool``)."""
        return Path(self.explainer.data_root) / "spool"

    def study_json(self, study_id: int) -> dict[str, Any] | None:
        """Return what ``/api/study/ID`` answers (the study's tier and its latest result's
        images, each with its prototype finding), or None when there is no such study."""
        detail = self._with_lime(study_detail(self.store, study_id))
        if detail is None:
            return None
        r, results = detail["row"], detail["results"]
        return {"study_id": r.study_id, "accession_number": r.accession_number,
                "state": r.state, "tier": r.tier, "probability": r.probability,
                "version": results[0].version if results else None,
                "model": f"{results[0].model_name} {results[0].model_sha256[:12]}"
                if results else None,
                "images": [im.to_json() for im in detail["images"]]}

    def history_page(self, query: str = "") -> str:
        """Return the history page's HTML: reported studies, newest report first, searchable."""
        query = query.strip()[:64]
        rows = load_rows(self.store, reported=True, accession=query or None, limit=HISTORY_LIMIT)
        return self.env.get_template("history.html").render(
            rows=rows, query=query, limit=HISTORY_LIMIT, now=self.clock(), **self._banner())
