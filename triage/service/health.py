"""``GET /healthz`` and ``GET /metrics``: is the daemon alive, and what is it doing.

Counts that only this process sees (instances received and refused, scoring
latency) are prometheus-client counters and a histogram, fed by
:class:`CountingRecorder` and the worker's result listener. What the database
knows (studies by state, backlog, outbox, drift alert) is read at each scrape
by a collector, so it survives restarts and never drifts from the worklist.
Each daemon has its own registry (tests run several in one process).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from dicom_io.scp import ReceivedInstance
from dicom_io.store_status import DB_UNAVAILABLE, Refusal
from triage.store import outbox, pulls
from triage.store import schema as db
from triage.store.database import unavailable, why_unavailable
from triage.store.schema import Alert, Result, Study

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Seconds from a study's completion to its recorded result.
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class _StoreCollector(Collector):
    """What the database says, read at each scrape."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def collect(self) -> Any:
        # With the database away, a scrape still answers: the process's own counters,
        # and triage_database_up 0 instead of the figures only the database knows.
        try:
            figures = list(self._from_database())
        except Exception as e:
            if not unavailable(e):
                raise
            figures = []
        yield GaugeMetricFamily("triage_database_up", "1 when the database answered this "
                                "scrape's queries, 0 while it is unavailable",
                                value=1 if figures else 0)
        yield from figures

    def _from_database(self) -> Any:
        counts = self.store.counts()
        studies = GaugeMetricFamily("triage_studies", "Studies by state", labels=["state"])
        for state, n in counts.items():
            studies.add_metric([state], n)
        yield studies
        yield GaugeMetricFamily("triage_backlog", "Complete studies waiting to be scored",
                                value=counts[db.COMPLETE])
        with self.store.read() as s:
            alert = s.scalar(select(func.count()).select_from(Alert).where(
                Alert.kind == "drift", Alert.active.is_(True))) or 0
        yield GaugeMetricFamily("triage_drift_alert", "1 while a drift alert is active",
                                value=1 if alert else 0)
        box = GaugeMetricFamily("triage_outbox", "Result objects and messages to the PACS, RIS or EHR by destination and "
                                "state", labels=["destination", "state"])
        for dest, states in sorted(outbox.totals(self.store).items()):
            for state, n in states.items():
                box.add_metric([dest, state], n)
        yield box
        yield GaugeMetricFamily("triage_outbox_dead_letters", "Outbox rows in the dead letter",
                                value=outbox.dead_letter_count(self.store))
        yield from _pull_figures(self.store)


def _pull_figures(store: Any) -> Any:
    states = pulls.states(store)
    if not states:
        return
    up = GaugeMetricFamily("triage_pull_source_up", "1 when the pull source's last poll "
                           "succeeded, 0 while it fails (and is retried with backoff)",
                           labels=["source"])
    fails = GaugeMetricFamily("triage_pull_failures_in_a_row", "Polls of the source that "
                              "failed in a row", labels=["source"])
    got = CounterMetricFamily("triage_pull_retrieved_instances", "Instances retrieved from the "
                              "source by C-MOVE or C-GET", labels=["source"])
    for name, st in sorted(states.items()):
        up.add_metric([name], 1 if st.failures == 0 else 0)
        fails.add_metric([name], st.failures)
        got.add_metric([name], st.retrieved_total)
    yield from (up, fails, got)


class Metrics:
    """The daemon's registry and the metrics it keeps in memory."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.registry = CollectorRegistry()
        self.received = Counter("triage_instances_received", "C-STOREs answered 0x0000, by "
                                "outcome (stored, duplicate, replaced, moved)", ["outcome"],
                                registry=self.registry)
        self.refused = Counter("triage_instances_refused", "C-STOREs refused, by status",
                               ["status"], registry=self.registry)
        self.latency = Histogram("triage_scoring_latency_seconds", "Seconds from a study's "
                                 "completion to its recorded result", buckets=LATENCY_BUCKETS,
                                 registry=self.registry)
        self.registry.register(_StoreCollector(store))

    def observe_result(self, result_id: int) -> None:
        """Observe the latency of a recorded result (its study's completion to its row)."""
        with self.store.read() as s:
            row = s.execute(select(Result.created_at, Study.completed_at)
                            .join(Study, Study.id == Result.study_id)
                            .where(Result.id == result_id)).first()
        if row is not None and row[1] is not None:
            self.latency.observe(max(0.0, row[0] - row[1]))

    def text(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


class CountingRecorder:
    """The SCP's recorder: the store, counting what it records for /metrics."""

    def __init__(self, store: Any, metrics: Metrics) -> None:
        self.store, self.metrics = store, metrics

    def record_instance(self, inst: ReceivedInstance) -> str:
        """Record through the store and count the outcome."""
        outcome = str(self.store.record_instance(inst))
        self.metrics.received.labels(outcome).inc()
        return outcome

    def record_rejection(self, calling_ae: str, sop_class_uid: str | None,
                         sop_uid: str | None, refusal: Refusal) -> None:
        """Count the refusal by status, then record it through the store (unless the store
        is what refused: with the database away, the log line and the count are the record)."""
        self.metrics.refused.labels(f"0x{refusal.status:04X}").inc()
        if refusal.status == DB_UNAVAILABLE:
            return
        try:
            self.store.record_rejection(calling_ae, sop_class_uid, sop_uid, refusal)
        except Exception as e:
            if not unavailable(e):
                raise
            log.warning("the refusal is not recorded in the database, which is unavailable "
                        "(%s); the log line above is its record", why_unavailable(e))


def health(checks: dict[str, Callable[[], bool]]) -> tuple[bool, dict[str, Any]]:
    """Run each liveness check; return (all alive, JSON-ready detail)."""
    detail: dict[str, Any] = {}
    for name, check in checks.items():
        try:
            detail[name] = bool(check())
        except Exception:  # a check that fails says "not alive", never a 500
            detail[name] = False
    ok = all(detail.values())
    return ok, {"status": "ok" if ok else "unhealthy", "checked_at": time.time(), **detail}
