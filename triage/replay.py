"""``triage replay``: retrospective validation on a labelled DICOM archive.

The edges live here: walking the archive and reassembling studies by UID
(:func:`scan_archive`), reading the labels CSV (:func:`read_labels`), the
resumable per-study results file (:class:`ResultsFile`) and :func:`run`, which
scores what is left (in-process or through a running daemon, see
:mod:`triage.replay_score`), then writes ``report.json`` and ``report.html``.
The statistics are pure, in :mod:`triage.replay_metrics` and
:mod:`triage.turnaround`.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from dicom_io.ids import uid_hash
from triage.errors import InputError

log = logging.getLogger(__name__)

DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
# Files with these suffixes are never DICOM (e.g. a labels CSV kept beside the images).
NOT_DICOM_SUFFIXES = frozenset({".csv", ".json", ".jsonl", ".txt", ".md", ".html", ".pdf", ".xml"})
RESULTS_NAME = "results.jsonl"


# --- the archive -------------------------------------------------------------

@dataclass(frozen=True)
class ArchiveInstance:
    """One image file of the archive."""

    path: str
    sop_instance_uid: str
    transfer_syntax: str


@dataclass
class ArchiveStudy:
    """One study reassembled from the archive by StudyInstanceUID."""

    study_uid: str
    accession_number: str | None = None
    patient_sex: str | None = None
    study_date: str | None = None
    study_time: str | None = None
    instances: list[ArchiveInstance] = field(default_factory=list)


@dataclass(frozen=True)
class Skipped:
    """A file of the archive that is not part of any study, and why."""

    path: str
    reason: str


def _text(ds: Any, keyword: str) -> str | None:
    try:
        v = ds.get(keyword)
    except Exception:  # a malformed element is treated as absent
        return None
    s = str(v).strip() if v is not None else ""
    return s or None


def _header(path: Path) -> tuple[Any | None, str | None]:
    """Return (dataset without pixels, None) or (None, why the file is skipped)."""
    from pydicom import dcmread

    try:
        ds = dcmread(path, stop_before_pixels=True, force=True)
    except Exception as e:  # pydicom raises many types on non-DICOM input
        return None, f"not a readable DICOM file ({type(e).__name__})"
    meta = getattr(ds, "file_meta", None)
    if meta is not None and str(meta.get("MediaStorageSOPClassUID", "")) == DICOMDIR_SOP_CLASS:
        return None, "DICOMDIR"
    if _text(ds, "StudyInstanceUID") is None or _text(ds, "SOPInstanceUID") is None:
        return None, "no StudyInstanceUID or SOPInstanceUID"
    return ds, None


def _syntax(ds: Any) -> str:
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    return str(ts) if ts else "1.2.840.10008.1.2"


def iter_files(root: Path) -> Iterator[Path]:
    """Yield every regular, non-hidden file under ``root`` in sorted order."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath) / name


def scan_archive(root: str | Path) -> tuple[list[ArchiveStudy], list[Skipped]]:
    """Return the archive's studies (ordered by UID) and the files that were skipped.

    Every file under ``root`` is tried as DICOM, whatever its name; a DICOMDIR
    is not needed and is skipped. Raises InputError when ``root`` is not a directory.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"archive {root} is not a directory")
    studies: dict[str, ArchiveStudy] = {}
    skipped: list[Skipped] = []
    for path in iter_files(root):
        if path.suffix.lower() in NOT_DICOM_SUFFIXES:
            skipped.append(Skipped(str(path), f"not DICOM ({path.suffix.lower()} file)"))
            continue
        ds, why = _header(path)
        if ds is None:
            skipped.append(Skipped(str(path), why or "unknown"))
            continue
        uid = str(_text(ds, "StudyInstanceUID"))
        st = studies.get(uid) or studies.setdefault(uid, ArchiveStudy(
            uid, _text(ds, "AccessionNumber"), _text(ds, "PatientSex"), _text(ds, "StudyDate"),
            _text(ds, "StudyTime")))
        st.instances.append(ArchiveInstance(str(path), str(_text(ds, "SOPInstanceUID")), _syntax(ds)))
    log.info("archive %s: %d studies, %d files skipped", root, len(studies), len(skipped))
    return [studies[k] for k in sorted(studies)], skipped


# --- labels -------------------------------------------------------------------

@dataclass(frozen=True)
class LabelRow:
    """One row of the labels CSV."""

    key: str  # a StudyInstanceUID or an AccessionNumber
    label: int | None  # None: the row gives no label
    arrival: _dt.datetime | None = None
    read: _dt.datetime | None = None


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
    return LabelRow(key, int(value) if value else None, times["arrival_time"], times["read_time"])


# --- per-study results -----------------------------------------------------------

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

    def load(self) -> dict[str, StudyRecord]:
        """Return the records already written, by study UID (later lines win)."""
        out: dict[str, StudyRecord] = {}
        if not self.path.exists():
            return out
        with self.path.open(encoding="utf-8") as fh:
            for n, line in enumerate(fh, start=1):
                try:
                    rec = StudyRecord.from_dict(json.loads(line))
                except (ValueError, KeyError, TypeError):
                    log.warning("%s line %d is incomplete; that study will be scored again",
                                self.path.name, n)
                    continue
                out[rec.study_uid] = rec
        return out

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


def describe(study: ArchiveStudy) -> str:
    """Return a log-safe name of a study (its hashed UID)."""
    return uid_hash(study.study_uid)
