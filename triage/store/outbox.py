"""The durable outbox: which DICOM objects and messages go to which destination, and how far each send got.

:func:`plan` runs inside the transaction that records a result: the objects
(an SR per result, an overlay per scored image) get their SOP Instance and
Series UIDs there, and one outbox row per destination, before any attempt.
Every later attempt, after any crash, sends the same UIDs, and a PACS stores
a SOP Instance UID once.

An attempt is recorded (attempts + 1, the next time it is due) before it is
made, in its own commit; success or failure is recorded after. A crash in
between leaves the row pending with the attempt counted, and the object is
sent again once due: at-least-once on the wire, exactly once in the PACS.

The counting functions (:func:`totals`, :func:`dead_letter_count`) are what
``triage status``, the worklist banner and a metrics endpoint read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydicom.uid import generate_uid
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from triage.store import schema as db
from triage.store.schema import Delivery, ImageResult, Result, ResultObject

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR Storage
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
# Series numbers: the SR of result version v is in series 9000 + v, its overlays
# in 9500 + v, far from a modality's own numbers.
SR_SERIES, OVERLAY_SERIES, MAX_VERSION_NUMBER = 9000, 9500, 499


def new_uid() -> str:
    """Return a fresh UUID-derived UID (2.25.x): unique without an organisation root."""
    return str(generate_uid(prefix=None))


def _series_number(base: int, version: int) -> int:
    return base + min(version, MAX_VERSION_NUMBER)


def plan(session: Session, result: Result, images: Sequence[ImageResult],
         wants: Mapping[str, Sequence[str]], now: float) -> list[ResultObject]:
    """Add the result's objects and their outbox rows to ``session`` (the result's transaction).

    ``wants`` maps a kind ("sr", "overlay", "oru", "orm", "fhir") to the labels of the destinations
    it goes to; a kind nobody wants gets no object. Overlays are planned for
    images that have a heatmap. Returns the objects added.
    """
    objects: list[ResultObject] = []
    if wants.get(db.SR):
        objects.append(ResultObject(
            result=result, kind=db.SR, sop_class_uid=SR_CLASS, series_uid=new_uid(),
            sop_instance_uid=new_uid(), series_number=_series_number(SR_SERIES, result.version),
            instance_number=1, created_at=now))
    overlays = [im for im in images if im.heatmap_path] if wants.get(db.OVERLAY) else []
    series = new_uid()
    for n, im in enumerate(overlays, start=1):
        objects.append(ResultObject(
            result=result, image=im, kind=db.OVERLAY, sop_class_uid=SC_CLASS, series_uid=series,
            sop_instance_uid=new_uid(),
            series_number=_series_number(OVERLAY_SERIES, result.version), instance_number=n,
            created_at=now))
    # A message has no DICOM identity; its fixed UID is the message's own (the HL7 control ID
    # and the FHIR identifiers derive from it), so every resend is recognisably the same.
    for kind in db.MESSAGE_KINDS:
        if wants.get(kind):
            objects.append(ResultObject(
                result=result, kind=kind, sop_class_uid="", series_uid=new_uid(),
                sop_instance_uid=new_uid(), series_number=0, instance_number=0, created_at=now))
    for obj in objects:
        for label in wants[obj.kind]:
            session.add(Delivery(object=obj, destination=label, state=db.PENDING, attempts=0,
                                 next_attempt_at=now))
    session.add_all(objects)
    return objects


@dataclass(frozen=True)
class Due:
    """One outbox row due for an attempt, with what sending it needs."""

    delivery_id: int
    destination: str
    object_id: int
    kind: str
    sop_instance_uid: str
    relpath: str | None
    attempts: int


def due(store: Any, now: float, limit: int) -> list[Due]:
    """Return pending outbox rows whose next attempt is due, oldest first (at most ``limit``)."""
    q = (select(Delivery, ResultObject).join(ResultObject, ResultObject.id == Delivery.object_id)
         .where(Delivery.state == db.PENDING, Delivery.next_attempt_at <= now)
         .order_by(Delivery.next_attempt_at, Delivery.id).limit(limit))
    with store.read() as s:
        return [Due(d.id, d.destination, o.id, o.kind, o.sop_instance_uid, o.relpath, d.attempts)
                for d, o in s.execute(q).all()]


def next_due_at(store: Any) -> float | None:
    """Return when the earliest pending row is due (None: nothing pending)."""
    with store.read() as s:
        return s.scalar(select(func.min(Delivery.next_attempt_at))
                        .where(Delivery.state == db.PENDING))


def set_built(store: Any, object_id: int, relpath: str) -> None:
    """Record where an object's file was built (relative to the data directory)."""
    with store.write() as s:
        s.execute(update(ResultObject).where(ResultObject.id == object_id)
                  .values(relpath=relpath))


def begin_attempt(store: Any, delivery_ids: Iterable[int], now: float,
                  wait_s: Callable[[int], float]) -> None:
    """Count an attempt on each row before it is made; it is next due ``wait_s(attempts)`` later.

    A crash during the attempt thus leaves the row pending, counted and due
    again after its backoff.
    """
    with store.write() as s:
        for d in s.scalars(select(Delivery).where(Delivery.id.in_(list(delivery_ids)))):
            d.attempts += 1
            d.last_attempt_at = now
            d.next_attempt_at = now + wait_s(d.attempts)


def record_sent(store: Any, delivery_id: int, status: int | None, now: float) -> None:
    """Mark a row sent (the destination answered a success or warning ``status``; None for an
    answer with no number, such as an HL7 AA)."""
    with store.write() as s:
        s.execute(update(Delivery).where(Delivery.id == delivery_id).values(
            state=db.SENT, sent_at=now, last_status=status, last_error=None))


def record_failure(store: Any, delivery_ids: Iterable[int], error: str, status: int | None,
                   max_attempts: int) -> list[int]:
    """Record a failed attempt on each row; rows out of attempts become dead letters.

    Returns the ids that became dead.
    """
    dead = []
    with store.write() as s:
        for d in s.scalars(select(Delivery).where(Delivery.id.in_(list(delivery_ids)))):
            d.last_error, d.last_status = error[:500], status
            if d.attempts >= max_attempts:
                d.state = db.DEAD
                dead.append(d.id)
    return dead


def kill(store: Any, delivery_ids: Iterable[int], error: str, status: int | None = None) -> None:
    """Move rows straight to the dead letter (their destination is no longer configured, or it
    refused the message for good)."""
    with store.write() as s:
        s.execute(update(Delivery).where(Delivery.id.in_(list(delivery_ids)))
                  .values(state=db.DEAD, last_error=error[:500], last_status=status))


def retry(store: Any, now: float, destination: str | None = None) -> int:
    """Queue dead letters again (all, or one destination's) with a fresh allowance of attempts.

    Returns how many rows were queued.
    """
    q = update(Delivery).where(Delivery.state == db.DEAD)
    if destination is not None:
        q = q.where(Delivery.destination == destination)
    with store.write() as s:
        n = s.execute(q.values(state=db.PENDING, attempts=0, next_attempt_at=now)).rowcount
    return int(n or 0)


def totals(store: Any) -> dict[str, dict[str, int]]:
    """Return {destination: {state: count}} over the whole outbox (every state present)."""
    with store.read() as s:
        rows = s.execute(select(Delivery.destination, Delivery.state, func.count())
                         .group_by(Delivery.destination, Delivery.state)).all()
    out: dict[str, dict[str, int]] = {}
    for dest, state, n in rows:
        out.setdefault(dest, dict.fromkeys(db.OUTBOX_STATES, 0))[state] = n
    return out


def dead_letter_count(store: Any) -> int:
    """Return the number of outbox rows in the dead letter (the counter a /metrics page exposes)."""
    with store.read() as s:
        return int(s.scalar(select(func.count()).select_from(Delivery)
                            .where(Delivery.state == db.DEAD)) or 0)


@dataclass(frozen=True)
class DeadLetter:
    """A dead letter as operators see it: no patient data, the UID hashed."""

    delivery_id: int
    destination: str
    kind: str
    study_id: int
    result_version: int
    sop_uid_hash: str
    attempts: int
    last_error: str | None


def dead_letters(store: Any, limit: int = 100) -> list[DeadLetter]:
    """Return the dead letters, oldest first (at most ``limit``)."""
    from dicom_io.ids import uid_hash

    q = (select(Delivery, ResultObject, Result)
         .join(ResultObject, ResultObject.id == Delivery.object_id)
         .join(Result, Result.id == ResultObject.result_id)
         .where(Delivery.state == db.DEAD).order_by(Delivery.id).limit(limit))
    with store.read() as s:
        return [DeadLetter(d.id, d.destination, o.kind, r.study_id, r.version,
                           uid_hash(o.sop_instance_uid), d.attempts, d.last_error)
                for d, o, r in s.execute(q).all()]
