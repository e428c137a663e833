"""From a recorded result to the HL7 and FHIR messages the outbox sends, and sending them.

The facts come from the database (the study's patient and order data, the
result row) and, for what the database does not keep (birth date, procedure
code), the first source image's header in the spool. The message's identity
(the HL7 control ID, the FHIR identifiers) derives from the UID fixed when
the result was recorded, so every attempt sends the same message.

:class:`MessageSender` sends one destination's due rows: over one MLLP
connection with one message in flight, or one HTTP POST per Bundle. An
answer that means "delivered" marks the row sent, a refusal (HL7 AR, HTTP
4xx) moves it to the dead letter with the peer's text, anything else is a
failed attempt that waits its backoff. Logs name the kind, the hashed UID and
the answer's code, never what the peer wrote back.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydicom import dcmread
from sqlalchemy import select

from dicom_io.ids import uid_hash
from triage import __version__
from triage.config import DestinationConfig, ResultsConfig
from triage.core.errors import InputError, TriageError
from triage.messages import fhir, hl7
from triage.messages.facts import DELIVERED, REFUSED, Outcome, ResultFacts, priority_letter
from triage.messages.transport import (
    MllpConnection,
    TransportError,
    client_context,
    post_bundle,
)
from triage.store import outbox
from triage.store import schema as db
from triage.store.schema import ImageResult, Instance, Result, ResultObject, Study

log = logging.getLogger(__name__)
SOFTWARE = f"triage {__version__}"


def _header_facts(spool_root: Path, relpath: str | None) -> tuple[str, tuple[str, str, str] | None]:
    """Return (birth date, procedure code) from a source header; ("", None) when unreadable."""
    if not relpath:
        return "", None
    try:
        ds = dcmread(spool_root / relpath, stop_before_pixels=True)
    except Exception:  # the message still goes, without what only the header knew
        return "", None
    code = None
    seq = ds.get("ProcedureCodeSequence") or ds.get("RequestedProcedureCodeSequence")
    if seq:
        item = seq[0]
        code = (str(item.get("CodeValue", "")), str(item.get("CodingSchemeDesignator", "")),
                str(item.get("CodeMeaning", "")))
        code = code if code[0] else None
    return str(ds.get("PatientBirthDate", "") or ""), code


def load_facts(store: Any, object_id: int, spool_root: Path) -> ResultFacts:
    """Return the facts of one message object. Raises InputError if the object is missing."""
    with store.read() as s:
        obj = s.get(ResultObject, object_id)
        if obj is None:
            raise InputError(f"result object #{object_id} does not exist")
        res = s.get(Result, obj.result_id)
        study = s.get(Study, res.study_id)
        relpath = s.scalar(select(Instance.relpath)
                           .join(ImageResult, ImageResult.instance_id == Instance.id)
                           .where(ImageResult.result_id == res.id).order_by(ImageResult.id)
                           .limit(1))
        birth, code = _header_facts(spool_root, relpath)
        thresholds = json.loads(res.thresholds)
        return ResultFacts(
            message_uid=obj.sop_instance_uid, patient_id=study.patient_id or "",
            patient_name=study.patient_name or "", birth_date=birth,
            sex=(study.patient_sex or "").upper(), accession=study.accession_number or "",
            study_uid=study.study_uid, study_description=study.study_description or "",
            procedure_code=code, version=res.version, state=res.state, tier=res.tier,
            priority=priority_letter(res.tier, thresholds), probability=res.probability,
            reasons=tuple(json.loads(res.reasons or "[]")), model_name=res.model_name,
            model_sha256=res.model_sha256, software=SOFTWARE,
            thresholds_source=res.thresholds_source,
            when=dt.datetime.fromtimestamp(res.created_at))


def render(f: ResultFacts, kind: str, dest: DestinationConfig) -> str:
    """Return the message of ``kind`` ("oru", "orm", "fhir") for ``dest``. Raises InputError."""
    ends = hl7.Endpoints(dest.sending_application, dest.sending_facility,
                         dest.receiving_application, dest.receiving_facility)
    if kind == db.ORU:
        return hl7.build_oru(f, ends)
    if kind == db.ORM:
        return hl7.build_orm(f, ends, f.control_id)
    return fhir.encode(fhir.build_bundle(f))


def tls_context(dest: DestinationConfig) -> ssl.SSLContext | None:
    """Return the TLS context of a message destination (None: plain TCP or the default
    HTTPS context). Raises TriageError naming the destination when a file cannot be loaded."""
    if not (dest.tls or dest.tls_ca_file or dest.tls_cert_file):
        return None
    try:
        return client_context(dest.tls_ca_file, dest.tls_cert_file, dest.tls_key_file,
                              dest.tls_check_hostname)
    except TransportError as e:
        raise TriageError(f"results destination {dest.label}: {e}") from e


class MessageSender:
    """Sends the due HL7 and FHIR rows of one destination at a time (the outbox sender's
    helper for destinations that are not DICOM)."""

    def __init__(self, cfg: ResultsConfig, store: Any, spool_root: Path,
                 clock: Callable[[], float], wait_s: Callable[[int], float]) -> None:
        self.cfg, self.store, self.spool_root = cfg, store, spool_root
        self.clock, self.wait_s = clock, wait_s
        self.tls = {d.label: tls_context(d) for d in cfg.destinations if d.kind != "dicom"}

    def send(self, dest: DestinationConfig, items: list[outbox.Due]) -> int:
        """Send ``items`` to ``dest``, recording each answer; return how many were tried."""
        ready: list[tuple[outbox.Due, ResultFacts, str]] = []
        for item in items:
            try:
                f = load_facts(self.store, item.object_id, self.spool_root)
                ready.append((item, f, render(f, item.kind, dest)))
            except TriageError as e:
                outbox.begin_attempt(self.store, [item.delivery_id], self.clock(), self.wait_s)
                self._failed(dest, item, Outcome("retry", "cannot build", str(e)))
        if ready:
            outbox.begin_attempt(self.store, [i.delivery_id for i, _, _ in ready], self.clock(),
                                 self.wait_s)
            if dest.kind == "hl7":
                self._send_hl7(dest, ready)
            else:
                for item, _, body in ready:
                    self._answered(dest, item, post_bundle(
                        dest.url, body, self.cfg.timeout_s, self.tls.get(dest.label),
                        dest.bearer_token, dest.basic_user, dest.basic_password))
        return len(items)

    def _send_hl7(self, dest: DestinationConfig,
                  ready: list[tuple[outbox.Due, ResultFacts, str]]) -> None:
        left = list(ready)
        try:
            with MllpConnection(dest.host, dest.port, self.cfg.timeout_s,
                                self.tls.get(dest.label)) as conn:
                while left:
                    item, f, message = left[0]
                    answer = conn.exchange(message)
                    left.pop(0)
                    self._answered(dest, item, hl7.read_ack(answer, f.control_id))
        except TransportError as e:
            for item, _, _ in left:
                self._failed(dest, item, Outcome("retry", "no answer", str(e)), quiet=True)
            log.warning("results to %s: %s; %d message(s) wait for a retry", dest.label,
                        "connection failed or broke", len(left))

    def _answered(self, dest: DestinationConfig, item: outbox.Due, out: Outcome) -> None:
        if out.state == DELIVERED:
            outbox.record_sent(self.store, item.delivery_id, out.status, self.clock())
            log.info("sent %s %s to %s (%s)", item.kind, uid_hash(item.sop_instance_uid),
                     dest.label, out.code)
        else:
            self._failed(dest, item, out)

    def _failed(self, dest: DestinationConfig, item: outbox.Due, out: Outcome,
                quiet: bool = False) -> None:
        error = f"{dest.label}: {out.text}"
        if out.state == REFUSED:
            outbox.kill(self.store, [item.delivery_id], error, out.status)
            log.error("%s %s refused by %s (%s); moved to the dead letter (`triage outbox "
                      "retry` queues it again)", item.kind, uid_hash(item.sop_instance_uid),
                      dest.label, out.code)
            return
        dead = outbox.record_failure(self.store, [item.delivery_id], error, out.status,
                                     self.cfg.max_attempts)
        if not quiet:
            log.warning("%s %s to %s: %s; %s", item.kind, uid_hash(item.sop_instance_uid),
                        dest.label, out.code,
                        "moved to the dead letter" if dead else "waits for a retry")
