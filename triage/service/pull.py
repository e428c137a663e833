"""Pull mode: poll each configured PACS for new radiographs and retrieve them.

Each poll of a source, in order:

1. C-FIND at STUDY level: studies of the lookback's dates with any of the pulled
   modalities in them, with their NumberOfStudyRelatedInstances.
2. A study whose instance count is the one remembered from the last poll is done:
   nothing deeper is asked. Otherwise (new, grown, or a PACS that gives no count),
   C-FIND at SERIES level keeps the series of the pulled modalities (this is also
   the fallback for a PACS that does not match on ModalitiesInStudy), and IMAGE
   level lists their SOP instances; those this node already holds are dropped.
3. What is left is retrieved: the whole study when none of it is held and all its
   series are wanted, else a whole series when none of it is held, else the listed
   instances; all of a poll's requests go over one association. C-MOVE has the PACS C-STORE to our own listener (it must know
   our AE title and port); C-GET has it C-STORE back on the retrieve's association.
   Either way each instance takes the listener's durable path (spool, record,
   exactly-once scoring, guard): the C-MOVE's to the listener itself, the C-GET's
   through :meth:`~dicom_io.scp.StoreScp.on_store`.
4. The study's count is remembered (``pull_studies``) only when everything wanted
   was retrieved, so a failed retrieve is tried again at the next poll.

A source that does not answer or refuses is retried with a growing backoff; the
state of every source is kept in the database (``pull_sources``), where
``triage status``, ``/healthz`` and ``/metrics`` read it. A failing source never
stops the daemon. The results this node sends back into the study (SR, overlays)
are of other modalities, so they are never pulled back.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dicom_io import qr
from dicom_io.ids import uid_hash
from dicom_io.scp import STORAGE_SOP_CLASSES, TRANSFER_SYNTAXES, StoreScp
from dicom_io.scu import SendError, tls_client
from triage.config import Config, PullSourceConfig
from triage.core.errors import TriageError
from triage.core.retry import backoff_s
from triage.store import pulls
from triage.store.database import unavailable, why_unavailable

log = logging.getLogger(__name__)

PARTIAL_TRIES = 3  # retrieves of a study that keep missing instances before it is left


@dataclass(frozen=True)
class Wanted:
    """What one study needs retrieved: per series, None (all of it) or the SOP UIDs to get."""

    study_uid: str
    study_date: str
    remote_instances: int | None
    series: dict[str, list[str] | None]
    new_instances: int
    whole: bool = False  # every series of the study is wanted and new: one retrieve for all


@dataclass
class PollReport:
    """What one poll found and did."""

    source: str
    studies_found: int = 0
    wanted: list[Wanted] = field(default_factory=list)
    retrieved: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)  # the source failed: back off
    # Retrieves that ended with some instances not sent (refused here, or by the PACS): the
    # source answered, so it is not backed off; the study is tried again at the next poll.
    partial: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when the source answered and every retrieve succeeded."""
        return not self.errors


def date_range(days: int, today: dt.date) -> str:
    """The DICOM date range from ``days`` days before ``today`` to today (YYYYMMDD-YYYYMMDD)."""
    start = today - dt.timedelta(days=days)
    return f"{start:%Y%m%d}-{today:%Y%m%d}"


def peer(cfg: Config, src: PullSourceConfig) -> qr.Peer:
    """The source as a Q/R peer, we calling as ``dicom.ae_title``. Raises TriageError when its
    TLS files cannot be loaded."""
    tls = None
    if src.tls:
        try:
            tls = tls_client(src.host, src.tls_ca_file, src.tls_cert_file, src.tls_key_file,
                             src.tls_check_hostname)
        except SendError as e:
            raise TriageError(f"pull source {src.name}: {e}") from e
    return qr.Peer(src.host, src.port, src.ae_title, cfg.dicom.ae_title, src.timeout_s, tls)


class Puller:
    """Polls the configured sources; one poll of a source at a time."""

    def __init__(self, cfg: Config, store: Any, scp: StoreScp,
                 clock: Callable[[], float] = time.time) -> None:
        self.cfg, self.store, self.scp, self.clock = cfg, store, scp, clock
        self.peers = {s.name: peer(cfg, s) for s in cfg.pull.sources}  # TLS checked at start
        self._locks = {s.name: threading.Lock() for s in cfg.pull.sources}
        self._next_try: dict[str, float] = {}  # a failing source's next poll
        self._failures: dict[str, int] = {}  # polls failed in a row
        self._partial: dict[tuple[str, str], int] = {}  # (source, study): partial retrieves

    def poll_due(self, name: str) -> PollReport | None:
        """Poll ``name`` unless it is backing off after a failure; return the report (None when
        skipped). Never raises: a failure is recorded and logged, and backs the source off."""
        if self.clock() < self._next_try.get(name, 0.0):
            return None
        return self.poll(name)

    def poll(self, name: str, days: int | None = None, dry_run: bool = False) -> PollReport:
        """Query ``name`` over ``days`` (default: its lookback) and retrieve what is new (only
        list it with ``dry_run``); record the outcome. Never raises for the source's failures."""
        src = self.cfg.pull.source(name)
        report = PollReport(name)
        with self._locks[name]:
            try:
                self._poll(src, report, days or src.lookback_days, dry_run)
            except (qr.QueryError, OSError, TriageError) as e:
                report.errors.append(str(e))
            except Exception as e:
                if not unavailable(e):
                    log.exception("pull from %s failed unexpectedly", name)
                    report.errors.append(f"unexpected {type(e).__name__}: {e}")
                else:
                    report.errors.append(f"the database is unavailable ({why_unavailable(e)})")
            if not dry_run:
                self._record(src, report)
        return report

    def _poll(self, src: PullSourceConfig, report: PollReport, days: int, dry_run: bool) -> None:
        today = dt.datetime.fromtimestamp(self.clock()).date()
        with qr.Connection(self.peers[src.name], None if dry_run else src.retrieve,
                           self._storage(), self._on_get_store(src)) as c:
            self._walk(c, src, report, date_range(days, today), dry_run)

    def _walk(self, c: qr.Connection, src: PullSourceConfig, report: PollReport, dates: str,
              dry_run: bool) -> None:
        found = c.studies(dates, src.modalities, dict(src.match))
        report.studies_found = len(found)
        known = pulls.seen(self.store, src.name, [m.study_uid for m in found])
        for match in found:
            if match.modalities is not None and not set(match.modalities) & set(src.modalities):
                continue  # the PACS ignored ModalitiesInStudy; the series query would agree
            before = known.get(match.study_uid)
            if (before is not None and match.n_instances is not None
                    and before.remote_instances == match.n_instances):
                continue
            want = self._wanted(c, src, match)
            if want.new_instances == 0:
                if not dry_run:
                    pulls.remember(self.store, src.name, match.study_uid, match.n_instances, 0,
                                   self.clock())
                continue
            report.wanted.append(want)
            if not dry_run:
                self._retrieve(c, src, want, report)

    def _wanted(self, c: qr.Connection, src: PullSourceConfig, match: qr.StudyMatch) -> Wanted:
        series: dict[str, list[str] | None] = {}
        new = 0
        # Nothing of the study here yet: every series of a pulled modality is new, and the
        # IMAGE level query (one more round trip per series) is skipped.
        fresh = not pulls.study_held(self.store, match.study_uid)
        found = c.series(match.study_uid)
        for s in found:
            if s.modality not in src.modalities:
                continue
            if fresh and s.n_instances is not None:
                series[s.series_uid] = None
                new += s.n_instances
                continue
            uids = c.instances(match.study_uid, s.series_uid)
            have = pulls.held(self.store, uids)
            todo = [u for u in uids if u not in have]
            if todo:
                series[s.series_uid] = None if not have else todo
                new += len(todo)
        whole = fresh and bool(found) and len(series) == len(found)
        return Wanted(match.study_uid, match.study_date, match.n_instances, series, new, whole)

    def _retrieve(self, c: qr.Connection, src: PullSourceConfig, want: Wanted,
                  report: PollReport) -> None:
        got, failed = 0, 0
        queries = ([qr.retrieve_query(want.study_uid)] if want.whole else
                   [qr.retrieve_query(want.study_uid, series_uid, uids or ())
                    for series_uid, uids in want.series.items()])
        for query in queries:
            try:
                done = (c.get(query) if src.retrieve == "c-get"
                        else c.move(query, self.cfg.dicom.ae_title))
            except qr.QueryError as e:
                report.errors.append(f"study {uid_hash(want.study_uid)}: {e}")
                failed += 1
                continue
            got += done.completed + done.warning
            failed += done.failed
            if not done.ok:
                report.partial.append(f"study {uid_hash(want.study_uid)}: {done.failed} of "
                                      f"its instances were not sent (status 0x{done.status:04X})")
        report.retrieved += got
        report.failed += failed
        # Remember the count only when all of it came: otherwise the next poll tries again,
        # up to PARTIAL_TRIES times (an instance refused for good would be fetched forever).
        key = (src.name, want.study_uid)
        tries = self._partial[key] = self._partial.get(key, 0) + 1 if failed else 0
        if failed and tries >= PARTIAL_TRIES:
            log.warning("study %s from %s: %d instance(s) still not received after %d tries; "
                        "left until the study changes at the PACS", uid_hash(want.study_uid),
                        src.name, failed, tries)
        remote = want.remote_instances if failed == 0 or tries >= PARTIAL_TRIES else None
        if not failed or tries >= PARTIAL_TRIES:
            self._partial.pop(key, None)
        pulls.remember(self.store, src.name, want.study_uid, remote, got, self.clock())
        log.info("pulled %d instance(s) of study %s from %s by %s%s", got,
                 uid_hash(want.study_uid), src.name, src.retrieve.upper(),
                 f" ({failed} failed)" if failed else "")

    @staticmethod
    def _storage() -> dict[str, list[Any]]:
        return {sop: list(TRANSFER_SYNTAXES) for sop in STORAGE_SOP_CLASSES}

    def _on_get_store(self, src: PullSourceConfig) -> Callable[[Any], int]:
        def handler(event: Any) -> int:
            return self.scp.on_store(event, calling=src.ae_title)
        return handler

    def _record(self, src: PullSourceConfig, report: PollReport) -> None:
        now = self.clock()
        error = "; ".join(report.errors)[:2000] if report.errors else None
        if error is None:
            self._failures.pop(src.name, None)
            self._next_try.pop(src.name, None)
        else:
            n = self._failures[src.name] = self._failures.get(src.name, 0) + 1
            wait = backoff_s(n, self.cfg.pull.retry_initial_s, self.cfg.pull.retry_max_s)
            self._next_try[src.name] = now + wait
            log.warning("pull from %s failed (%s); next try in %.0f s", src.name, error, wait)
        for what in report.partial:
            log.warning("pull from %s incomplete: %s", src.name, what)
        try:
            pulls.polled(self.store, src.name, now, error, report.retrieved,
                         self._next_try.get(src.name))
        except Exception as e:
            if not unavailable(e):
                raise
            log.warning("the poll of %s is not recorded: the database is unavailable", src.name)
