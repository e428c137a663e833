"""A replay archive: every DICOM file under a folder, reassembled into studies by UID.

The rest of ``triage replay``: the labels CSV (:mod:`.labels`), per-study
records and the resumable results file (:mod:`.records`), the two ways of
scoring (:mod:`.scorers`), the report's numbers (:mod:`.report`) and page
(:mod:`.html`), and :func:`triage.replay.run.run`, which ties them together.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from dicom_io.header import Header, read_header
from dicom_io.ids import uid_hash
from triage.core.errors import InputError

log = logging.getLogger(__name__)

DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
# Files with these suffixes are never DICOM (e.g. a labels CSV kept beside the images).
NOT_DICOM_SUFFIXES = frozenset({".csv", ".json", ".jsonl", ".txt", ".md", ".html", ".pdf", ".xml"})


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


def _header(path: Path) -> tuple[Header | None, str | None]:
    """Return (header, None) or (None, why the file is skipped)."""
    from pydicom import dcmread

    try:
        ds = dcmread(path, stop_before_pixels=True, force=True)
    except Exception as e:  # pydicom raises many types on non-DICOM input
        return None, f"not a readable DICOM file ({type(e).__name__})"
    meta = getattr(ds, "file_meta", None)
    if meta is not None and str(meta.get("MediaStorageSOPClassUID", "")) == DICOMDIR_SOP_CLASS:
        return None, "DICOMDIR"
    h = read_header(ds)
    if not h.study_uid or not h.sop_instance_uid:
        return None, "no StudyInstanceUID or SOPInstanceUID"
    return h, None


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
        h, why = _header(path)
        if h is None:
            skipped.append(Skipped(str(path), why or "unknown"))
            continue
        st = studies.get(h.study_uid) or studies.setdefault(h.study_uid, ArchiveStudy(
            h.study_uid, h.accession_number, h.patient_sex, h.study_date, h.study_time))
        st.instances.append(ArchiveInstance(str(path), h.sop_instance_uid, h.transfer_syntax))
    log.info("archive %s: %d studies, %d files skipped", root, len(studies), len(skipped))
    return [studies[k] for k in sorted(studies)], skipped


def describe(study: ArchiveStudy) -> str:
    """Return a log-safe name of a study (its hashed UID)."""
    return uid_hash(study.study_uid)
