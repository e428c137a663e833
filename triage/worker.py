"""The scoring worker: complete studies in, versioned results out.

It runs in the daemon beside the SCP, never inside its handlers. Decoding and
preprocessing (about 0.5 s of CPU for a JPEG 2000 radiograph) run in a pool of
processes; inference (milliseconds) runs here in batches. The database is the
queue: ingest only ever adds complete studies, so when scoring falls behind
nothing blocks and the backlog is simply the number of complete studies.

Exactly-once: a result row and the study's new state are written in one
transaction, and results are unique per (study, version). A crash before that
commit leaves the study complete, so the restarted worker scores it once.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import threading
import time
import typing
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select

from dicom_io.ids import uid_hash, uid_key
from triage import db
from triage.config import Config
from triage.db import ImageResult, Instance, Result, Study
from triage.errors import UnscorableError
from triage.scoring import ROUTINE, UNSCORED, priority

log = logging.getLogger(__name__)

DISPLAY_PX = 512
_META_KEYS = {"Manufacturer": "manufacturer", "PhotometricInterpretation": "photometric",
              "BitsStored": "bits_stored", "Rows": "rows", "Columns": "columns",
              "PixelSpacing": "pixel_spacing", "ViewPosition": "view_position"}


@dataclass
class Decoded:
    """What a decoder process returns for one image."""

    instance_id: int
    meta: dict[str, Any] = field(default_factory=dict)
    x: np.ndarray | None = None  # the network input (C, S, S)
    display: np.ndarray | None = None  # grey [0, 1], at most DISPLAY_PX on a side
    reason: str | None = None
    seconds: float = 0.0


# --- the decoder process side --------------------------------------------

_DECODER: dict[str, Any] = {}


def _init_decoder(card: dict[str, Any], daemon_pid: int | None = None) -> None:
    import triage.compat  # noqa: F401  (before monai)

    if daemon_pid is not None:
        threading.Thread(target=_exit_with, args=(daemon_pid,), name="orphan-watch",
                         daemon=True).start()
    from triage.preprocess import InputSpec, build_transforms, preprocess_of

    _DECODER["pre"] = preprocess_of(card)
    _DECODER["chain"] = build_transforms(_DECODER["pre"], InputSpec.from_dict(card["input"]), train=False)


def _exit_with(daemon_pid: int, interval_s: float = 1.0) -> None:
    """Exit this decoder process once the daemon is gone (after a kill -9 nobody
    would tell it, and an orphaned decoder holds hundreds of MB)."""
    import os

    while True:
        time.sleep(interval_s)
        try:
            os.kill(daemon_pid, 0)
        except ProcessLookupError:
            os._exit(0)
        except PermissionError:
            pass  # the pid exists under another user: the daemon is alive


def read_metadata(path: Path, transfer_syntax: str) -> dict[str, Any]:
    """Return the drift-watch metadata of a DICOM file (values as plain types, None if absent)."""
    from pydicom import dcmread

    try:
        ds = dcmread(path, stop_before_pixels=True, force=True)
    except Exception:
        return {"transfer_syntax": transfer_syntax}
    meta: dict[str, Any] = {"transfer_syntax": transfer_syntax}
    for kw, name in _META_KEYS.items():
        v = ds.get(kw)
        if kw == "PixelSpacing" and v is not None:
            v = "\\".join(str(x) for x in v)
        elif v is not None and kw in ("BitsStored", "Rows", "Columns"):
            v = int(v)
        elif v is not None:
            v = str(v).strip()[:64] or None
        meta[name] = v
    meta["patient_age_years"] = age_years(ds.get("PatientAge"))
    return meta


def age_years(value: Any) -> float | None:
    """Return a DICOM Age String ('045Y', '006M', '010W', '003D') in years, or None."""
    s = str(value or "").strip().upper()
    units = {"Y": 1.0, "M": 12.0, "W": 52.1775, "D": 365.25}
    if len(s) != 4 or not s[:3].isdigit() or s[3] not in units:
        return None
    return int(s[:3]) / units[s[3]]


def decode_one(instance_id: int, path: str, transfer_syntax: str) -> Decoded:
    """Gate, decode and preprocess one image (runs in a decoder process). Raises nothing."""
    from PIL import Image

    from triage.preprocess import load_any

    t0 = time.perf_counter()
    out = Decoded(instance_id, meta=read_metadata(Path(path), transfer_syntax))
    try:
        grey = load_any(path, _DECODER["pre"])
        out.x = np.asarray(_DECODER["chain"](grey), dtype=np.float32)
        im = Image.fromarray((np.clip(grey, 0, 1) * 255).astype(np.uint8))
        im.thumbnail((DISPLAY_PX, DISPLAY_PX))
        out.display = np.asarray(im, dtype=np.float32) / 255.0
    except UnscorableError as e:
        out.reason = e.reason
    except Exception as e:  # a bad file must never stop the worker
        out.reason = f"unexpected error while decoding: {type(e).__name__}"
    out.seconds = time.perf_counter() - t0
    return out


# --- the daemon side -------------------------------------------------------

TIER_RANK = {UNSCORED: 0, ROUTINE: 1}


def tier_rank(tier: str, thresholds: dict[str, float | None]) -> int:
    """Rank tiers for rise/fall: unscored < routine < operating points by threshold."""
    if tier in TIER_RANK:
        return TIER_RANK[tier]
    order = sorted((t, n) for n, t in thresholds.items() if t is not None)
    return 2 + [n for _, n in order].index(tier) if tier in [n for _, n in order] else 1


def study_outcome(probs: dict[int, float], reasons: dict[int, str],
                  thresholds: dict[str, float | None]) -> tuple[str, float | None, str]:
    """Return (state, study probability, tier): the maximum over eligible images (pure)."""
    if not probs:
        return db.UNSCORED, None, UNSCORED
    p = max(probs.values())
    return db.SCORED, p, priority(p, thresholds)


class ScoringWorker:
    """Scores complete studies in a background thread until stopped."""

    def __init__(self, cfg: Config, store: Any, model: Any, data_root: Path,
                 pool: Executor | None = None) -> None:
        self.cfg, self.store, self.model = cfg, store, model
        self.data_root = data_root
        self.heatmap_dir = data_root / "heatmaps"
        self.thresholds: dict[str, float | None] = {**model.thresholds, **cfg.worker.tier_overrides}
        self.model_name = str(model.card.get("name", Path(getattr(model, "path", "model")).stem))
        self.model_sha = str(model.card.get("sha256", ""))
        self._pool = pool
        # Called with the result id after each result is committed (the daemon
        # schedules a worklist render); it must return quickly.
        self.on_result: Callable[[int], Any] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the decoder pool and the worker thread."""
        if self._pool is None:
            self._pool = self._new_pool()
        self._thread = threading.Thread(target=self._run, name="scoring-worker", daemon=True)
        self._thread.start()

    def _new_pool(self) -> Executor:
        # Decoders run in processes: besides using the cores, a native decoder that
        # aborts on a corrupt stream (GDCM does) then kills a helper, not the daemon.
        # forkserver: never fork a process that holds the listener's threads and sockets.
        ctx = multiprocessing.get_context("forkserver")
        return ProcessPoolExecutor(self.cfg.worker.processes, mp_context=ctx,
                                   initializer=_init_decoder,
                                   initargs=(self.model.card, os.getpid()))

    def _restart_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = self._new_pool()

    def _decode_all(self, insts: list[tuple[int, str, str, str]]) -> list[Decoded]:
        """Decode images concurrently in the pool; isolate any image that kills a decoder."""
        assert self._pool is not None
        try:
            futures = [self._pool.submit(decode_one, iid, path, ts) for iid, path, ts, _ in insts]
            return [f.result() for f in futures]
        except BrokenProcessPool:
            log.error("a decoder process died; decoding these images one at a time")
        out = []
        for iid, path, ts, uid in insts:
            self._restart_pool()
            try:
                out.append(self._pool.submit(decode_one, iid, path, ts).result())
            except BrokenProcessPool:
                log.error("the decoder crashed on image %s", uid_hash(uid))
                out.append(Decoded(iid, meta=read_metadata(Path(path), ts),
                                   reason="pixel data crashed the decoder"))
        self._restart_pool()
        return out

    def stop(self) -> None:
        """Stop after the study in hand; shut the pool down."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=120)
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                ids = self.pending(self.cfg.worker.max_studies_in_flight)
                if ids:
                    self.score_studies(ids)
            except Exception:
                log.exception("scoring worker iteration failed; retrying")
                ids = []
            if not ids:
                self._stop.wait(self.cfg.worker.poll_interval_s)

    def pending(self, limit: int) -> list[int]:
        """Return ids of complete studies waiting for a result, oldest completion first."""
        with self.store.read() as s:
            return list(s.scalars(select(Study.id).where(Study.state == db.COMPLETE)
                                  .order_by(Study.completed_at, Study.id).limit(limit)))

    def score_study(self, study_id: int) -> int | None:
        """Score one complete study; returns its result id or None (see :meth:`score_studies`)."""
        return self.score_studies([study_id]).get(study_id)

    def score_studies(self, study_ids: list[int]) -> dict[int, int | None]:
        """Score several complete studies together and record a result for each.

        Their images are decoded concurrently in the pool and inferred in shared
        batches. Returns {study id: result id, or None when the study changed
        (reopened) meanwhile or was already scored}.
        """
        t0 = time.perf_counter()
        work = self._snapshot(study_ids)
        all_insts = [i for _, _, insts in work.values() for i in insts]
        decoded = {d.instance_id: d for d in self._decode_all(all_insts)}
        t_decode = time.perf_counter()
        probs, cams = self._infer([d for d in decoded.values() if d.x is not None])
        t_infer = time.perf_counter()
        out: dict[int, int | None] = {}
        for sid, (version, study_uid, insts) in work.items():
            th = time.perf_counter()
            mine = [decoded[i[0]] for i in insts]
            files = self._heatmaps(study_uid, version, mine, cams)
            timings = {"decode_s": round(t_decode - t0, 4), "infer_s": round(t_infer - t_decode, 4),
                       "heatmap_s": round(time.perf_counter() - th, 4),
                       "decode_cpu_s": round(sum(d.seconds for d in mine), 4),
                       "batch_studies": len(work)}
            out[sid] = self._record(sid, version, mine, probs, files, timings, insts)
        return out

    def _snapshot(self, study_ids: list[int]) -> dict[int, tuple[int, str, list[tuple[int, str, str, str]]]]:
        """Return {study id: (version, study uid, [(instance id, path, syntax, sop uid)])}."""
        out = {}
        with self.store.read() as s:
            for sid in study_ids:
                study = s.get(Study, sid)
                if study is None or study.state != db.COMPLETE:
                    continue
                insts = [(i.id, str(self.store_root / i.relpath), i.transfer_syntax, i.sop_instance_uid)
                         for i in s.scalars(select(Instance).where(Instance.study_id == sid))]
                out[sid] = (study.version, study.study_uid, insts)
        return out

    @property
    def store_root(self) -> Path:
        """The spool root that instance relpaths are relative to."""
        return self.data_root / "spool"

    def _infer(self, ready: list[Decoded]) -> tuple[dict[int, float], dict[int, np.ndarray]]:
        probs: dict[int, float] = {}
        cams: dict[int, np.ndarray] = {}
        bs = self.cfg.worker.batch_size
        for i in range(0, len(ready), bs):
            chunk = ready[i:i + bs]
            p, cam = self.model.predict(np.stack([typing.cast(np.ndarray, d.x) for d in chunk]))
            for j, d in enumerate(chunk):
                probs[d.instance_id] = float(p[j])
                if cam is not None:
                    cams[d.instance_id] = np.asarray(cam[j])
        return probs, cams

    def _heatmaps(self, study_uid: str, version: int, decoded: list[Decoded],
                  cams: dict[int, np.ndarray]) -> dict[int, tuple[str, str]]:
        if not self.cfg.worker.heatmaps:
            return {}
        from triage.heatmaps import write_overlay
        from triage.scoring import heatmap

        out: dict[int, tuple[str, str]] = {}
        key = uid_key(study_uid)
        for d in decoded:
            if d.instance_id not in cams or d.display is None:
                continue
            heat = heatmap(cams[d.instance_id], d.display.shape)
            path = self.heatmap_dir / key[:2] / key / f"i{d.instance_id}_v{version}.png"
            h, t = write_overlay(d.display, heat, path)
            out[d.instance_id] = (h.relative_to(self.data_root).as_posix(),
                                  t.relative_to(self.data_root).as_posix())
        return out

    def _record(self, study_id: int, version: int, decoded: list[Decoded], probs: dict[int, float],
                files: dict[int, tuple[str, str]], timings: dict[str, float],
                insts: list[tuple[int, str, str, str]]) -> int | None:
        reasons = {d.instance_id: d.reason for d in decoded if d.reason}
        probs = {d.instance_id: probs[d.instance_id] for d in decoded if d.instance_id in probs}
        state, p, tier = study_outcome(probs, reasons, self.thresholds)
        uid_of = {iid: uid for iid, _, _, uid in insts}
        reason_list = [f"image {uid_hash(uid_of[i])}: {r}" for i, r in reasons.items()]
        now = time.time()
        with self.store.write() as s:
            study = s.get(Study, study_id)
            if study is None or study.state != db.COMPLETE or study.version != version:
                return None  # reopened meanwhile: the new version will be scored
            if s.scalar(select(Result.id).where(Result.study_id == study_id,
                                                Result.version == version)) is not None:
                return None
            prev = s.scalar(select(Result).where(Result.study_id == study_id)
                            .order_by(Result.version.desc()).limit(1))
            change = self._change(prev.tier if prev else None, tier)
            res = Result(study_id=study_id, version=version, state=state, probability=p, tier=tier,
                         previous_tier=prev.tier if prev else None, tier_change=change,
                         reasons=json.dumps(reason_list), model_name=self.model_name,
                         model_sha256=self.model_sha, thresholds=json.dumps(self.thresholds),
                         timings=json.dumps(timings), created_at=now)
            s.add(res)
            for d in decoded:
                hp, tp = files.get(d.instance_id, (None, None))
                s.add(ImageResult(result=res, instance_id=d.instance_id,
                                  probability=probs.get(d.instance_id), reason=d.reason,
                                  heatmap_path=hp, thumb_path=tp, scored_at=now,
                                  **{k: d.meta.get(k) for k in (*_META_KEYS.values(), "transfer_syntax",
                                                                "patient_age_years")}))
            study.state = state
            for inst in s.scalars(select(Instance).where(Instance.study_id == study_id)):
                inst.state = "processed"
            s.flush()
            rid = res.id
        self._log(study_id, version, state, p, tier, change, reasons)
        if self.on_result is not None:
            try:
                self.on_result(rid)
            except Exception:  # a listener must never stop scoring
                log.exception("result listener failed")
        return rid

    def _change(self, before: str | None, after: str) -> str | None:
        if before is None or before == after:
            return None
        up = tier_rank(after, self.thresholds) > tier_rank(before, self.thresholds)
        return "rise" if up else "fall"

    @staticmethod
    def _log(study_id: int, version: int, state: str, p: float | None, tier: str,
             change: str | None, reasons: dict[int, str]) -> None:
        msg = "study #%d v%d %s: p=%s tier=%s%s%s"
        args = (study_id, version, state, "-" if p is None else f"{p:.3f}", tier,
                f" ({change} from previous version)" if change else "",
                f"; {len(reasons)} image(s) unscored" if reasons else "")
        (log.warning if change == "fall" else log.info)(msg, *args)
