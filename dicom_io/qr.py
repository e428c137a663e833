"""Query/Retrieve as an SCU: find studies on a PACS (C-FIND) and have them sent (C-MOVE, C-GET).

Study Root information model only (PS3.4 C.6.2), which every PACS that answers
queries supports. A query is a short association of its own; a retrieve is
another, so a slow retrieve never holds a query open. C-MOVE asks the PACS to
C-STORE to a named AE (our own listener); C-GET has the PACS C-STORE back over
the same association, to a handler the caller gives, so no inbound connection
or routing entry is needed at the PACS.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt

from dicom_io.scu import SendError, Tls

log = logging.getLogger(__name__)

# Study Root Query/Retrieve Information Model - FIND, MOVE, GET (PS3.4 C.6.2).
FIND = "1.2.840.10008.5.1.4.1.2.2.1"
MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
GET = "1.2.840.10008.5.1.4.1.2.2.3"
PENDING = (0xFF00, 0xFF01)
# A C-MOVE/C-GET that ends with "sub-operations complete, one or more failures" (0xB000)
# still delivered some instances; the counts say which were not.
PARTIAL = 0xB000


class QueryError(SendError):
    """A query or retrieve failed: no association, or the PACS answered a failure status."""


@dataclass(frozen=True)
class Peer:
    """A PACS to query: where it is and who we are to it."""

    host: str
    port: int
    called_ae: str
    calling_ae: str
    timeout_s: float = 60.0
    tls: Tls | None = None


@dataclass(frozen=True)
class StudyMatch:
    """One study a C-FIND returned (values as the PACS gave them; None where it did not)."""

    study_uid: str
    modalities: tuple[str, ...] | None
    n_instances: int | None
    study_date: str = ""


@dataclass(frozen=True)
class SeriesMatch:
    """One series a C-FIND at SERIES level returned."""

    series_uid: str
    modality: str
    n_instances: int | None


@dataclass(frozen=True)
class Retrieved:
    """The end of one C-MOVE/C-GET: the final status and the sub-operation counts."""

    status: int
    completed: int
    failed: int
    warning: int

    @property
    def ok(self) -> bool:
        """True when every sub-operation succeeded (or warned)."""
        return self.status == 0x0000 or (self.status == PARTIAL and self.failed == 0)


def _int(ds: Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _associate(peer: Peer, ae: AE, **kw: Any) -> Any:
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = peer.timeout_s
    tls_args = (peer.tls.context, peer.tls.server_hostname) if peer.tls is not None else None
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.called_ae, tls_args=tls_args, **kw)
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "not established"
        raise QueryError(f"association with {peer.called_ae}@{peer.host}:{peer.port} {why}")
    return assoc


def find(peer: Peer, query: Dataset) -> list[Dataset]:
    """Run one Study Root C-FIND; return the matches (the pending responses' identifiers).

    Raises QueryError when the association fails or the PACS ends with a failure status.
    """
    ae = AE(ae_title=peer.calling_ae)
    ae.add_requested_context(FIND)
    assoc = _associate(peer, ae)
    out: list[Dataset] = []
    try:
        for status, ident in assoc.send_c_find(query, FIND):
            code = int(getattr(status, "Status", -1)) if status else -1
            if code in PENDING and ident is not None:
                out.append(ident)
            elif code != 0x0000:
                raise QueryError(f"C-FIND to {peer.called_ae} ended with "
                                 + ("no reply" if code < 0 else f"status 0x{code:04X}"))
    finally:
        if assoc.is_established:
            assoc.release()
    return out


def study_query(date_range: str, modalities: Sequence[str],
                extra: dict[str, str] | None = None) -> Dataset:
    """The STUDY level query: studies in ``date_range`` (DICOM range, e.g. 20261201-20261203)
    with any of ``modalities`` in them, returning their UID, modalities and instance count."""
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = ""
    q.StudyDate = date_range
    q.ModalitiesInStudy = list(modalities) if len(modalities) > 1 else modalities[0]
    q.NumberOfStudyRelatedInstances = ""
    q.AccessionNumber = ""
    for keyword, value in (extra or {}).items():
        setattr(q, keyword, value)
    return q


def studies(peer: Peer, date_range: str, modalities: Sequence[str],
            extra: dict[str, str] | None = None) -> list[StudyMatch]:
    """Find the studies of ``date_range`` with any of ``modalities`` (see study_query).

    A PACS that files one StudyInstanceUID under two patients answers twice for it; the
    answers are merged (modalities joined, counts added), as the retrieve gets both.
    """
    out: dict[str, StudyMatch] = {}
    for ds in find(peer, study_query(date_range, modalities, extra)):
        uid = str(ds.get("StudyInstanceUID", "") or "")
        if not uid:
            continue
        mods = ds.get("ModalitiesInStudy")
        values = tuple(str(m) for m in (mods if isinstance(mods, Iterable) and not
                                        isinstance(mods, str) else [mods] if mods else []))
        match = StudyMatch(uid, values or None, _int(ds, "NumberOfStudyRelatedInstances"),
                           str(ds.get("StudyDate", "") or ""))
        out[uid] = _merge(out[uid], match) if uid in out else match
    return list(out.values())


def _merge(a: StudyMatch, b: StudyMatch) -> StudyMatch:
    mods = None if a.modalities is None or b.modalities is None else tuple(
        sorted(set(a.modalities) | set(b.modalities)))
    n = None if a.n_instances is None or b.n_instances is None else a.n_instances + b.n_instances
    return StudyMatch(a.study_uid, mods, n, a.study_date or b.study_date)


def series(peer: Peer, study_uid: str) -> list[SeriesMatch]:
    """Find the series of one study, with their modality and instance count."""
    q = Dataset()
    q.QueryRetrieveLevel = "SERIES"
    q.StudyInstanceUID = study_uid
    q.SeriesInstanceUID = ""
    q.Modality = ""
    q.NumberOfSeriesRelatedInstances = ""
    return [SeriesMatch(str(ds.SeriesInstanceUID), str(ds.get("Modality", "") or ""),
                        _int(ds, "NumberOfSeriesRelatedInstances"))
            for ds in find(peer, q) if ds.get("SeriesInstanceUID")]


def instances(peer: Peer, study_uid: str, series_uid: str) -> list[str]:
    """Return the SOP Instance UIDs of one series."""
    q = Dataset()
    q.QueryRetrieveLevel = "IMAGE"
    q.StudyInstanceUID = study_uid
    q.SeriesInstanceUID = series_uid
    q.SOPInstanceUID = ""
    return [str(ds.SOPInstanceUID) for ds in find(peer, q) if ds.get("SOPInstanceUID")]


def retrieve_query(study_uid: str, series_uid: str | None = None,
                   sop_uids: Sequence[str] = ()) -> Dataset:
    """The identifier of a retrieve: a whole study, one series, or listed instances of it."""
    q = Dataset()
    q.StudyInstanceUID = study_uid
    q.QueryRetrieveLevel = "STUDY"
    if series_uid is not None:
        q.QueryRetrieveLevel = "SERIES"
        q.SeriesInstanceUID = series_uid
    if sop_uids:
        q.QueryRetrieveLevel = "IMAGE"
        q.SOPInstanceUID = list(sop_uids) if len(sop_uids) > 1 else sop_uids[0]
    return q


def _final(responses: Iterator[tuple[Any, Any]], what: str, peer: Peer) -> Retrieved:
    last: Any = None
    for status, _ident in responses:
        if status:
            last = status
    code = int(getattr(last, "Status", -1)) if last is not None else -1
    if code < 0:
        raise QueryError(f"{what} to {peer.called_ae}: no reply")
    done = Retrieved(code, _int(last, "NumberOfCompletedSuboperations") or 0,
                     _int(last, "NumberOfFailedSuboperations") or 0,
                     _int(last, "NumberOfWarningSuboperations") or 0)
    if code not in (0x0000, PARTIAL, 0xFE00):
        raise QueryError(f"{what} to {peer.called_ae} ended with status 0x{code:04X} "
                         f"({done.completed} sent, {done.failed} failed)")
    return done


def move(peer: Peer, query: Dataset, destination_ae: str) -> Retrieved:
    """C-MOVE ``query`` to ``destination_ae`` (which the PACS must know); return the outcome.

    Raises QueryError when the association fails or the PACS refuses the move.
    """
    ae = AE(ae_title=peer.calling_ae)
    ae.add_requested_context(MOVE)
    assoc = _associate(peer, ae)
    try:
        return _final(assoc.send_c_move(query, destination_ae, MOVE), "C-MOVE", peer)
    finally:
        if assoc.is_established:
            assoc.release()


def get(peer: Peer, query: Dataset, storage: Mapping[str, Sequence[str]],
        on_store: Callable[[Any], int]) -> Retrieved:
    """C-GET ``query``: the PACS C-STOREs each instance back on this association to
    ``on_store`` (a pynetdicom EVT_C_STORE handler returning the status to answer).

    ``storage`` maps the storage SOP classes we accept to their transfer syntaxes; each is
    proposed with the SCP role (PS3.7 D.3.3.4). Raises QueryError as :func:`move` does.
    """
    ae = AE(ae_title=peer.calling_ae)
    ae.add_requested_context(GET)
    roles = []
    # A C-GET association carries the retrieve context and every storage context: at most
    # 128 in all, so the storage classes are few (the ones triage stores).
    for sop_class, syntaxes in storage.items():
        ae.add_requested_context(sop_class, list(syntaxes))
        roles.append(build_role(sop_class, scp_role=True))
    assoc = _associate(peer, ae, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        return _final(assoc.send_c_get(query, GET), "C-GET", peer)
    finally:
        if assoc.is_established:
            assoc.release()
