"""The application's record of instances and studies (the SCP's recorder).

All writes of one daemon go through one lock: SQLite has a single writer, and
short transactions under one lock keep association threads from tripping over
``database is locked``. Reads use their own sessions.

On PostgreSQL several daemons write at once, and instances of one study may
arrive at two of them together. Every change to a study locks its row first
(``SELECT … FOR UPDATE``; the row is created with ``ON CONFLICT DO NOTHING``),
so the two recordings happen one after the other, both are kept, and the
study's counts lose no update. A transaction the server aborts as a deadlock
(two studies merged in opposite directions at once) or that loses a race on a
unique key is run again (:data:`RETRIES`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import func, select, text, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, IntegrityError, NoResultFound
from sqlalchemy.orm import Session, sessionmaker

from dicom_io import store_status
from dicom_io.header import Header, read_file_header
from dicom_io.ids import uid_hash
from dicom_io.scp import ReceivedInstance
from dicom_io.spool import Spool, SpoolEntry
from dicom_io.store_status import Refusal
from triage.store import schema as db
from triage.store.database import insert_missing, unavailable, why_unavailable
from triage.store.schema import Alert, Instance, Rejection, Replacement, Result, Study, StudyEvent

log = logging.getLogger(__name__)

# Who "reported" a study the daemon itself took off the worklist.
SYSTEM_USER = "triage"
FIELD_WORDS = {"accession_number": "accession number", "patient_name": "patient name",
               "patient_id": "patient ID", "patient_sex": "sex", "patient_age": "age",
               "study_date": "study date", "study_time": "study time",
               "study_description": "study description", "modality": "modality"}


# Times a recording is tried when the database aborts it for a race another daemon won.
RETRIES = 5
# PostgreSQL's codes for "deadlock detected" and "could not serialize access".
_RETRY_CODES = ("40P01", "40001")


def _raced(e: DBAPIError) -> bool:
    """Whether ``e`` is a lost race that a second try resolves."""
    code = getattr(e.orig, "sqlstate", None) or getattr(e.orig, "pgcode", None)
    return isinstance(e, IntegrityError) or code in _RETRY_CODES


def _name(study: Study) -> str:
    """A study as people name it: its accession number, or a short hash of its UID."""
    return study.accession_number or f"#{study.id} ({uid_hash(study.study_uid)})"


class Store:
    """Records instances, studies and refusals; answers the daemon's questions."""

    def __init__(self, engine: Engine, clock: Callable[[], float] = time.time) -> None:
        self.engine = engine
        self.clock = clock
        self._lock = threading.Lock()
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A short write transaction under the single-writer lock."""
        with self._lock, self._sessions.begin() as session:
            yield session

    def read(self) -> Session:
        """Return a new session for reading (caller closes it)."""
        return self._sessions()

    def record_instance(self, inst: ReceivedInstance) -> str:
        """Record a durable instance and group it into its study.

        Returns 'stored' (new), 'duplicate' (byte-identical resend: nothing
        changes), 'replaced' (same SOP Instance UID, different bytes: the new
        file becomes current, the replacement is recorded, the study reopens) or
        'moved' (same SOP Instance UID under another StudyInstanceUID, as after a
        PACS merges or splits studies: the instance joins the new study, and the
        old one is rescored without it, or, left empty, leaves the worklist with
        a note). The latest instance's demographics win; the values they replace
        stay in the study's history.

        Raises Refusal with ``DB_UNAVAILABLE`` when the database cannot be reached (the
        instance stays in the spool; a resend, or the next start's reconcile, records it).
        """
        try:
            return self._record_with_retries(inst)
        except DBAPIError as e:
            if not unavailable(e):
                raise
            raise Refusal(store_status.DB_UNAVAILABLE,
                          f"the database is unavailable ({why_unavailable(e)})") from e

    def _record_with_retries(self, inst: ReceivedInstance) -> str:
        for attempt in range(1, RETRIES + 1):
            try:
                return self._record(inst)
            except NoResultFound:
                # The study row vanished while we waited for its lock (another daemon's
                # retention purge): record again, into a study created afresh.
                if attempt == RETRIES:
                    raise
            except DBAPIError as e:
                if attempt == RETRIES or not _raced(e):
                    raise
                log.info("recording instance %s raced another writer; trying again",
                         uid_hash(inst.header.sop_instance_uid))
        raise AssertionError("unreachable")  # pragma: no cover

    def _record(self, inst: ReceivedInstance) -> str:
        now = self.clock()
        h = inst.header
        with self.write() as s:
            existing = s.scalar(select(Instance).where(Instance.sop_instance_uid == h.sop_instance_uid))
            if existing is not None and existing.sha256 == inst.entry.sha256:
                return "duplicate"
            insert_missing(s, Study, study_uid=h.study_uid, state=db.RECEIVING, version=1,
                           n_instances=0, attempts=0, first_received_at=now, last_received_at=now)
            # The study's row lock orders this recording after any other of the same study.
            study = s.scalars(select(Study).where(Study.study_uid == h.study_uid)
                              .with_for_update().execution_options(populate_existing=True)).one()
            existing = s.scalars(select(Instance).where(Instance.sop_instance_uid == h.sop_instance_uid)
                                 .execution_options(populate_existing=True)).one_or_none()
            if existing is not None and existing.sha256 == inst.entry.sha256:
                return "duplicate"  # the same bytes, recorded meanwhile by another daemon
            self._touch_study(s, study, h, now)
            if existing is None:
                s.add(self._new_instance(study, inst, now))
                study.n_instances += 1
                return "stored"
            s.add(Replacement(instance_id=existing.id, old_relpath=existing.relpath,
                              old_sha256=existing.sha256, new_relpath=inst.entry.relpath,
                              new_sha256=inst.entry.sha256, replaced_at=now))
            existing.relpath, existing.sha256 = inst.entry.relpath, inst.entry.sha256
            existing.size, existing.received_at = inst.entry.size, now
            existing.transfer_syntax = inst.transfer_syntax
            existing.series_uid, existing.sop_class_uid = h.series_uid, h.sop_class_uid
            if existing.study_id != study.id:
                self._move(s, existing, study, now)
                return "moved"
            log.info("instance %s replaced by a different payload", uid_hash(h.sop_instance_uid))
            return "replaced"

    def _move(self, s: Session, inst: Instance, to: Study, now: float) -> None:
        """Move ``inst`` from its study to ``to``: rescore the old one, or retire it when empty."""
        old = s.get(Study, inst.study_id, with_for_update=True, populate_existing=True)
        assert old is not None
        image = uid_hash(inst.sop_instance_uid)
        inst.study_id = to.id
        to.n_instances += 1
        old.n_instances = max(0, old.n_instances - 1)
        s.add(StudyEvent(study_id=to.id, at=now, kind="moved-in",
                         detail=f"image {image} moved here from study {_name(old)}"))
        s.add(StudyEvent(study_id=old.id, at=now, kind="moved-out",
                         detail=f"image {image} moved to study {_name(to)}"))
        log.info("instance %s moved from study %s to study %s", image,
                 uid_hash(old.study_uid), uid_hash(to.study_uid))
        if old.n_instances == 0:
            # Nothing left to read: off the worklist, into history, with the reason.
            old.state = db.MOVED
            old.note = f"moved to study {_name(to)}"
            old.completed_at = now
            if old.reported_at is None:
                old.reported_at, old.reported_by = now, SYSTEM_USER
            return
        # Rescore without the image: a new version, completed after the quiet period.
        old.note = f"image {image} moved to study {_name(to)}"
        if old.state != db.RECEIVING:
            old.state = db.RECEIVING
            old.version += 1
            old.completed_at = None
            old.attempts, old.retry_at, old.failure = 0, None, None
            old.claimed_by = old.claimed_until = None
        old.last_received_at = now

    @staticmethod
    def _new_instance(study: Study, inst: ReceivedInstance, now: float) -> Instance:
        h = inst.header
        return Instance(study=study, sop_instance_uid=h.sop_instance_uid,
                        sop_class_uid=h.sop_class_uid, series_uid=h.series_uid,
                        transfer_syntax=inst.transfer_syntax, relpath=inst.entry.relpath,
                        sha256=inst.entry.sha256, size=inst.entry.size,
                        calling_ae=inst.calling_ae, received_at=now)

    @staticmethod
    def _touch_study(s: Session, study: Study, h: Header, now: float) -> None:
        if study.state != db.RECEIVING:
            # A late instance reopens the study; results get a new version.
            log.info("study %s reopened by a late instance", uid_hash(study.study_uid))
            study.state = db.RECEIVING
            study.version += 1
            study.completed_at = None
            study.attempts, study.retry_at, study.failure = 0, None, None
            # A daemon scoring the old version finds it changed and records nothing.
            study.claimed_by = study.claimed_until = None
            if study.note and study.note.startswith("moved to study"):
                study.note = None
        if study.reported_at is not None:
            # New images after the report must be read again: back to the worklist.
            log.info("reported study %s has new images: back on the worklist", uid_hash(study.study_uid))
            study.reported_at = None
            study.reported_by = None
        study.last_received_at = now
        # The latest instance wins (a correction at the modality or the PACS);
        # the value it replaces stays in the study's history. Empty values never
        # erase what an earlier instance said.
        changed = []
        for attr, value in h.study_fields().items():
            current = getattr(study, attr)
            if value is None or value == current:
                continue
            if current is not None:
                changed.append(f"{FIELD_WORDS.get(attr, attr)} was {current!r}, now {value!r}")
            setattr(study, attr, value)
        if changed:
            s.add(StudyEvent(study_id=study.id, at=now, kind="corrected",
                             detail="; ".join(changed)))
            log.info("study %s: %d header field(s) corrected by a later instance",
                     uid_hash(study.study_uid), len(changed))

    def record_rejection(self, calling_ae: str, sop_class_uid: str | None,
                         sop_uid: str | None, refusal: Refusal) -> None:
        """Record a refused C-STORE (hashed instance UID, no patient data)."""
        with self.write() as s:
            s.add(Rejection(at=self.clock(), calling_ae=calling_ae, sop_class_uid=sop_class_uid,
                            sop_uid_hash=uid_hash(sop_uid) if sop_uid else None,
                            status=refusal.status, reason=refusal.reason))

    def complete_quiet_studies(self, quiet_period_s: float) -> list[int]:
        """Mark receiving studies with no instance for ``quiet_period_s`` complete.

        Returns the ids of the studies that became complete.
        """
        now = self.clock()
        with self.write() as s:
            # One statement: a study that another daemon reopens meanwhile is
            # re-checked against the condition after its row lock, not completed blindly.
            return list(s.execute(
                update(Study).where(Study.state == db.RECEIVING,
                                    Study.last_received_at <= now - quiet_period_s)
                .values(state=db.COMPLETE, completed_at=now)
                .returning(Study.id)).scalars())

    def mark_reported(self, study_id: int, reported: bool = True, by: str | None = None) -> bool:
        """Mark a study reported by ``by`` (it moves to history) or, with ``reported=False``,
        unread again. Returns False when there is no such study. Marking twice keeps the
        first time and the first user.
        """
        with self.write() as s:
            study = s.get(Study, study_id, with_for_update=True)
            if study is None:
                return False
            if not reported:
                study.reported_at = study.reported_by = None
            elif study.reported_at is None:
                study.reported_at = self.clock()
                study.reported_by = (by or "")[:64] or None
        log.info("study #%d marked %s", study_id, "reported" if reported else "unread")
        return True

    def unavailable_reason(self) -> str | None:
        """Return None when the database answers a query now, else one line saying why not
        (what ``/healthz`` shows). Raises nothing."""
        try:
            with self.engine.connect() as c:
                c.execute(text("SELECT 1 FROM alembic_version"))
        except Exception as e:
            return why_unavailable(e) if unavailable(e) else f"{type(e).__name__}: {e}"[:300]
        return None

    def counts(self) -> dict[str, int]:
        """Return the number of studies in each state (every state present, maybe 0)."""
        with self.read() as s:
            rows = s.execute(select(Study.state, func.count()).group_by(Study.state)).all()
        out = {state: 0 for state in db.STUDY_STATES}
        out.update({state: n for state, n in rows})
        return out

    def fingerprint(self) -> tuple[object, ...]:
        """Return a cheap summary that changes whenever the worklist would (a study arrives,
        completes, is scored, reported or reopened; an alert): what the leader polls to
        render pages that other daemons' work changed."""
        with self.read() as s:
            studies = s.execute(select(
                func.count(), func.max(Study.last_received_at), func.sum(Study.version),
                func.sum(func.coalesce(Study.reported_at, 0.0)),
                func.sum(func.coalesce(Study.completed_at, 0.0)),
                func.sum(Study.attempts))).one()
            return (*studies, s.scalar(select(func.max(Result.id))),
                    s.scalar(select(func.count()).select_from(Alert).where(Alert.active)))

    def known_relpaths(self) -> set[str]:
        """Return every spool path the database refers to (current or replaced)."""
        with self.read() as s:
            paths = set(s.scalars(select(Instance.relpath)))
            paths |= set(s.scalars(select(Replacement.old_relpath)))
        return paths

    def reconcile(self, spool: Spool) -> int:
        """Record durable spool files the database does not know (a crash between
        rename and commit). Returns how many were recovered; unreadable ones are logged."""
        known = self.known_relpaths()
        n = 0
        for path in spool.files():
            rel = path.relative_to(spool.root).as_posix()
            if rel in known:
                continue
            inst = _instance_from_file(path, rel)
            if inst is None:
                continue
            self.record_instance(inst)
            n += 1
        if n:
            log.info("recovered %d durable instance(s) missing from the database", n)
        return n


def _instance_from_file(path: Path, rel: str) -> ReceivedInstance | None:
    import hashlib

    try:
        data = path.read_bytes()
    except OSError as e:
        log.error("spool file %s cannot be recovered: %s", rel, e.strerror or e)
        return None
    header = read_file_header(path)
    if header is None or not (header.study_uid and header.sop_instance_uid):
        log.error("spool file %s cannot be recovered: not a readable DICOM file with UIDs", rel)
        return None
    entry = SpoolEntry(path, rel, hashlib.sha256(data).hexdigest(), len(data), existed=True)
    return ReceivedInstance(header, header.transfer_syntax, "", entry)
