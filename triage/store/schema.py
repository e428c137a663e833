"""The database schema as SQLAlchemy ORM classes, and the study states.

The schema itself is owned by the Alembic revisions in ``migrations/``; the
classes here mirror it, and ``create_all()`` is used only by the test that
checks the two agree. Engines and migrations are :mod:`triage.store.database`.
"""

from __future__ import annotations

from sqlalchemy import (
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Study states. A study moves receiving -> complete -> scored | unscored | failed,
# and back to receiving when a late instance reopens it. A study whose every
# instance was re-sent under another StudyInstanceUID is "moved" (and leaves the
# worklist); a new instance reopens it like any other.
RECEIVING, COMPLETE, SCORED, UNSCORED, FAILED, MOVED = (
    "receiving", "complete", "scored", "unscored", "failed", "moved")
STUDY_STATES = (RECEIVING, COMPLETE, SCORED, UNSCORED, FAILED, MOVED)


class Base(DeclarativeBase):
    """Declarative base of the triage schema."""


class Study(Base):
    """One study, grouped by StudyInstanceUID across any number of associations."""

    __tablename__ = "studies"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    accession_number: Mapped[str | None] = mapped_column(String(64))
    patient_name: Mapped[str | None] = mapped_column(String(324))
    patient_id: Mapped[str | None] = mapped_column(String(64))
    patient_sex: Mapped[str | None] = mapped_column(String(16))
    patient_age: Mapped[str | None] = mapped_column(String(16))  # DICOM Age String, e.g. 004Y
    study_date: Mapped[str | None] = mapped_column(String(8))
    study_time: Mapped[str | None] = mapped_column(String(16))
    study_description: Mapped[str | None] = mapped_column(String(64))
    modality: Mapped[str | None] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), nullable=False, index=True)
    version: Mapped[int] = mapped_column(Integer, nullable=False, default=1)
    n_instances: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    first_received_at: Mapped[float] = mapped_column(Float, nullable=False)
    last_received_at: Mapped[float] = mapped_column(Float, nullable=False)
    completed_at: Mapped[float | None] = mapped_column(Float)
    # Set when a radiologist marks the study reported (it moves to history);
    # cleared when a late instance reopens it. Retention purges only these.
    reported_at: Mapped[float | None] = mapped_column(Float, index=True)
    # Who marked it reported (the web login's user name, or "triage" when the
    # daemon itself took it off the worklist, e.g. every image moved away).
    reported_by: Mapped[str | None] = mapped_column(String(64))
    # A note for the worklist and history, e.g. "moved to study …".
    note: Mapped[str | None] = mapped_column(Text)
    # Scoring attempts of the current version that failed, when the next may
    # start, and the last failure in words (state "failed" once attempts run out).
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0", default=0)
    retry_at: Mapped[float | None] = mapped_column(Float)
    failure: Mapped[str | None] = mapped_column(Text)
    # The daemon scoring the current version, and until when its claim holds
    # (database time). An expired claim is anyone's: its daemon died or stalled.
    claimed_by: Mapped[str | None] = mapped_column(String(128))
    claimed_until: Mapped[float | None] = mapped_column(Float)
    instances: Mapped[list[Instance]] = relationship(back_populates="study")


class Instance(Base):
    """One acknowledged SOP instance and where its bytes are in the spool."""

    __tablename__ = "instances"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), nullable=False, index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    sop_class_uid: Mapped[str] = mapped_column(String(64), nullable=False)
    series_uid: Mapped[str] = mapped_column(String(64), nullable=False)
    transfer_syntax: Mapped[str] = mapped_column(String(64), nullable=False)
    relpath: Mapped[str] = mapped_column(Text, nullable=False)
    sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    size: Mapped[int] = mapped_column(Integer, nullable=False)
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    received_at: Mapped[float] = mapped_column(Float, nullable=False)
    study: Mapped[Study] = relationship(back_populates="instances")


class Replacement(Base):
    """A resend of a SOP Instance UID with different bytes; both files are kept."""

    __tablename__ = "replacements"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"), nullable=False, index=True)
    old_relpath: Mapped[str] = mapped_column(Text, nullable=False)
    old_sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    new_relpath: Mapped[str] = mapped_column(Text, nullable=False)
    new_sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    replaced_at: Mapped[float] = mapped_column(Float, nullable=False)


class StudyEvent(Base):
    """Something that happened to a study besides a result: an instance moved in or out,
    a demographic correction (with the values it replaced), a scoring failure."""

    __tablename__ = "study_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), nullable=False, index=True)
    at: Mapped[float] = mapped_column(Float, nullable=False)
    kind: Mapped[str] = mapped_column(String(32), nullable=False)  # moved-in | moved-out | corrected | failed
    detail: Mapped[str] = mapped_column(Text, nullable=False)  # in words


class Lease(Base):
    """A named lease with an expiry (database time): "leader" is the daemon that runs the
    jobs only one may run at a time."""

    __tablename__ = "leases"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(128), nullable=False)
    expires_at: Mapped[float] = mapped_column(Float, nullable=False)
    acquired_at: Mapped[float] = mapped_column(Float, nullable=False)


class Rejection(Base):
    """A refused C-STORE: what status the sender got, and why. No patient data."""

    __tablename__ = "rejections"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[float] = mapped_column(Float, nullable=False, index=True)
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    sop_class_uid: Mapped[str | None] = mapped_column(String(64))
    sop_uid_hash: Mapped[str | None] = mapped_column(String(16))
    status: Mapped[int] = mapped_column(Integer, nullable=False)
    reason: Mapped[str] = mapped_column(Text, nullable=False)


class Result(Base):
    """One scoring of one study version; history is kept, one row per version."""

    __tablename__ = "results"
    __table_args__ = (UniqueConstraint("study_id", "version", name="uq_results_study_version"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), nullable=False, index=True)
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    state: Mapped[str] = mapped_column(String(16), nullable=False)  # scored | unscored | failed
    probability: Mapped[float | None] = mapped_column(Float)
    tier: Mapped[str] = mapped_column(String(32), nullable=False)
    previous_tier: Mapped[str | None] = mapped_column(String(32))
    tier_change: Mapped[str | None] = mapped_column(String(8))  # rise | fall | None
    reasons: Mapped[str | None] = mapped_column(Text)  # JSON list of "image: reason"
    model_name: Mapped[str] = mapped_column(String(128), nullable=False)
    model_sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    thresholds: Mapped[str] = mapped_column(Text, nullable=False)  # JSON
    # Where the thresholds came from: "model card" (with worker.tier_overrides
    # noted when they apply) or, once site profiles exist, the profile's name.
    thresholds_source: Mapped[str] = mapped_column(String(128), nullable=False,
                                                   server_default="model card")
    timings: Mapped[str] = mapped_column(Text, nullable=False)  # JSON, seconds per stage
    created_at: Mapped[float] = mapped_column(Float, nullable=False)
    images: Mapped[list[ImageResult]] = relationship(back_populates="result")


class ImageResult(Base):
    """The score (or reason) of one image within a result, with its input metadata."""

    __tablename__ = "image_results"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("results.id"), nullable=False, index=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"), nullable=False)
    probability: Mapped[float | None] = mapped_column(Float)
    reason: Mapped[str | None] = mapped_column(Text)
    heatmap_path: Mapped[str | None] = mapped_column(Text)
    manufacturer: Mapped[str | None] = mapped_column(String(64))
    photometric: Mapped[str | None] = mapped_column(String(16))
    bits_stored: Mapped[int | None] = mapped_column(Integer)
    rows: Mapped[int | None] = mapped_column(Integer)
    columns: Mapped[int | None] = mapped_column(Integer)
    pixel_spacing: Mapped[str | None] = mapped_column(String(64))
    view_position: Mapped[str | None] = mapped_column(String(16))
    transfer_syntax: Mapped[str | None] = mapped_column(String(64))
    patient_age_years: Mapped[float | None] = mapped_column(Float)
    scored_at: Mapped[float] = mapped_column(Float, nullable=False, index=True)
    # The nearest few-shot prototype (model.prototypes) and the distance to it: an
    # extra finding shown beside the score, never used for the tier.
    prototype_class: Mapped[str | None] = mapped_column(String(64))
    prototype_distance: Mapped[float | None] = mapped_column(Float)
    result: Mapped[Result] = relationship(back_populates="images")


class DriftCheck(Base):
    """One run of the drift watch."""

    __tablename__ = "drift_checks"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[float] = mapped_column(Float, nullable=False)
    n: Mapped[int] = mapped_column(Integer, nullable=False)
    psi: Mapped[float | None] = mapped_column(Float)
    ks: Mapped[float | None] = mapped_column(Float)
    unseen: Mapped[str | None] = mapped_column(Text)  # JSON {field: [values]}
    alert: Mapped[bool] = mapped_column(Boolean, nullable=False)
    summary: Mapped[str] = mapped_column(Text, nullable=False)


class Alert(Base):
    """Something an operator or radiologist must see (drift, for now)."""

    __tablename__ = "alerts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[float] = mapped_column(Float, nullable=False)
    kind: Mapped[str] = mapped_column(String(32), nullable=False)
    message: Mapped[str] = mapped_column(Text, nullable=False)
    active: Mapped[bool] = mapped_column(Boolean, nullable=False)


# Result object kinds and outbox states. An outbox row moves pending -> sent,
# or pending -> dead after results.max_attempts failed attempts;
# `triage outbox retry` moves dead back to pending.
SR, OVERLAY = "sr", "overlay"
# Messages (no DICOM object): an HL7 ORU^R01, an HL7 order-priority update, a FHIR Bundle.
ORU, ORM, FHIR = "oru", "orm", "fhir"
MESSAGE_KINDS = (ORU, ORM, FHIR)
PENDING, SENT, DEAD = "pending", "sent", "dead"
OUTBOX_STATES = (PENDING, SENT, DEAD)


class ResultObject(Base):
    """A DICOM object a result produces (its SR, an image's overlay), with UIDs fixed at recording.

    The row is written in the result's transaction, before any send, so every
    attempt at any destination sends the same SOP Instance UID. ``relpath``
    is set once the file is built (under the data directory).
    """

    __tablename__ = "result_objects"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("results.id"), nullable=False, index=True)
    image_result_id: Mapped[int | None] = mapped_column(ForeignKey("image_results.id"))
    kind: Mapped[str] = mapped_column(String(16), nullable=False)  # sr | overlay | oru | orm | fhir
    sop_class_uid: Mapped[str] = mapped_column(String(64), nullable=False)
    series_uid: Mapped[str] = mapped_column(String(64), nullable=False)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    series_number: Mapped[int] = mapped_column(Integer, nullable=False)
    instance_number: Mapped[int] = mapped_column(Integer, nullable=False)
    relpath: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float, nullable=False)
    result: Mapped[Result] = relationship()
    image: Mapped[ImageResult | None] = relationship()
    deliveries: Mapped[list[Delivery]] = relationship(back_populates="object")


class Delivery(Base):
    """One object to one destination: the durable outbox entry and its state."""

    __tablename__ = "outbox"
    __table_args__ = (
        UniqueConstraint("object_id", "destination", name="uq_outbox_object_destination"),
        Index("ix_outbox_due", "state", "next_attempt_at"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    object_id: Mapped[int] = mapped_column(ForeignKey("result_objects.id"), nullable=False,
                                           index=True)
    destination: Mapped[str] = mapped_column(String(64), nullable=False)  # its label
    state: Mapped[str] = mapped_column(String(16), nullable=False)  # pending | sent | dead
    attempts: Mapped[int] = mapped_column(Integer, nullable=False)
    next_attempt_at: Mapped[float] = mapped_column(Float, nullable=False)
    last_attempt_at: Mapped[float | None] = mapped_column(Float)
    last_status: Mapped[int | None] = mapped_column(Integer)  # the last C-STORE status
    last_error: Mapped[str | None] = mapped_column(Text)
    sent_at: Mapped[float | None] = mapped_column(Float)
    object: Mapped[ResultObject] = relationship(back_populates="deliveries")


class PullStudy(Base):
    """What a pull source last showed of one study, and how much of it was retrieved."""

    __tablename__ = "pull_studies"
    __table_args__ = (UniqueConstraint("source", "study_uid", name="uq_pull_studies_source_study"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source: Mapped[str] = mapped_column(String(64), nullable=False)
    study_uid: Mapped[str] = mapped_column(String(64), nullable=False)
    # NumberOfStudyRelatedInstances at the last poll (None: the PACS did not say).
    remote_instances: Mapped[int | None] = mapped_column(Integer)
    retrieved: Mapped[int] = mapped_column(Integer, nullable=False)
    first_seen_at: Mapped[float] = mapped_column(Float, nullable=False)
    retrieved_at: Mapped[float | None] = mapped_column(Float)


class PullSource(Base):
    """One pull source's last poll: when, whether it answered, and why not."""

    __tablename__ = "pull_sources"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    last_poll_at: Mapped[float | None] = mapped_column(Float)
    last_ok_at: Mapped[float | None] = mapped_column(Float)
    failures: Mapped[int] = mapped_column(Integer, nullable=False)  # in a row
    last_error: Mapped[str | None] = mapped_column(Text)
    next_try_at: Mapped[float | None] = mapped_column(Float)
    retrieved_total: Mapped[int] = mapped_column(Integer, nullable=False)
