"""The outbox sender: C-STOREs results' DICOM objects to the configured destinations, and hands
HL7 and FHIR destinations' messages to :class:`~triage.service.result_messages.MessageSender`.

A background thread in the daemon. Each round it takes the outbox rows that
are due (:mod:`triage.store.outbox`), builds any object not built yet (once,
durably, under the data directory), counts the attempt, then sends each
destination's objects over one association (pynetdicom SCU, TLS where
configured) and records every reply as it arrives. A failure waits an
exponentially growing backoff; after ``results.max_attempts`` attempts the
row becomes a dead letter, which ``triage status`` and the worklist banner
show and ``triage outbox retry`` queues again.

Nothing is lost: a row leaves "pending" only on a success reply or as a dead
letter. Nothing is stored twice: every attempt sends the SOP Instance UID
fixed when the result was recorded, so an object resent after a crash
replaces nothing and adds nothing at the PACS.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from dicom_io.ids import uid_hash
from dicom_io.scu import (
    NO_REPLY,
    Outgoing,
    SendError,
    Tls,
    outgoing,
    send_files,
    stored,
    tls_client,
)
from triage.config import DestinationConfig, ResultsConfig
from triage.core.errors import TriageError
from triage.core.retry import backoff_s
from triage.service import result_dicom
from triage.service.result_messages import MessageSender
from triage.service.stow_client import TRANSIENT, StowAnswer, stow
from triage.store import outbox
from triage.store.database import OUTAGE_BACKOFF_MAX_S, unavailable, why_unavailable

log = logging.getLogger(__name__)
_UID = re.compile(r"\b\d+(?:\.\d+){3,}\b")


def scrub(text: str) -> str:
    """Return ``text`` with anything shaped like a UID replaced by its hash (for logs and rows)."""
    return _UID.sub(lambda m: f"uid:{uid_hash(m.group(0))}", text)


def tls_settings(dest: DestinationConfig) -> Tls | None:
    """Return the TLS settings of a destination (None without TLS). Raises TriageError when its
    files cannot be loaded, naming the destination."""
    if not dest.tls:
        return None
    try:
        return tls_client(dest.host, dest.tls_ca_file, dest.tls_cert_file, dest.tls_key_file,
                          dest.tls_check_hostname)
    except SendError as e:
        raise TriageError(f"results destination {dest.label}: {e}") from e


class OutboxSender:
    """Sends due outbox rows in a background thread until stopped."""

    def __init__(self, cfg: ResultsConfig, store: Any, data_root: Path,
                 clock: Callable[[], float] = time.time,
                 gate: Callable[[], bool] | None = None) -> None:
        self.cfg, self.store, self.data_root, self.clock = cfg, store, data_root, clock
        # Whether this daemon may send now: with several daemons, only the leader does.
        self.gate = gate
        self.destinations = {d.label: d for d in cfg.destinations}
        # TLS files are loaded now, so a bad one stops start-up rather than a later send.
        self.tls = {d.label: tls_settings(d) for d in cfg.destinations if d.kind == "dicom"}
        self.messages = MessageSender(cfg, store, data_root / "spool", clock, self._wait_s)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._built: dict[int, Path] = {}  # object id -> file, within one round

    def start(self) -> None:
        """Start the sender thread."""
        self._thread = threading.Thread(target=self._run, name="outbox-sender", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Look for due rows now (a result was just recorded)."""
        self._wake.set()

    def stop(self) -> None:
        """Stop after the association in hand."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=self.cfg.timeout_s * 2 + 10)

    def _run(self) -> None:
        failures = 0  # rounds failed in a row
        while not self._stop.is_set():
            if self.gate is not None and not self.gate():
                self._wake.wait(self.cfg.poll_interval_s)
                self._wake.clear()
                continue
            try:
                sent = self.run_once()
                idle = 0.0 if sent else self._idle_s()
                failures = 0
            except Exception as e:  # the sender must outlive a bad round; the rows stay pending
                failures += 1
                idle = backoff_s(failures, self.cfg.poll_interval_s,
                                 max(self.cfg.poll_interval_s, OUTAGE_BACKOFF_MAX_S))
                if unavailable(e):
                    log.warning("outbox round skipped, the database is unavailable (%s); next "
                                "try in %.1f s", why_unavailable(e), idle)
                else:
                    log.exception("outbox round failed; next try in %.1f s", idle)
                # A wake-up (a result committed: the database answers) ends the backoff.
                self._wake.wait(idle)
                self._wake.clear()
                continue
            if idle:
                self._wake.wait(idle)
                self._wake.clear()

    def _idle_s(self) -> float:
        nxt = outbox.next_due_at(self.store)
        if nxt is None:
            return self.cfg.poll_interval_s
        return max(0.05, min(self.cfg.poll_interval_s, nxt - self.clock()))

    def run_once(self) -> int:
        """Send what is due, one association per destination; return how many rows were tried."""
        due = outbox.due(self.store, self.clock(), self.cfg.batch_size * max(1, len(self.destinations)))
        by_dest: dict[str, list[outbox.Due]] = defaultdict(list)
        for item in due:
            by_dest[item.destination].append(item)
        tried = 0
        self._built.clear()
        for label, items in by_dest.items():
            dest = self.destinations.get(label)
            if dest is None:
                outbox.kill(self.store, [i.delivery_id for i in items],
                            f"destination {label} is no longer configured")
                log.warning("%d outbox item(s) for %s, which is no longer configured, moved to "
                            "the dead letter", len(items), label)
                continue
            send = {"dicom": self._send, "dicomweb": self._send_web}.get(dest.kind,
                                                                         self.messages.send)
            tried += send(dest, items[:self.cfg.batch_size])
        return tried

    def _wait_s(self, attempts: int) -> float:
        return backoff_s(attempts, self.cfg.retry_initial_s, self.cfg.retry_max_s)

    def _file(self, item: outbox.Due) -> Path:
        """Return the object's built file, building it first if needed (once per object: every
        destination and every attempt sends the same file)."""
        if item.object_id in self._built:
            return self._built[item.object_id]
        if item.relpath and (self.data_root / item.relpath).exists():
            return self.data_root / item.relpath
        ds = result_dicom.build(self.store, item.object_id, self.data_root / "spool", self.data_root)
        rel = result_dicom.object_path(str(ds.StudyInstanceUID), item.sop_instance_uid)
        path = result_dicom.write(ds, self.data_root, rel)
        outbox.set_built(self.store, item.object_id, rel)
        self._built[item.object_id] = path
        return path

    def _ready(self, items: list[outbox.Due], load: Callable[[Path], Any]) -> list[tuple[outbox.Due, Any]]:
        """Build (once) and ``load`` each item's object; count the attempt of those that are
        ready. A build failure is an attempt too, so a broken object ends in the dead letter."""
        ready: list[tuple[outbox.Due, Any]] = []
        for item in items:
            try:
                ready.append((item, load(self._file(item))))
            except (TriageError, SendError, ValueError, OSError) as e:
                outbox.begin_attempt(self.store, [item.delivery_id], self.clock(), self._wait_s)
                self._failed([item], f"cannot build the {item.kind}: {e}", None)
        if ready:
            outbox.begin_attempt(self.store, [i.delivery_id for i, _ in ready], self.clock(),
                                 self._wait_s)
        return ready

    def _send(self, dest: DestinationConfig, items: list[outbox.Due]) -> int:
        ready = self._ready(items, outgoing)
        if not ready:
            return len(items)
        by_path = {o.path: i for i, o in ready}
        try:
            send_files(dest.host, dest.port, [o for _, o in ready], self.cfg.calling_ae_title,
                       dest.ae_title, self.cfg.timeout_s, self.tls.get(dest.label),
                       on_status=partial(self._replied, dest, by_path))
        except SendError as e:
            self._failed([i for i, _ in ready], str(e), None)
            log.warning("results to %s: %s; %d object(s) wait for a retry", dest.label,
                        scrub(str(e)), len(ready))
        return len(items)

    def _send_web(self, dest: DestinationConfig, items: list[outbox.Due]) -> int:
        """STOW-RS the items' objects to ``dest`` in one request; record each instance's answer."""
        from pydicom import dcmread

        ready = self._ready(items, dcmread)
        if not ready:
            return len(items)
        answer = stow(dest, [ds for _, ds in ready], self.cfg.timeout_s)
        for item, _ in ready:
            self._stowed(dest, item, answer)
        return len(items)

    def _stowed(self, dest: DestinationConfig, item: outbox.Due, answer: StowAnswer) -> None:
        reason = answer.failed.get(item.sop_instance_uid)
        if answer.state == "sent" and reason is None:
            outbox.record_sent(self.store, item.delivery_id, 0, self.clock())
            log.info("sent %s %s to %s (HTTP %s)", item.kind, uid_hash(item.sop_instance_uid),
                     dest.label, answer.http)
            return
        why = (f"{dest.label} answered HTTP {answer.http}" if answer.http else
               f"{dest.label}: {answer.error}")
        if reason is not None:
            why += f", FailureReason 0x{reason:04X}"
        refused = answer.state == "refused" and (reason is None or reason not in TRANSIENT)
        if refused:
            outbox.kill(self.store, [item.delivery_id], scrub(why), reason)
            log.error("%s %s refused by %s (%s); moved to the dead letter (`triage outbox "
                      "retry` queues it again)", item.kind, uid_hash(item.sop_instance_uid),
                      dest.label, f"HTTP {answer.http}")
            return
        self._failed([item], why, reason)

    def _replied(self, dest: DestinationConfig, by_path: dict[Path, outbox.Due], f: Outgoing,
                 status: int) -> None:
        item = by_path[f.path]
        if stored(status):
            outbox.record_sent(self.store, item.delivery_id, status, self.clock())
            log.info("sent %s %s to %s", item.kind, uid_hash(item.sop_instance_uid), dest.label)
            return
        why = "no reply" if status == NO_REPLY else f"C-STORE status 0x{status:04X}"
        self._failed([item], f"{dest.label} answered {why}", None if status == NO_REPLY else status)

    def _failed(self, items: list[outbox.Due], error: str, status: int | None) -> None:
        ids = [i.delivery_id for i in items]
        error = scrub(error)
        dead = outbox.record_failure(self.store, ids, error, status, self.cfg.max_attempts)
        if dead:
            log.error("%d outbox item(s) moved to the dead letter after %d attempts: %s "
                      "(`triage outbox retry` queues them again)", len(dead),
                      self.cfg.max_attempts, error)
