"""The two ways ``replay`` scores studies; both yield :class:`~triage.replay.records.StudyRecord`.

- :class:`InProcessScorer` runs the daemon's own code: the same decoder pool
  and job (:func:`triage.service.worker.decoder_pool`), the same batched
  inference (:func:`triage.inference.scoring.infer`) and the same study rule
  (:func:`triage.core.tiers.study_outcome`), so its probabilities are the daemon's.
- :class:`ViaScorer` sends each study over C-STORE to a running daemon and
  reads the daemon's results back from its database (SQLite read-only, or the shared one).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Self

from dicom_io.ids import uid_hash
from triage.core import tiers
from triage.imaging.prepare import Prepared
from triage.inference.scoring import ImageScore, infer
from triage.replay.archive import ArchiveStudy
from triage.replay.records import StudyRecord
from triage.service.worker import IMAGE_META, decoder_pool

log = logging.getLogger(__name__)


def image_entry(sop_uid: str, probability: float | None, reason: str | None,
                meta: Mapping[str, Any]) -> dict[str, Any]:
    """Return the per-image part of a record: hashed SOP UID, outcome and input metadata."""
    return {"sop_hash": uid_hash(sop_uid), "probability": probability, "reason": reason,
            **{k: meta.get(k) for k in sorted(meta)}}


def make_record(study: ArchiveStudy, prepared: Sequence[Prepared], scores: Mapping[int, ImageScore],
                thresholds: dict[str, float | None], model_sha: str) -> StudyRecord:
    """Return a study's record from its prepared images and their scores (pure).

    ``prepared[i]`` is the image ``study.instances[i]``; the study's outcome is
    :func:`triage.core.tiers.study_outcome`, exactly as the daemon records it.
    """
    sops = [i.sop_instance_uid for i in study.instances]
    mine = {p.key: scores[p.key].probability for p in prepared if p.key in scores}
    reasons = {p.key: p.reason for p in prepared if p.reason}
    prob, tier = tiers.study_outcome(mine.values(), thresholds)
    state = "scored" if prob is not None else "unscored"
    by_key = {p.key: k for k, p in enumerate(prepared)}
    images = [image_entry(sops[k], mine.get(p.key), p.reason, {m: p.meta.get(m) for m in IMAGE_META})
              for k, p in enumerate(prepared)]
    return StudyRecord(study.study_uid, study.accession_number, state, prob, tier,
                       [f"image {uid_hash(sops[by_key[i]])}: {r}" for i, r in reasons.items()],
                       images, study.patient_sex, study.study_date, study.study_time, model_sha,
                       "in-process", dict(thresholds))


class InProcessScorer:
    """Scores studies with the daemon's code in a pool of ``workers`` decoder processes."""

    def __init__(self, model: Any, thresholds: dict[str, float | None], workers: int,
                 batch_size: int, guard: Any = None) -> None:
        self.model, self.thresholds, self.guard = model, thresholds, guard
        self.batch_size = batch_size
        self.model_sha = str(model.card.get("sha256", ""))
        self.pool = decoder_pool(workers, dict(model.card), guard)

    def __enter__(self) -> Self:
        self.pool.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.pool.close()

    def score(self, studies: Sequence[ArchiveStudy]) -> list[StudyRecord]:
        """Return one record per study, decoding all their images concurrently. Raises nothing
        for bad images: each becomes an unscored image with the daemon's reason."""
        jobs = [(k, inst.path, inst.transfer_syntax)
                for k, inst in enumerate(i for s in studies for i in s.instances)]
        prepared: list[Prepared] = self.pool.map(jobs)
        if self.guard is not None:
            self.guard.judge(prepared)
        scores = infer(self.model, prepared, self.batch_size)
        return records_of(studies, prepared, scores, self.thresholds, self.model_sha)


def records_of(studies: Sequence[ArchiveStudy], prepared: Sequence[Prepared],
               scores: Mapping[int, ImageScore], thresholds: dict[str, float | None],
               model_sha: str) -> list[StudyRecord]:
    """Return one record per study from the prepared images of all of them, in order (pure)."""
    out, k = [], 0
    for s in studies:
        mine = prepared[k:k + len(s.instances)]
        k += len(s.instances)
        out.append(make_record(s, mine, scores, thresholds, model_sha))
    return out


# --- through a running daemon -----------------------------------------------------

class ViaScorer:
    """Sends studies to a running daemon and reads its results from the daemon's database."""

    def __init__(self, host: str, port: int, db_path: Path | str, calling_ae: str, called_ae: str,
                 timeout_s: float = 60.0) -> None:
        self.host, self.port, self.db_path = host, port, db_path
        self.calling_ae, self.called_ae, self.timeout_s = calling_ae, called_ae, timeout_s
        self._engine: Any = None

    def send(self, study: ArchiveStudy) -> list[str]:
        """C-STORE every file of ``study``; return a reason for each file not stored.

        Raises SendError when the daemon cannot be reached.
        """
        from dicom_io.scu import SendError, outgoing, send_files

        files, problems = [], []
        for inst in study.instances:
            try:
                files.append(outgoing(inst.path))
            except SendError as e:
                problems.append(f"image {uid_hash(inst.sop_instance_uid)}: {e}")
        statuses = send_files(self.host, self.port, files, self.calling_ae, self.called_ae,
                              self.timeout_s)
        sops = {i.path: i.sop_instance_uid for i in study.instances}
        for f, st in zip(files, statuses, strict=True):
            if st not in (0x0000, 0xB000, 0xB007, 0xB006):
                problems.append(f"image {uid_hash(sops[str(f.path)])}: not stored by the daemon "
                                f"(status {'no reply' if st < 0 else f'0x{st:04X}'})")
        return problems

    def _db(self) -> Any:
        if self._engine is None:
            from sqlalchemy import create_engine

            if isinstance(self.db_path, str):  # a shared database's URL (database.url)
                from triage.store.database import make_engine

                self._engine = make_engine(self.db_path)
                return self._engine
            if not self.db_path.exists():
                raise FileNotFoundError(self.db_path)
            self._engine = create_engine(f"sqlite:///file:{self.db_path}?mode=ro&uri=true",
                                         connect_args={"timeout": 30})
        return self._engine

    def collect(self, studies: Iterable[ArchiveStudy]) -> dict[str, StudyRecord]:
        """Return records of those ``studies`` whose current version the daemon has scored."""
        from sqlalchemy import and_, select
        from sqlalchemy.orm import Session

        from triage.store import schema as db
        from triage.store.schema import ImageResult, Instance, Result, Study

        wanted = {s.study_uid: s for s in studies}
        out: dict[str, StudyRecord] = {}
        with Session(self._db()) as s:
            for chunk in _chunks(list(wanted), 500):
                rows = s.execute(select(Study, Result).join(Result, and_(
                    Result.study_id == Study.id, Result.version == Study.version)).where(
                    Study.study_uid.in_(chunk), Study.state.in_((db.SCORED, db.UNSCORED, db.FAILED))))
                for study, res in rows:
                    imgs = s.execute(select(ImageResult, Instance.sop_instance_uid).join(
                        Instance, ImageResult.instance_id == Instance.id).where(
                        ImageResult.result_id == res.id).order_by(ImageResult.id)).all()
                    out[study.study_uid] = _record_from_db(wanted[study.study_uid], study, res, imgs)
        return out

    def close(self) -> None:
        """Release the database connection."""
        if self._engine is not None:
            self._engine.dispose()


def _record_from_db(arch: ArchiveStudy, study: Any, res: Any, imgs: Sequence[Any]) -> StudyRecord:
    images = [image_entry(sop, ir.probability, ir.reason, {k: getattr(ir, k) for k in IMAGE_META})
              for ir, sop in imgs]
    return StudyRecord(arch.study_uid, study.accession_number or arch.accession_number, res.state,
                       res.probability, res.tier, list(json.loads(res.reasons or "[]")), images,
                       study.patient_sex or arch.patient_sex, study.study_date or arch.study_date,
                       study.study_time or arch.study_time, res.model_sha256, "via",
                       dict(json.loads(res.thresholds or "{}")))


def _chunks(items: list[str], n: int) -> Iterable[list[str]]:
    for i in range(0, len(items), n):
        yield items[i:i + n]
