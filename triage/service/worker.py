"""The scoring worker: complete studies in, versioned results out.

It runs in the daemon beside the SCP, never inside its handlers. Decoding and
preprocessing run in the decoder pool (:mod:`triage.inference.decoders`, the
job being :func:`triage.imaging.prepare.prepare`); inference (milliseconds)
runs here in onnxruntime batches. The database is the queue: ingest only ever
adds complete studies, so when scoring falls behind nothing blocks and the
backlog is simply the number of complete studies.

Exactly-once: a result row and the study's new state are written in one
transaction, and results are unique per (study, version). A crash before that
commit leaves the study complete, so the restarted worker scores it once.
Several daemons may share one (PostgreSQL) database: each study is claimed
before it is scored (:mod:`triage.store.leases`), the claim is renewed while
the work goes on, and the result is written only while the claim holds, so a
daemon killed mid-scoring loses its claims when they run out and another daemon
scores those studies, once. The
same transaction plans what goes back to the PACS (:func:`triage.store.outbox.plan`:
the SR and overlays with their UIDs, one outbox row per destination), so a
result is never recorded without its sends, nor a send without its result.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select

from dicom_io.ids import uid_hash, uid_key
from triage.config import Config
from triage.core import tiers
from triage.core.retry import backoff_s
from triage.imaging import prepare
from triage.imaging.prepare import Prepared
from triage.inference import prototypes as protos_mod
from triage.inference.decoders import DecoderPool, PoolClosed
from triage.inference.guard import Guard
from triage.inference.model import Model
from triage.inference.prototypes import Prototypes
from triage.inference.scoring import ImageScore, infer
from triage.profile import SiteProfile, applied_thresholds, thresholds_source
from triage.store import leases, outbox
from triage.store import schema as db
from triage.store.database import OUTAGE_BACKOFF_MAX_S, unavailable, why_unavailable
from triage.store.schema import ImageResult, Instance, Result, Study, StudyEvent

log = logging.getLogger(__name__)

# Image metadata kept per scored image (what the drift watch and replay compare).
IMAGE_META = ("manufacturer", "photometric", "bits_stored", "rows", "columns", "pixel_spacing",
              "view_position", "transfer_syntax", "patient_age_years")


@dataclass(frozen=True)
class Job:
    """One image of a study to score: instance id, spool path, transfer syntax, SOP UID."""

    instance_id: int
    path: str
    transfer_syntax: str
    sop_uid: str


def decoder_pool(processes: int, card: dict[str, Any], guard: Guard | None = None,
                 timeout_s: float | None = None) -> DecoderPool:
    """Return the decoder pool the daemon and replay use: :func:`prepare.prepare` per image
    (with the input guard's input too when ``guard`` needs one), each image stopped after
    ``timeout_s``."""
    return DecoderPool(processes, prepare.prepare, prepare.unreadable, prepare.init,
                       (card, guard.input_card if guard is not None else None), timeout_s=timeout_s)


def failure_words(e: BaseException) -> str:
    """What went wrong, in words for the worklist (never an exception class name)."""
    if isinstance(e, OSError):
        what = e.strerror or "input/output error"
        return f"could not write the study's files ({what.lower()})"
    return "an internal error in scoring (the daemon's log has the details)"


class ScoringWorker:
    """Scores complete studies in a background thread until stopped."""

    def __init__(self, cfg: Config, store: Any, model: Model, data_root: Path,
                 pool: DecoderPool | None = None, profile: SiteProfile | None = None,
                 guard: Guard | None = None, node: str | None = None,
                 prototypes: Prototypes | None = None) -> None:
        self.cfg, self.store, self.model = cfg, store, model
        # Few-shot prototypes (model.prototypes): an extra finding per image, never the tier.
        self.prototypes = prototypes
        # Our name in study claims (several daemons may share the database).
        self.node = node or leases.node_id()
        self.profile, self.guard = profile, guard
        self.data_root = data_root
        self.heatmap_dir = data_root / "heatmaps"
        self.thresholds = applied_thresholds(model.thresholds, profile, cfg.worker.tier_overrides)
        self.model_name = str(model.card.get("name", Path(getattr(model, "path", "model")).stem))
        self.model_sha = str(model.card.get("sha256", ""))
        self.thresholds_source = thresholds_source(profile, self.model_name, self.model_sha,
                                                   tuple(cfg.worker.tier_overrides))
        # {kind: destination labels}: what each result sends where (empty: nothing).
        self.wants = {kind: [d.label for d in cfg.results.wants(kind)]
                      for kind in (db.SR, db.OVERLAY, *db.MESSAGE_KINDS)}
        self.pool = pool or decoder_pool(cfg.worker.processes, dict(model.card), guard,
                                         cfg.worker.decode_timeout_s)
        # Called with the result id after each result is committed (the daemon
        # schedules a worklist render); it must return quickly.
        self.on_result: Callable[[int], Any] | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()  # set: look for complete studies now
        self._renewing = threading.Event()  # set: stop renewing claims
        self._thread: threading.Thread | None = None
        self._renewer: threading.Thread | None = None
        self._held: set[int] = set()  # studies claimed and in hand
        self._held_lock = threading.Lock()

    def start(self) -> None:
        """Start the worker thread (it starts the decoder pool) and the thread that renews
        its claims. Returns at once: the pool's first start imports torch and MONAI."""
        self._thread = threading.Thread(target=self._run, name="scoring-worker", daemon=True)
        self._thread.start()
        self._renewer = threading.Thread(target=self._renew_claims, name="claim-renewer",
                                         daemon=True)
        self._renewer.start()

    @property
    def alive(self) -> bool:
        """Whether the worker thread is running and has not been asked to stop."""
        return self._thread is not None and self._thread.is_alive() and not self._stop.is_set()

    def stop(self) -> None:
        """Stop after the studies in hand; shut the pool down."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=120)
        # Renewed until the studies in hand are settled, so that no other daemon takes
        # them over while this one is still finishing them.
        self._renewing.set()
        if self._renewer is not None:
            self._renewer.join(timeout=30)
        # Every study in hand is settled: nothing the decoders do now is waited for.
        self.pool.close(kill=True)

    def wake(self) -> None:
        """Look for complete studies now (the completion sweep has just marked some)."""
        self._wake.set()

    def _run(self) -> None:
        """Keep up to ``worker.max_studies_in_flight`` studies in hand, each scored in its own
        thread (its images share the decoder processes with the others') and recorded as soon
        as it is done: one slow study holds back nobody else's result."""
        try:
            self.pool.start()
        except Exception:  # the first map starts it again, and says why
            log.exception("could not start the decoder processes")
        slots = self.cfg.worker.max_studies_in_flight
        poll = self.cfg.worker.poll_interval_s
        running: dict[Future[Any], int] = {}
        failures = 0  # claims failed in a row
        with ThreadPoolExecutor(slots, thread_name_prefix="score-study") as studies:
            while not self._stop.is_set():
                self._wake.clear()
                wait_s = poll
                if len(running) < slots:
                    try:
                        for sid in self.claim(slots - len(running)):
                            if sid not in running.values():  # re-claimed after a lapsed renewal
                                running[studies.submit(self._score_one, sid)] = sid
                        if failures:
                            log.info("claiming studies works again after %d failure(s)", failures)
                        failures = 0
                    except Exception as e:
                        failures += 1
                        wait_s = backoff_s(failures, poll, max(poll, OUTAGE_BACKOFF_MAX_S))
                        if unavailable(e):
                            log.warning("cannot claim studies, the database is unavailable "
                                        "(%s); next try in %.1f s", why_unavailable(e), wait_s)
                        else:
                            log.exception("claiming studies failed; next try in %.1f s", wait_s)
                if running:
                    done, _ = wait(list(running), timeout=wait_s, return_when=FIRST_COMPLETED)
                    for f in done:
                        running.pop(f)
                else:  # a wake-up (studies completed: the database answers) ends a backoff
                    self._wake.wait(wait_s)
            wait(list(running))  # the studies in hand are finished before the worker stops

    def _score_one(self, study_id: int) -> None:
        """Score one claimed study and let go of its claim if it was not settled."""
        try:
            self.score_isolated([study_id])
        except PoolClosed:  # stopping: the study stays complete and is scored after a restart
            log.info("study #%d left unscored: the daemon is stopping", study_id)
        except Exception as e:
            if unavailable(e):  # not the study's fault: it stays complete, no attempt counted
                log.warning("study #%d left for later: the database is unavailable (%s)",
                            study_id, why_unavailable(e))
                return
            log.exception("scoring study #%d failed; it will be retried", study_id)
        finally:
            self._let_go([study_id])

    def claim(self, limit: int) -> list[int]:
        """Claim up to ``limit`` complete studies waiting for a result (and not waiting out a
        retry backoff, nor claimed by a live daemon), oldest completion first; return their ids.
        They stay ours, renewed, until :meth:`score_isolated` is done with them."""
        ids = leases.claim(self.store, self.node, limit, self.cfg.worker.claim_lease_s)
        with self._held_lock:
            self._held.update(ids)
        return ids

    def _let_go(self, ids: list[int]) -> None:
        """Release claims the round did not settle (a changed study, a crashed round)."""
        with self._held_lock:
            ids = [i for i in ids if i in self._held]  # a settled study's claim is cleared
            self._held.difference_update(ids)
        if not ids:
            return
        try:
            leases.release(self.store, self.node, ids)
        except Exception as e:  # they run out by themselves
            if unavailable(e):
                log.warning("could not release %d study claim(s), the database is unavailable; "
                            "they run out by themselves", len(ids))
            else:
                log.exception("could not release study claims")

    def _settled(self, study_id: int) -> None:
        """The study's claim was cleared with its result or failure (committed): stop
        renewing it."""
        with self._held_lock:
            self._held.discard(study_id)

    def _renew_claims(self) -> None:
        """Renew the claims in hand every third of their lease, until stopped."""
        lease = self.cfg.worker.claim_lease_s
        while not self._renewing.wait(lease / 3):
            with self._held_lock:
                held = sorted(self._held)
            try:
                kept = leases.renew(self.store, self.node, held, lease)
            except Exception as e:
                if unavailable(e):
                    log.warning("could not renew %d study claim(s), the database is "
                                "unavailable (%s)", len(held), why_unavailable(e))
                else:
                    log.exception("could not renew study claims")
                continue
            if len(kept) < len(held):
                log.warning("%d study claim(s) were lost (ran out or the study changed); "
                            "their results will not be recorded here", len(held) - len(kept))

    def score_isolated(self, study_ids: list[int]) -> dict[int, int | None]:
        """Score studies together; when that fails, each alone, so that one study that cannot
        be scored costs only its own attempt (see :meth:`fail`)."""
        try:
            return self.score_studies(study_ids)
        except PoolClosed:
            raise  # not the studies' fault: nothing is counted against them
        except Exception as e:
            if unavailable(e):
                raise  # nor is the database's absence
            if len(study_ids) == 1:
                self.fail(study_ids[0], None, e)
                return {study_ids[0]: None}
            log.warning("scoring %d studies together failed; scoring each alone", len(study_ids))
        out: dict[int, int | None] = {}
        for sid in study_ids:
            try:
                out.update(self.score_studies([sid]))
            except PoolClosed:
                raise
            except Exception as e:
                if unavailable(e):
                    raise
                self.fail(sid, None, e)
                out[sid] = None
        return out

    def fail(self, study_id: int, version: int | None, e: BaseException) -> None:
        """Count a failed scoring attempt: retry later with backoff, or, once
        ``worker.max_attempts`` have failed, mark the study failed with the reason."""
        log.error("scoring study #%d failed: %s", study_id, failure_words(e),
                  exc_info=(type(e), e, e.__traceback__))
        w = self.cfg.worker
        now = time.time()
        with self.store.write() as s:
            study = s.get(Study, study_id, with_for_update=True)
            if study is None or study.state != db.COMPLETE or (
                    version is not None and study.version != version):
                return  # reopened meanwhile: the new version starts afresh
            if not self._ours(study):
                return
            study.claimed_by = study.claimed_until = None
            study.attempts += 1
            study.failure = failure_words(e)
            if study.attempts >= w.max_attempts:
                study.state, study.retry_at = db.FAILED, None
                detail = f"scoring failed {study.attempts} times; gave up: {study.failure}"
            else:
                delay = w.retry_backoff_s * 2 ** (study.attempts - 1)
                study.retry_at = now + delay
                detail = (f"scoring attempt {study.attempts} of {w.max_attempts} failed, "
                          f"next in {delay:g} s: {study.failure}")
            s.add(StudyEvent(study_id=study_id, at=now, kind="failed", detail=detail))
            final = study.state == db.FAILED
        self._settled(study_id)  # committed: the claim is cleared
        (log.error if final else log.warning)("study #%d: %s", study_id, detail)
        if final and self.on_result is not None:
            try:
                self.on_result(0)  # shows on the worklist at the next render
            except Exception:
                log.exception("result listener failed")

    def _ours(self, study: Study) -> bool:
        """Whether this daemon may settle ``study``: nobody else claims it now. (An expired
        claim of ours that nobody took is still ours: the work is done, the result is one.)"""
        if study.claimed_by in (None, self.node):
            return True
        log.warning("study #%d is now claimed by %s; its result is theirs to record",
                    study.id, study.claimed_by)
        return False

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
        jobs = [j for _, _, js in work.values() for j in js]
        prepared = {p.key: p for p in self.pool.map(
            [(j.instance_id, j.path, j.transfer_syntax) for j in jobs])}
        t_decode = time.perf_counter()
        if self.guard is not None:
            self.guard.judge(list(prepared.values()))
        scores = infer(self.model, list(prepared.values()), self.cfg.worker.batch_size,
                       embeddings=self.prototypes is not None)
        scores = protos_mod.annotate(self.prototypes, scores)  # the finding; probabilities kept
        t_infer = time.perf_counter()
        out: dict[int, int | None] = {}
        for sid, (version, study_uid, js) in work.items():
            th = time.perf_counter()
            mine = [prepared[j.instance_id] for j in js]
            try:
                files = self._heatmaps(study_uid, version, mine, scores)
                timings = {"decode_s": round(t_decode - t0, 4),
                           "infer_s": round(t_infer - t_decode, 4),
                           "heatmap_s": round(time.perf_counter() - th, 4),
                           "decode_cpu_s": round(sum(p.seconds for p in mine), 4),
                           "batch_studies": len(work)}
                out[sid] = self._record(sid, version, mine, scores, files, timings, js)
            except Exception as e:  # this study's failure must not cost the others theirs
                if unavailable(e):
                    raise  # nothing was recorded; every study stays complete for later
                self.fail(sid, version, e)
                out[sid] = None
        return out

    def _snapshot(self, study_ids: list[int]) -> dict[int, tuple[int, str, list[Job]]]:
        """Return {study id: (version, study uid, its images)} for studies still complete."""
        out = {}
        with self.store.read() as s:
            for sid in study_ids:
                study = s.get(Study, sid)
                if study is None or study.state != db.COMPLETE:
                    continue
                jobs = [Job(i.id, str(self.spool_root / i.relpath), i.transfer_syntax,
                            i.sop_instance_uid)
                        for i in s.scalars(select(Instance).where(Instance.study_id == sid))]
                out[sid] = (study.version, study.study_uid, jobs)
        return out

    @property
    def spool_root(self) -> Path:
        """The spool root that instance relpaths are relative to."""
        return self.data_root / "spool"

    def _heatmaps(self, study_uid: str, version: int, images: list[Prepared],
                  scores: dict[int, ImageScore]) -> dict[int, str]:
        if not self.cfg.worker.heatmaps:
            return {}
        from triage.imaging.heatmap import write_overlay

        out: dict[int, str] = {}
        key = uid_key(study_uid)
        for p in images:
            score = scores.get(p.key)
            if score is None or score.cam is None or p.display is None:
                continue
            path = self.heatmap_dir / key[:2] / key / f"i{p.key}_v{version}.png"
            write_overlay(p.display, score.cam, path)
            out[p.key] = path.relative_to(self.data_root).as_posix()
        return out

    def _record(self, study_id: int, version: int, images: list[Prepared],
                scores: dict[int, ImageScore], files: dict[int, str], timings: dict[str, float],
                jobs: list[Job]) -> int | None:
        reasons = {p.key: p.reason for p in images if p.reason}
        probs = {p.key: scores[p.key].probability for p in images if p.key in scores}
        p, tier = tiers.study_outcome(probs.values(), self.thresholds)
        state = db.SCORED if p is not None else db.UNSCORED
        uid_of = {j.instance_id: j.sop_uid for j in jobs}
        reason_list = [f"image {uid_hash(uid_of[i])}: {r}" for i, r in reasons.items()]
        now = time.time()
        with self.store.write() as s:
            # The row lock orders us after any other daemon settling this study.
            study = s.get(Study, study_id, with_for_update=True)
            if study is None or study.state != db.COMPLETE or study.version != version:
                return None  # reopened meanwhile: the new version will be scored
            if not self._ours(study):
                return None
            if s.scalar(select(Result.id).where(Result.study_id == study_id,
                                                Result.version == version)) is not None:
                return None
            prev = s.scalar(select(Result).where(Result.study_id == study_id)
                            .order_by(Result.version.desc()).limit(1))
            change = tiers.change(prev.tier if prev else None, tier, self.thresholds)
            res = Result(study_id=study_id, version=version, state=state, probability=p, tier=tier,
                         previous_tier=prev.tier if prev else None, tier_change=change,
                         reasons=json.dumps(reason_list), model_name=self.model_name,
                         model_sha256=self.model_sha, thresholds=json.dumps(self.thresholds),
                         thresholds_source=self.thresholds_source,
                         timings=json.dumps(timings), created_at=now)
            s.add(res)
            rows = [ImageResult(result=res, instance_id=im.key, probability=probs.get(im.key),
                                reason=im.reason, heatmap_path=files.get(im.key), scored_at=now,
                                **{k: im.meta.get(k) for k in IMAGE_META},
                                **protos_mod.columns(scores.get(im.key)))
                    for im in sorted(images, key=lambda im: im.key)]
            s.add_all(rows)
            outbox.plan(s, res, rows, self.wants, now)
            study.state = state
            study.attempts, study.retry_at, study.failure = 0, None, None
            study.claimed_by = study.claimed_until = None
            s.flush()
            rid = res.id
        self._settled(study_id)  # committed: the claim is cleared
        self._log(study_id, version, state, p, tier, change, reasons)
        if self.on_result is not None:
            try:
                self.on_result(rid)
            except Exception:  # a listener must never stop scoring
                log.exception("result listener failed")
        return rid

    @staticmethod
    def _log(study_id: int, version: int, state: str, p: float | None, tier: str,
             change: str | None, reasons: dict[int, str]) -> None:
        msg = "study #%d v%d %s: p=%s tier=%s%s%s"
        args = (study_id, version, state, "-" if p is None else f"{p:.3f}", tier,
                f" ({change} from previous version)" if change else "",
                f"; {len(reasons)} image(s) unscored" if reasons else "")
        (log.warning if change == "fall" else log.info)(msg, *args)
