"""Scheduled work, all in one place: one APScheduler background scheduler.

The daemon registers its interval jobs (completion sweep, worklist render,
drift watch, retention purge) and asks for one-off runs "soon" (a render
after a result lands). Every job runs at most once at a time, and missed runs
coalesce into one; a failing run is logged by APScheduler and the next one
runs as planned.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Mapping
from typing import Any

from apscheduler.jobstores.base import ConflictingIdError
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.schedulers.base import STATE_STOPPED

from triage.store.database import unavailable, why_unavailable

log = logging.getLogger(__name__)

Job = Callable[[], Any]


def _outage_quiet(name: str, fn: Job) -> Job:
    """``fn``, logging one line (not a traceback per run) when the database becomes
    unavailable; the next scheduled run is the retry.
    Any other failure still reaches APScheduler's log."""
    skipped = [0]  # runs skipped in a row

    def run() -> Any:
        try:
            out = fn()
        except Exception as e:
            if not unavailable(e):
                raise
            skipped[0] += 1
            (log.warning if skipped[0] == 1 else log.debug)(
                "job %s skipped, the database is unavailable (%s)", name, why_unavailable(e))
            return None
        if skipped[0]:  # debug: a leader-only job "runs" without the database when not leader
            log.debug("job %s ran after %d skipped run(s)", name, skipped[0])
            skipped[0] = 0
        return out
    return run


class Jobs:
    """The daemon's scheduler: interval jobs plus debounced one-off runs."""

    def __init__(self) -> None:
        self._scheduler = BackgroundScheduler(timezone=dt.UTC,
                                              job_defaults={"coalesce": True, "max_instances": 1,
                                                            "misfire_grace_time": None})

    def start(self, intervals: Mapping[str, tuple[float, Job]]) -> None:
        """Start the scheduler with ``{name: (seconds, function)}`` interval jobs."""
        for name, (seconds, fn) in intervals.items():
            self._scheduler.add_job(_outage_quiet(name, fn), "interval", seconds=seconds,
                                    id=name, name=name)
        self._scheduler.start()
        log.debug("scheduler started: %s", ", ".join(intervals))

    def soon(self, name: str, fn: Job, delay_s: float) -> bool:
        """Run ``fn`` once, ``delay_s`` from now, unless a run under ``name`` is already due.

        Calls that arrive while one is pending join it, so a burst of results
        costs one render. Returns True when a run was scheduled.
        """
        if self._scheduler.state == STATE_STOPPED:
            return False
        when = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=delay_s)
        try:
            self._scheduler.add_job(_outage_quiet(name, fn), "date", run_date=when, id=name,
                                    name=name)
        except ConflictingIdError:
            return False
        return True

    def job_names(self) -> list[str]:
        """Return the ids of the scheduled jobs (interval and pending one-off)."""
        return sorted(j.id for j in self._scheduler.get_jobs())

    @property
    def alive(self) -> bool:
        """Whether the scheduler is running (its thread alive)."""
        thread = getattr(self._scheduler, "_thread", None)
        return bool(self._scheduler.running) and (thread is None or thread.is_alive())

    def stop(self) -> None:
        """Stop scheduling and wait for running jobs to finish."""
        if self._scheduler.state != STATE_STOPPED:
            self._scheduler.shutdown(wait=True)
