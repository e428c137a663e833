"""Per-study replay records, and the resumable results file they are appended to."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from triage.core.errors import InputError

log = logging.getLogger(__name__)

RESULTS_NAME = "results.jsonl"


@dataclass
class StudyRecord:
    """The outcome of one study, as the daemon would record it (one line of results.jsonl)."""

    study_uid: str
    accession_number: str | None
    state: str  # scored | unscored
    probability: float | None
    tier: str
    reasons: list[str]  # "image <hash>: reason", as the daemon writes them
    images: list[dict[str, Any]]  # per image: sop_hash, probability, reason and metadata
    patient_sex: str | None = None
    study_date: str | None = None
    study_time: str | None = None
    model_sha256: str = ""
    mode: str = "in-process"  # or "via": scored by a running daemon
    thresholds: dict[str, float | None] = field(default_factory=dict)  # as applied (overrides too)

    def to_json(self) -> str:
        """Return the record as one line of JSON."""
        return json.dumps(asdict(self), allow_nan=False, sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StudyRecord:
        """Build a record from its JSON form. Raises KeyError/TypeError on a malformed one."""
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in names})


class ResultsFile:
    """``DIR/results.jsonl``: one line per scored study, appended and flushed as it goes.

    A re-run reads it back and skips those studies. A torn last line (a crash
    mid-write) is ignored, so its study is simply scored again.
    """

    def __init__(self, out_dir: Path, force: bool = False) -> None:
        self.path = out_dir / RESULTS_NAME
        out_dir.mkdir(parents=True, exist_ok=True)
        if force and self.path.exists():
            self.path.unlink()
        self._drop_torn_tail()

    def _drop_torn_tail(self) -> None:
        """Cut a last line that has no newline (a crash mid-write), so appends start clean."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            log.warning("%s ends with an incomplete line; that study will be scored again",
                        self.path.name)
            with self.path.open("r+b") as fh:
                fh.truncate(data.rfind(b"\n") + 1)

    @staticmethod
    def read_only(out_dir: Path) -> dict[str, StudyRecord]:
        """Return the records of a replay folder without changing anything in it."""
        return _load(Path(out_dir) / RESULTS_NAME)

    def load(self) -> dict[str, StudyRecord]:
        """Return the records already written, by study UID (later lines win)."""
        return _load(self.path)

    def append(self, records: Iterable[StudyRecord]) -> None:
        """Append records durably (flush and fsync before returning)."""
        with self.path.open("a", encoding="utf-8") as fh:
            for r in records:
                fh.write(r.to_json() + "\n")
            fh.flush()
            os.fsync(fh.fileno())


def check_model(done: Mapping[str, StudyRecord], sha256: str, force: bool) -> None:
    """Refuse to mix results of two models in one output folder.

    Raises InputError when earlier results came from another model and ``force`` is off.
    """
    other = {r.model_sha256 for r in done.values() if r.model_sha256 and r.model_sha256 != sha256}
    if other and sha256 and not force:
        raise InputError(f"{RESULTS_NAME} holds results of another model (sha256 "
                         f"{min(other)[:12]}...); use --force to start again")


def _load(path: Path) -> dict[str, StudyRecord]:
    """Return the records in a results file, by study UID (later lines win; torn lines skipped)."""
    out: dict[str, StudyRecord] = {}
    if not path.exists():
        return out
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, start=1):
            try:
                rec = StudyRecord.from_dict(json.loads(line))
            except (ValueError, KeyError, TypeError):
                log.warning("%s line %d is incomplete; that study will be scored again",
                            path.name, n)
                continue
            out[rec.study_uid] = rec
    return out
