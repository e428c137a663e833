"""The replay's labels CSV: a label (and optionally arrival and read times) per study."""

from __future__ import annotations

import csv
import datetime as _dt
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from triage.core.errors import InputError


@dataclass(frozen=True)
class LabelRow:
    """One row of the labels CSV."""

    key: str  # a StudyInstanceUID or an AccessionNumber
    label: int | None  # None: the row gives no label
    arrival: _dt.datetime | None = None
    read: _dt.datetime | None = None
    split: str | None = None  # the data-set split an archive was built from, if the CSV says


@dataclass(frozen=True)
class Labels:
    """The labels CSV: each row with the StudyInstanceUID and/or AccessionNumber it names."""

    rows: tuple[tuple[str | None, str | None, LabelRow], ...]

    @cached_property
    def by_uid(self) -> dict[str, LabelRow]:
        """Rows by StudyInstanceUID (later rows win)."""
        return {u: r for u, _, r in self.rows if u}

    @cached_property
    def by_accession(self) -> dict[str, LabelRow]:
        """Rows by AccessionNumber (later rows win)."""
        return {a: r for _, a, r in self.rows if a}

    def lookup(self, study_uid: str, accession: str | None) -> LabelRow | None:
        """Return the row for a study: by StudyInstanceUID first, then by AccessionNumber."""
        row = self.by_uid.get(study_uid)
        if row is None and accession:
            row = self.by_accession.get(accession)
        return row

    def unmatched(self, studies: Iterable[tuple[str, str | None]]) -> list[str]:
        """Return the keys of rows that no (study uid, accession) in ``studies`` matches."""
        pairs = list(studies)
        uids = {u for u, _ in pairs}
        accs = {a for _, a in pairs if a}
        return sorted({r.key for u, a, r in self.rows
                       if not ((u and u in uids) or (a and a in accs))})


def parse_time(text: str | None) -> _dt.datetime | None:
    """Return a naive datetime from ISO 8601 ("2025-01-06T09:30") or DICOM DT ("20250106093000").

    Empty text gives None. Raises ValueError for anything else.
    """
    s = (text or "").strip()
    if not s:
        return None
    try:
        t = _dt.datetime.fromisoformat(s)
    except ValueError:
        parsed = dicom_datetime(s[:8], s[8:])
        if parsed is None:
            raise ValueError(f"unrecognised time {s!r}") from None
        t = parsed
    return t.replace(tzinfo=None) if t.tzinfo is None else t.astimezone().replace(tzinfo=None)


def dicom_datetime(date: str | None, time: str | None) -> _dt.datetime | None:
    """Return StudyDate + StudyTime as a datetime, or None when the date is missing or invalid."""
    d = (date or "").strip()
    t = ((time or "").strip().split(".")[0].replace(":", "") + "000000")[:6]
    try:
        return _dt.datetime.strptime(d + t, "%Y%m%d%H%M%S")
    except ValueError:
        return None


def _col(header: Sequence[str], *names: str) -> str | None:
    low = {h.strip().lower(): h for h in header}
    return next((low[n.lower()] for n in names if n.lower() in low), None)


def read_labels(path: str | Path) -> Labels:
    """Read a labels CSV keyed by ``StudyInstanceUID`` and/or ``AccessionNumber``.

    Columns: the key(s), ``label`` (1 abnormal, 0 normal, empty: unlabelled) and
    optionally ``arrival_time`` and ``read_time``. Raises InputError naming the
    row on a missing column, a bad label or a bad time.
    """
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = list(reader.fieldnames or [])
            rows = list(reader)
    except OSError as e:
        raise InputError(f"cannot read labels {path}: {e}") from e
    uid_c = _col(header, "StudyInstanceUID", "study_uid")
    acc_c = _col(header, "AccessionNumber", "accession_number")
    lab_c = _col(header, "label")
    if lab_c is None or (uid_c is None and acc_c is None):
        raise InputError(f"labels {path} need a label column and StudyInstanceUID or AccessionNumber")
    out = []
    for i, r in enumerate(rows, start=2):
        row = _label_row(r, uid_c, acc_c, lab_c, header, f"labels {path} row {i}")
        uid = (r.get(uid_c) or "").strip() if uid_c else ""
        acc = (r.get(acc_c) or "").strip() if acc_c else ""
        out.append((uid or None, acc or None, row))
    return Labels(tuple(out))


def _label_row(r: Mapping[str, str], uid_c: str | None, acc_c: str | None, lab_c: str,
               header: Sequence[str], where: str) -> LabelRow:
    key = ((r.get(uid_c) if uid_c else "") or (r.get(acc_c) if acc_c else "") or "").strip()
    if not key:
        raise InputError(f"{where}: no StudyInstanceUID or AccessionNumber")
    value = (r.get(lab_c) or "").strip()
    if value not in ("", "0", "1"):
        raise InputError(f"{where}: label {value!r} is not 1, 0 or empty")
    times = {}
    for name in ("arrival_time", "read_time"):
        c = _col(header, name)
        try:
            times[name] = parse_time(r.get(c)) if c else None
        except ValueError as e:
            raise InputError(f"{where}: {name}: {e}") from e
    split_c = _col(header, "split")
    split = ((r.get(split_c) or "").strip() or None) if split_c else None
    return LabelRow(key, int(value) if value else None, times["arrival_time"], times["read_time"],
                    split)


