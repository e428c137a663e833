"""The worklist's order: which band each study sits in, and where in it (pure).

Bands run from the operating point with the highest threshold (``urgent``)
down to the lowest (``abnormal``), then ``routine`` and ``pending`` (received
or queued, no result yet). An ``unscored`` study (refused by the input guard
or unreadable) sits in the routine band in its first-come place: never
demoted, never hidden. Within a band the study that has waited longest comes
first. The ageing rule lifts a routine, unscored or
pending study that has waited past a limit into the lowest operating-point
band, so nothing starves. Nothing here reads the clock, the disk or the
database: the caller passes ``now`` and the rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from triage.core.tiers import BASE_TIERS, LIFT_RANK, ROUTINE, UNSCORED, band_order, lift_tier

AGEABLE = frozenset(BASE_TIERS)


def is_aged(waited_min: Any, max_wait_min: float) -> Any:
    """True when a study that has waited ``waited_min`` minutes is past the limit.

    A limit of 0 (or less) turns ageing off. The comparison is strict: a study
    is lifted only once it has waited *longer* than the limit. ``waited_min``
    may be a numpy array; the result is then elementwise (or False when off).
    """
    return max_wait_min > 0 and waited_min > max_wait_min


def effective_rank(tier_rank: int, waited_min: float, max_wait_min: float,
                   lift_rank: int | None = LIFT_RANK) -> int:
    """Return the rank a study is read at: its tier's rank, or ``lift_rank`` once aged.

    Ranks are :func:`triage.core.tiers.rank`. Only ranks below ``lift_rank``
    (routine, unscored) age. Pass ``lift_rank=None`` when the model has no
    operating point: nothing is lifted then, as on the worklist. The replay's
    reading simulation uses this rule, so it queues as the worklist does.
    """
    if lift_rank is not None and tier_rank < lift_rank and is_aged(waited_min, max_wait_min):
        return lift_rank
    return tier_rank


@dataclass(frozen=True)
class Row:
    """One active study as the worklist needs it (values only; no ORM objects)."""

    study_id: int
    tier: str  # an operating point, routine, unscored or pending
    waiting_since: float  # epoch seconds: when its first instance arrived
    probability: float | None = None
    state: str = ""
    accession_number: str | None = None
    patient_name: str | None = None
    patient_id: str | None = None
    study_description: str | None = None
    study_date: str | None = None
    study_time: str | None = None
    modality: str | None = None
    n_images: int = 0
    reason: str | None = None
    version: int = 1
    tier_change: str | None = None  # rise | fall | None (against the previous version)
    previous_tier: str | None = None
    rescoring: bool = False  # new images arrived; the tier shown is the previous version's
    reported_at: float | None = None
    reported_by: str | None = None  # who marked it reported (history)
    patient_sex: str | None = None
    patient_age: str | None = None  # DICOM Age String, e.g. 064Y


@dataclass(frozen=True)
class Placed:
    """A row with its place: the band it is shown in and whether ageing lifted it there."""

    row: Row
    band: str
    aged: bool
    waited_s: float


def place(row: Row, now: float, thresholds: Mapping[str, float | None],
          max_wait_min: float) -> Placed:
    """Return ``row`` placed: in its own tier's band, or lifted when it has waited too long.

    The rule is :func:`is_aged` (shared with ``replay``);
    ``max_wait_min`` <= 0 turns ageing off.
    """
    waited = max(0.0, now - row.waiting_since)
    lift = lift_tier(thresholds)
    if lift is not None and row.tier in AGEABLE and is_aged(waited / 60.0, max_wait_min):
        return Placed(row, lift, True, waited)
    return Placed(row, ROUTINE if row.tier == UNSCORED else row.tier, False, waited)


def arrange(rows: Iterable[Row], now: float, thresholds: Mapping[str, float | None],
            max_wait_min: float) -> list[Placed]:
    """Return every row placed and ordered: by band, then longest waiting first.

    Nothing is dropped: the result has one entry per input row.
    """
    placed = [place(r, now, thresholds, max_wait_min) for r in rows]
    rank = {b: i for i, b in enumerate(band_order(thresholds, (p.band for p in placed)))}
    return sorted(placed, key=lambda p: (rank[p.band], -p.waited_s, p.row.study_id))


def bands(placed: Sequence[Placed], thresholds: Mapping[str, float | None]) -> list[tuple[str, list[Placed]]]:
    """Group arranged rows by band, in band order; every band is listed, even when empty."""
    order = band_order(thresholds, (p.band for p in placed))
    return [(b, [p for p in placed if p.band == b]) for b in order]


def to_json(p: Placed) -> dict[str, Any]:
    """Return the JSON form of one placed row (what ``GET /api/worklist`` lists)."""
    r = p.row
    return {
        "study_id": r.study_id, "band": p.band, "tier": r.tier, "aged": p.aged,
        "probability": r.probability, "waited_s": round(p.waited_s, 1), "state": r.state,
        "accession_number": r.accession_number, "patient_name": r.patient_name,
        "patient_id": r.patient_id, "study_description": r.study_description,
        "study_date": r.study_date, "study_time": r.study_time, "modality": r.modality,
        "n_images": r.n_images, "reason": r.reason, "version": r.version,
        "tier_change": r.tier_change, "previous_tier": r.previous_tier,
        "rescoring": r.rescoring, "url": f"/study/{r.study_id}",
    }


def format_wait(seconds: float) -> str:
    """Return a waiting time as the page shows it: '45 s', '12 min', '3 h 05 min', '2 d 4 h'."""
    s = int(max(0.0, seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def format_study_datetime(date: str | None, time: str | None) -> str:
    """Return DICOM StudyDate and StudyTime as 'YYYY-MM-DD HH:MM' (what is present of it)."""
    d = (date or "").strip()
    t = (time or "").strip()
    out = f"{d[:4]}-{d[4:6]}-{d[6:8]}" if len(d) == 8 and d.isdigit() else d
    if len(t) >= 4 and t[:4].isdigit():
        out = f"{out} {t[:2]}:{t[2:4]}".strip()
    return out
