"""What each pull source last showed of a study (:class:`~triage.store.schema.PullStudy`), and
which SOP instances this node already holds, so a poll retrieves only what is new."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from triage.store.schema import Instance, PullSource, PullStudy, Study


@dataclass(frozen=True)
class Seen:
    """A study as the last poll of one source left it."""

    remote_instances: int | None
    retrieved: int


def seen(store: Any, source: str, study_uids: Iterable[str]) -> dict[str, Seen]:
    """Return what was remembered of each of ``study_uids`` from ``source`` (absent: never seen)."""
    uids = list(study_uids)
    out: dict[str, Seen] = {}
    with store.read() as s:
        for i in range(0, len(uids), 500):
            for row in s.scalars(select(PullStudy).where(
                    PullStudy.source == source, PullStudy.study_uid.in_(uids[i:i + 500]))):
                out[row.study_uid] = Seen(row.remote_instances, row.retrieved)
    return out


def remember(store: Any, source: str, study_uid: str, remote_instances: int | None,
             retrieved_now: int, now: float) -> None:
    """Record that ``source`` showed ``study_uid`` with ``remote_instances`` and that
    ``retrieved_now`` more of its instances were retrieved."""
    with store.write() as s:
        row = s.scalar(select(PullStudy).where(PullStudy.source == source,
                                               PullStudy.study_uid == study_uid))
        if row is None:
            row = PullStudy(source=source, study_uid=study_uid, retrieved=0, first_seen_at=now)
            s.add(row)
        row.remote_instances = remote_instances
        row.retrieved += retrieved_now
        if retrieved_now:
            row.retrieved_at = now


def study_held(store: Any, study_uid: str) -> bool:
    """Whether this node holds any instance of ``study_uid``."""
    with store.read() as s:
        return s.scalar(select(Instance.id).join(Study, Study.id == Instance.study_id)
                        .where(Study.study_uid == study_uid).limit(1)) is not None


def held(store: Any, sop_uids: Iterable[str]) -> set[str]:
    """Return which of ``sop_uids`` this node has already acknowledged."""
    uids = list(sop_uids)
    out: set[str] = set()
    with store.read() as s:
        for i in range(0, len(uids), 500):
            out.update(s.scalars(select(Instance.sop_instance_uid).where(
                Instance.sop_instance_uid.in_(uids[i:i + 500]))))
    return out


@dataclass(frozen=True)
class SourceState:
    """One source's poll record (see :class:`~triage.store.schema.PullSource`)."""

    name: str
    last_poll_at: float | None
    last_ok_at: float | None
    failures: int
    last_error: str | None
    next_try_at: float | None
    retrieved_total: int


def polled(store: Any, name: str, now: float, error: str | None, retrieved: int,
           next_try_at: float | None) -> SourceState:
    """Record one poll of ``name`` (``error`` None: it answered); return the new state."""
    with store.write() as s:
        row = s.get(PullSource, name)
        if row is None:
            row = PullSource(name=name, failures=0, retrieved_total=0)
            s.add(row)
        row.last_poll_at = now
        row.failures = 0 if error is None else row.failures + 1
        row.last_error = error
        row.next_try_at = next_try_at
        row.retrieved_total += retrieved
        if error is None:
            row.last_ok_at = now
        return _state(row)


def _state(row: PullSource) -> SourceState:
    return SourceState(row.name, row.last_poll_at, row.last_ok_at, row.failures, row.last_error,
                       row.next_try_at, row.retrieved_total)


def states(store: Any) -> dict[str, SourceState]:
    """Return every source's poll record, by name."""
    with store.read() as s:
        return {row.name: _state(row) for row in s.scalars(select(PullSource))}
