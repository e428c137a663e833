"""A result's facts for the builder tests (synthetic, no real patient)."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

from triage.messages.facts import ResultFacts

BASE = ResultFacts(
    message_uid="2.25.1234567890", patient_id="P-77", patient_name="DOE^JANE", birth_date="20210304",
    sex="F", accession="ACC-77", study_uid="1.2.826.0.1.3680043.8.498.1", study_description="CHEST PA",
    procedure_code=None, version=1, state="scored", tier="urgent", priority="S", probability=0.8312,
    reasons=(), model_name="cxr-net", model_sha256="ab" * 32, software="triage 0.1.0",
    thresholds_source="model card cxr-net", when=dt.datetime(2026, 1, 2, 3, 4, 5))


def facts(**kw: Any) -> ResultFacts:
    """BASE with some fields replaced."""
    return dataclasses.replace(BASE, **kw)
