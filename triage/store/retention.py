"""Retention: delete what is kept of studies reported long ago. Off by default.

Only a study a radiologist marked reported, in a final state (scored,
unscored or failed), and reported more than the retention period ago is
purged: its spool files (current and replaced), its overlays, the DICOM
objects built for the PACS (sent or not), and its rows.
A study nobody has marked reported is never touched, whatever its age, and
neither is one that is receiving or waiting to be scored.

Order matters for a crash: files go first, rows after, all under the store's
write lock so no instance can join the study meanwhile. A crash between the
two leaves rows whose files are gone, which the next purge finishes; the
other order would leave spool files without rows, which start-up recovery
would take for unrecorded instances and bring back.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select

from triage.store import schema as db
from triage.store.schema import (
    Delivery,
    ImageResult,
    Instance,
    Replacement,
    Result,
    ResultObject,
    Study,
    StudyEvent,
)

log = logging.getLogger(__name__)

FINAL_STATES = (db.SCORED, db.UNSCORED, db.FAILED, db.MOVED)
BATCH = 50


@dataclass(frozen=True)
class Purged:
    """What one purge removed."""

    studies: int = 0
    files: int = 0


def purgeable(session: Any, cutoff: float, limit: int) -> list[int]:
    """Return ids of studies reported before ``cutoff`` and in a final state."""
    # Locked (PostgreSQL; SQLite has one writer): another daemon recording a late
    # instance of one of these studies waits on its row until the purge commits, then
    # finds the row gone and records the instance into a new study (it retries).
    return list(session.scalars(select(Study.id).where(
        Study.reported_at.is_not(None), Study.reported_at < cutoff,
        Study.state.in_(FINAL_STATES)).order_by(Study.reported_at).limit(limit)
        .with_for_update(skip_locked=True)))


def _files(session: Any, ids: list[int], spool: Path, data_root: Path) -> list[Path]:
    inst_ids = list(session.scalars(select(Instance.id).where(Instance.study_id.in_(ids))))
    paths = [spool / p for p in session.scalars(select(Instance.relpath)
                                                .where(Instance.id.in_(inst_ids)))]
    for old, new in session.execute(select(Replacement.old_relpath, Replacement.new_relpath)
                                    .where(Replacement.instance_id.in_(inst_ids))):
        paths += [spool / old, spool / new]
    for heat in session.scalars(
            select(ImageResult.heatmap_path)
            .join(Result, Result.id == ImageResult.result_id).where(Result.study_id.in_(ids))):
        if heat:
            paths.append(data_root / heat)
    for built in session.scalars(
            select(ResultObject.relpath)
            .join(Result, Result.id == ResultObject.result_id).where(Result.study_id.in_(ids))):
        if built:
            paths.append(data_root / built)
    return paths


def _delete_rows(session: Any, ids: list[int]) -> None:
    inst_ids = select(Instance.id).where(Instance.study_id.in_(ids))
    res_ids = select(Result.id).where(Result.study_id.in_(ids))
    obj_ids = select(ResultObject.id).where(ResultObject.result_id.in_(res_ids))
    session.execute(delete(Delivery).where(Delivery.object_id.in_(obj_ids)))
    session.execute(delete(ResultObject).where(ResultObject.result_id.in_(res_ids)))
    session.execute(delete(ImageResult).where(ImageResult.result_id.in_(res_ids)))
    session.execute(delete(Result).where(Result.study_id.in_(ids)))
    session.execute(delete(Replacement).where(Replacement.instance_id.in_(inst_ids)))
    session.execute(delete(Instance).where(Instance.study_id.in_(ids)))
    session.execute(delete(StudyEvent).where(StudyEvent.study_id.in_(ids)))
    session.execute(delete(Study).where(Study.id.in_(ids)))


def _unlink(paths: list[Path], data_root: Path) -> int:
    root = data_root.resolve()
    n = 0
    for p in paths:
        if not p.resolve().is_relative_to(root):  # never follow a path out of the data dir
            log.error("retention: refusing to delete %s outside the data directory", p)
            continue
        try:
            p.unlink()
            n += 1
        except FileNotFoundError:
            pass
    # Emptied folders stay: removing one could race a C-STORE that is about to
    # rename a file into it (the spool creates folders outside the store's lock).
    return n


def purge_reported(store: Any, spool: Path, data_root: Path, older_than_s: float,
                   now: float) -> Purged:
    """Purge studies reported more than ``older_than_s`` seconds before ``now``.

    Returns how many studies and files were removed. Raises OSError when a file
    cannot be deleted (its rows then stay, and the next purge tries again).
    """
    total = Purged()
    while True:
        with store.write() as s:
            ids = purgeable(s, now - older_than_s, BATCH)
            if not ids:
                break
            n_files = _unlink(_files(s, ids, spool, data_root), data_root)
            _delete_rows(s, ids)
        total = Purged(total.studies + len(ids), total.files + n_files)
    if total.studies:
        log.info("retention: purged %d reported stud%s (%d files)", total.studies,
                 "y" if total.studies == 1 else "ies", total.files)
    return total
