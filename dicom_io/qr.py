"""Query/Retrieve as an SCU: find studies on a PACS (C-FIND) and have them sent (C-MOVE, C-GET).

Study Root information model only (PS3.4 C.6.2), which every PACS that answers
queries supports. A query is a short association of its own; a retrieve is
another, so a slow retrieve never holds a query open. C-MOVE asks the PACS to
C-STORE to a named AE (our own listener); C-GET has the PACS C-STORE back over
the same association, to a handler the caller gives, so no inbound connection
or routing entry is needed at the PACS. A poll's queries and retrieves share one
association (:class:`Connection`).
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


class Connection:
    """One association with a PACS for a whole poll: C-FIND, and C-MOVE or C-GET, on it.

    ``with Connection(peer, "c-get", storage, on_store) as c:`` proposes the Study Root
    FIND context, the MOVE or GET context, and for C-GET each storage SOP class in
    ``storage`` (with its transfer syntaxes) in the SCP role (PS3.7 D.3.3.4), the PACS's
    C-STOREs going to ``on_store`` (a pynetdicom EVT_C_STORE handler returning the status).
    One association instead of one per request: the set-up costs about as much as a query.
    Raises QueryError when the association is not established.
    """

    def __init__(self, peer: Peer, retrieve: str | None = None,
                 storage: Mapping[str, Sequence[str]] | None = None,
                 on_store: Callable[[Any], int] | None = None) -> None:
        self.peer, self.retrieve = peer, retrieve
        self.storage, self.on_store = dict(storage or {}), on_store
        self.assoc: Any = None

    def __enter__(self) -> Connection:
        peer = self.peer
        ae = AE(ae_title=peer.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = peer.timeout_s
        ae.add_requested_context(FIND)
        kw: dict[str, Any] = {}
        if self.retrieve == "c-move":
            ae.add_requested_context(MOVE)
        elif self.retrieve == "c-get":
            ae.add_requested_context(GET)
            for sop_class, syntaxes in self.storage.items():
                ae.add_requested_context(sop_class, list(syntaxes))
            kw = {"ext_neg": [build_role(c, scp_role=True) for c in self.storage],
                  "evt_handlers": [(evt.EVT_C_STORE, self.on_store)]}
        tls_args = (peer.tls.context, peer.tls.server_hostname) if peer.tls is not None else None
        self.assoc = ae.associate(peer.host, peer.port, ae_title=peer.called_ae,
                                  tls_args=tls_args, **kw)
        if not self.assoc.is_established:
            a = self.assoc
            why = "rejected" if a.is_rejected else "aborted" if a.is_aborted else "not established"
            raise QueryError(f"association with {peer.called_ae}@{peer.host}:{peer.port} {why}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.assoc is not None and self.assoc.is_established:
            self.assoc.release()

    def _live(self, what: str) -> Any:
        if self.assoc is None or not self.assoc.is_established:
            raise QueryError(f"{what} to {self.peer.called_ae}: the association was lost")
        return self.assoc

    def find(self, query: Dataset) -> list[Dataset]:
        """Run one Study Root C-FIND; return the matches (the pending responses' identifiers).
        Raises QueryError when the PACS ends with a failure status or the association is lost."""
        out: list[Dataset] = []
        for status, ident in self._live("C-FIND").send_c_find(query, FIND):
            code = int(getattr(status, "Status", -1)) if status else -1
            if code in PENDING and ident is not None:
                out.append(ident)
            elif code != 0x0000:
                raise QueryError(f"C-FIND to {self.peer.called_ae} ended with "
                                 + ("no reply" if code < 0 else f"status 0x{code:04X}"))
        return out

    def move(self, query: Dataset, destination_ae: str) -> Retrieved:
        """C-MOVE ``query`` to ``destination_ae`` (which the PACS must know); return the
        outcome. Raises QueryError when the PACS refuses the move."""
        return _final(self._live("C-MOVE").send_c_move(query, destination_ae, MOVE), "C-MOVE",
                      self.peer)

    def get(self, query: Dataset) -> Retrieved:
        """C-GET ``query``: the instances arrive at ``on_store``. Raises QueryError as move."""
        return _final(self._live("C-GET").send_c_get(query, GET), "C-GET", self.peer)

    def studies(self, date_range: str, modalities: Sequence[str],
                extra: dict[str, str] | None = None) -> list[StudyMatch]:
        """Find the studies of ``date_range`` with any of ``modalities`` (see study_query).

        A PACS that files one StudyInstanceUID under two patients answers twice for it; the
        answers are merged (modalities joined, counts added), as the retrieve gets both.
        """
        out: dict[str, StudyMatch] = {}
        for ds in self.find(study_query(date_range, modalities, extra)):
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

    def series(self, study_uid: str) -> list[SeriesMatch]:
        """Find the series of one study, with their modality and instance count."""
        q = Dataset()
        q.QueryRetrieveLevel = "SERIES"
        q.StudyInstanceUID = study_uid
        q.SeriesInstanceUID = ""
        q.Modality = ""
        q.NumberOfSeriesRelatedInstances = ""
        return [SeriesMatch(str(ds.SeriesInstanceUID), str(ds.get("Modality", "") or ""),
                            _int(ds, "NumberOfSeriesRelatedInstances"))
                for ds in self.find(q) if ds.get("SeriesInstanceUID")]

    def instances(self, study_uid: str, series_uid: str) -> list[str]:
        """Return the SOP Instance UIDs of one series."""
        q = Dataset()
        q.QueryRetrieveLevel = "IMAGE"
        q.StudyInstanceUID = study_uid
        q.SeriesInstanceUID = series_uid
        q.SOPInstanceUID = ""
        return [str(ds.SOPInstanceUID) for ds in self.find(q) if ds.get("SOPInstanceUID")]


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


def _merge(a: StudyMatch, b: StudyMatch) -> StudyMatch:
    mods = None if a.modalities is None or b.modalities is None else tuple(
        sorted(set(a.modalities) | set(b.modalities)))
    n = None if a.n_instances is None or b.n_instances is None else a.n_instances + b.n_instances
    return StudyMatch(a.study_uid, mods, n, a.study_date or b.study_date)


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
