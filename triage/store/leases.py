"""Several daemons on one database: scoring claims and the leader's lease.

Both are leases with an expiry in database time (:func:`~triage.store.database.db_now`),
so daemons on several machines judge them by one clock, and a daemon that dies
however it dies (``kill -9``, a power cut, a network partition) loses what it
held when its lease runs out, without anyone having to notice it died.

- A **claim** is a study's ``claimed_by``/``claimed_until``. :func:`claim` takes
  complete studies nobody holds with ``SELECT … FOR UPDATE SKIP LOCKED`` (on
  PostgreSQL), so two daemons looking at once take different studies and never
  wait for each other. The worker renews its claims while it works and writes
  the result only while its claim holds; results are also unique per study
  version, so even a daemon that stalled past its lease cannot record a second one.
- The **leader lease** is one row of ``leases``: whoever holds it runs the jobs
  of which one may run at a time. Its holder renews it every third of its length.

On SQLite a single daemon holds the data directory (its lock), so the same code
runs without contention: every claim is granted and the leader is always the one daemon.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterable
from typing import Any

from sqlalchemy import or_, select, update

from triage.store import schema as db
from triage.store.database import db_now, insert_missing, unavailable, why_unavailable
from triage.store.schema import Lease, Study

log = logging.getLogger(__name__)

LEADER = "leader"


def node_id() -> str:
    """This daemon's name in claims and leases: host, PID and a random suffix (a restarted
    daemon with a recycled PID is still someone else)."""
    return f"{socket.gethostname()[:80]}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def claim(store: Any, node: str, limit: int, lease_s: float) -> list[int]:
    """Claim up to ``limit`` complete studies that nobody holds and that are not waiting out
    a retry, oldest completion first; return their ids."""
    with store.write() as s:
        now = db_now(s)
        ids = list(s.scalars(
            select(Study.id).where(
                Study.state == db.COMPLETE,
                or_(Study.retry_at.is_(None), Study.retry_at <= now),
                or_(Study.claimed_until.is_(None), Study.claimed_until < now))
            .order_by(Study.completed_at, Study.id).limit(limit)
            .with_for_update(skip_locked=True)))
        if ids:
            s.execute(update(Study).where(Study.id.in_(ids))
                      .values(claimed_by=node, claimed_until=now + lease_s))
    return ids


def renew(store: Any, node: str, ids: Iterable[int], lease_s: float) -> list[int]:
    """Extend this node's claims on ``ids``; return the ids whose claim it still held."""
    ids = list(ids)
    if not ids:
        return []
    with store.write() as s:
        now = db_now(s)
        held = list(s.execute(
            update(Study).where(Study.id.in_(ids), Study.claimed_by == node)
            .values(claimed_until=now + lease_s).returning(Study.id)).scalars())
    return held


def release(store: Any, node: str, ids: Iterable[int]) -> None:
    """Drop this node's claims on ``ids`` (a clean stop hands them over at once)."""
    ids = list(ids)
    if ids:
        with store.write() as s:
            s.execute(update(Study).where(Study.id.in_(ids), Study.claimed_by == node)
                      .values(claimed_by=None, claimed_until=None))


def release_all(store: Any) -> int:
    """Drop every claim; return how many there were. Only for a database one daemon owns
    (SQLite, under the data directory's lock): the claims of a crashed predecessor are
    then nobody's, and its studies need not wait for them to run out."""
    with store.write() as s:
        return int(s.execute(update(Study).where(Study.claimed_by.is_not(None))
                             .values(claimed_by=None, claimed_until=None)).rowcount or 0)


class LeaderLease:
    """The leader lease of one daemon: :meth:`tick` takes or renews it; :attr:`held` says
    whether this daemon may run the leader's jobs now."""

    def __init__(self, store: Any, node: str, lease_s: float, name: str = LEADER) -> None:
        self.store, self.node, self.lease_s, self.name = store, node, lease_s, name
        self._valid_until = 0.0  # monotonic: when our own view of the lease runs out
        self._lock = threading.Lock()
        self._failures = 0  # ticks failed in a row on an unavailable database

    @property
    def held(self) -> bool:
        """Whether this daemon holds the lease now (judged conservatively on its own clock)."""
        return time.monotonic() < self._valid_until

    def tick(self) -> bool:
        """Take the lease when it is free or expired, renew it when ours; return whether we
        hold it. Database errors count as not holding it (and are logged)."""
        with self._lock:
            started = time.monotonic()
            try:
                mine = self._take()
            except Exception as e:
                if unavailable(e):  # nobody leads while the database is away; tried next tick
                    self._failures += 1
                    (log.warning if self._failures == 1 else log.debug)(
                        "could not take or renew the leader lease, the database is "
                        "unavailable (%s)", why_unavailable(e))
                else:
                    log.exception("could not take or renew the leader lease")
                mine = False
            else:
                if self._failures:
                    log.info("the leader lease is reachable again after %d failed tick(s)",
                             self._failures)
                self._failures = 0
            was = self._valid_until > started
            # Counted from before the query: our lease cannot outlive the database's view of it.
            self._valid_until = started + self.lease_s if mine else 0.0
        if mine != was:
            log.info("%s the leader (%s)", "this daemon is now" if mine else "no longer",
                     self.node)
        return mine

    def _take(self) -> bool:
        with self.store.write() as s:
            now = db_now(s)
            row = s.scalar(select(Lease).where(Lease.name == self.name).with_for_update())
            if row is None:
                # False: another daemon created it first, so it is that daemon's lease.
                return insert_missing(s, Lease, name=self.name, holder=self.node,
                                      expires_at=now + self.lease_s, acquired_at=now)
            if row.holder != self.node and row.expires_at >= now:
                return False
            if row.holder != self.node:
                row.holder, row.acquired_at = self.node, now
            row.expires_at = now + self.lease_s
            return True

    def release(self) -> None:
        """Give the lease up (a clean stop), so another daemon takes over at once."""
        with self._lock:
            self._valid_until = 0.0
            try:
                with self.store.write() as s:
                    row = s.scalar(select(Lease).where(Lease.name == self.name,
                                                       Lease.holder == self.node)
                                   .with_for_update())
                    if row is not None:
                        row.expires_at = 0.0
            except Exception:
                log.exception("could not release the leader lease; it runs out by itself")


def leader_holder(store: Any, name: str = LEADER) -> tuple[str, float] | None:
    """Return (holder, expires_at) of a lease, or None when nobody ever held it."""
    with store.read() as s:
        row = s.scalar(select(Lease).where(Lease.name == name))
        return None if row is None else (row.holder, row.expires_at)
