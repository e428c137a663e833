"""What a result message says, as plain values, and what a destination answered."""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

DELIVERED, REFUSED, RETRY = "delivered", "refused", "retry"
NOT_FOR_DIAGNOSIS = "Triage aid: not for diagnostic use."


@dataclass(frozen=True)
class Outcome:
    """A destination's answer to one message: delivered, refused (with its text) or retry.

    ``text`` may echo what the peer said (kept in the outbox row, never logged); ``code`` is
    the log-safe gist (an ACK code, an HTTP status, "no answer")."""

    state: str
    code: str
    text: str = ""
    status: int | None = None


@dataclass(frozen=True)
class ResultFacts:
    """One result version as the messages tell it (patient data included: never log these)."""

    message_uid: str  # fixed when the result was recorded: every resend carries it
    patient_id: str
    patient_name: str  # DICOM PN: family^given^middle^prefix^suffix
    birth_date: str  # YYYYMMDD or ""
    sex: str  # M | F | O | ""
    accession: str
    study_uid: str
    study_description: str
    procedure_code: tuple[str, str, str] | None  # (value, scheme, meaning) from the header
    version: int
    state: str  # scored | unscored | failed
    tier: str
    priority: str  # S (urgent) | A (abnormal) | R (routine)
    probability: float | None
    reasons: tuple[str, ...]
    model_name: str
    model_sha256: str
    software: str
    thresholds_source: str
    when: dt.datetime  # when the result was recorded (local time, naive)

    @property
    def corrected(self) -> bool:
        """True for a later version of a result already sent (OBR-25 C, FHIR "amended")."""
        return self.version > 1

    @property
    def control_id(self) -> str:
        """A 20-character message control ID derived from the fixed UID (MSH-10 is ST(20))."""
        return hashlib.sha256(self.message_uid.encode()).hexdigest()[:20].upper()


def priority_letter(tier: str, thresholds: Mapping[str, float | None]) -> str:
    """Return the order priority for a tier: S (stat) for the highest operating point, A (as
    soon as possible) for any other operating point, R (routine) for routine and unscored."""
    points = sorted(((float(t), n) for n, t in thresholds.items()
                     if t is not None and n not in ("routine", "unscored", "pending")))
    if not points or tier not in {n for _, n in points}:
        return "R"
    return "S" if tier == points[-1][1] else "A"
