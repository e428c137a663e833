"""The SQLite database: schema (SQLAlchemy ORM), engine set-up and migrations.

The schema itself is owned by Alembic revisions in ``migrations/``; the ORM
classes here mirror it, and ``create_all()`` is used only by tests that check
the two agree. :func:`open_db` upgrades a database to head before use.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Boolean,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"

# Study states. A study moves receiving -> complete -> scored | unscored | failed,
# and back to receiving when a late instance reopens it.
RECEIVING, COMPLETE, SCORED, UNSCORED, FAILED = (
    "receiving", "complete", "scored", "unscored", "failed")
STUDY_STATES = (RECEIVING, COMPLETE, SCORED, UNSCORED, FAILED)


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
    # received -> processed (by the scoring worker); a replacement resets it.
    state: Mapped[str] = mapped_column(String(16), nullable=False, default="received")
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
    thumb_path: Mapped[str | None] = mapped_column(Text)
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


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    # FULL: a committed row survives a power cut, not only a process crash.
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def make_engine(db_path: Path) -> Engine:
    """Return an engine on ``db_path`` with WAL, synchronous=FULL and foreign keys on."""
    db_path.parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        f"sqlite:///{db_path}",
        connect_args={"check_same_thread": False, "timeout": 30},
    )
    event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def alembic_config(engine: Engine) -> Any:
    """Return an Alembic Config pointing at ``migrations/`` and this engine."""
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", str(engine.url))
    cfg.attributes["engine"] = engine
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Migrate the database to ``revision`` (head by default)."""
    from alembic import command

    command.upgrade(alembic_config(engine), revision)


def current_revision(engine: Engine) -> str | None:
    """Return the database's Alembic revision, or None for an empty database."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def open_db(db_path: Path) -> Engine:
    """Open (creating if needed) the database and upgrade it to head; return the engine."""
    engine = make_engine(db_path)
    before = current_revision(engine)
    upgrade(engine)
    after = current_revision(engine)
    if before != after:
        log.info("database migrated from %s to %s", before or "empty", after)
    return engine
