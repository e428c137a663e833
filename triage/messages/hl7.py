"""Result → HL7 v2.5.1 messages (ORU^R01, and ORM^O01 for the order's priority), and ACK → outcome.

Built with hl7apy element by element and validated against the 2.5.1
message structures before it is returned; nothing here touches the network.
Free text goes through :func:`escape`, so a delimiter in a patient name or a
reason cannot change the message's structure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hl7apy.core import Message
from hl7apy.exceptions import HL7apyException
from hl7apy.parser import parse_message

from triage.core.errors import InputError
from triage.messages.facts import DELIVERED, NOT_FOR_DIAGNOSIS, REFUSED, RETRY, Outcome, ResultFacts

VERSION = "2.5.1"
LOCAL = "99TRIAGE"  # the coding system of triage's own OBX codes
PRIORITY_TEXT = {"S": "Stat", "A": "ASAP", "R": "Routine"}  # HL7 table 0485
SEX = {"M": "M", "F": "F", "O": "O"}
# OBX-3 codes (docs/conformance.md lists them): code, text, value type.
OBX_CODES = {
    "probability": ("TRIAGE-P", "Probability abnormal (calibrated)", "NM"),
    "tier": ("TRIAGE-TIER", "Triage tier", "CWE"),
    "model": ("TRIAGE-MODEL", "Algorithm name", "ST"),
    "model_version": ("TRIAGE-MODELVER", "Algorithm version", "ST"),
    "model_sha256": ("TRIAGE-MODELSHA", "Algorithm SHA-256", "ST"),
    "thresholds": ("TRIAGE-THRSRC", "Thresholds source", "ST"),
    "reason": ("TRIAGE-UNSCORED", "Reason not scored", "ST"),
    "study_uid": ("TRIAGE-STUDYUID", "Study Instance UID", "ST"),
}


@dataclass(frozen=True)
class Endpoints:
    """MSH-3..6: who sends and who receives."""

    sending_application: str = "TRIAGE"
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""


def escape(text: str) -> str:
    """Return ``text`` with HL7's delimiters written as escape sequences (and no line breaks)."""
    out = text.replace("\\", "\\E\\")
    for ch, seq in (("|", "\\F\\"), ("^", "\\S\\"), ("&", "\\T\\"), ("~", "\\R\\")):
        out = out.replace(ch, seq)
    return " ".join(out.splitlines())


def _stamp(f: ResultFacts) -> str:
    return f.when.strftime("%Y%m%d%H%M%S")


def _msh(m: Message, ends: Endpoints, f: ResultFacts, event: str, control_id: str) -> None:
    m.msh.msh_3 = escape(ends.sending_application)
    m.msh.msh_4 = escape(ends.sending_facility)
    m.msh.msh_5 = escape(ends.receiving_application)
    m.msh.msh_6 = escape(ends.receiving_facility)
    m.msh.msh_7 = _stamp(f)
    m.msh.msh_9 = event
    m.msh.msh_10 = control_id
    m.msh.msh_11 = "P"
    m.msh.msh_12 = VERSION
    m.msh.msh_18 = "UNICODE UTF-8"


def _pid(pid: Any, f: ResultFacts) -> None:
    pid.pid_1 = "1"
    pid.pid_3 = f"{escape(f.patient_id)}^^^^MR"
    pid.pid_5 = "^".join(escape(c) for c in f.patient_name.split("^")[:5])
    pid.pid_7 = f.birth_date
    pid.pid_8 = SEX.get(f.sex, "U")


def _service(f: ResultFacts) -> str:
    if f.procedure_code is not None:
        value, scheme, meaning = f.procedure_code
        return f"{escape(value)}^{escape(meaning)}^{escape(scheme)}"
    return f"CXR^{escape(f.study_description or 'Chest radiograph')}^L"


@dataclass
class _Pair:
    """An ORC and its OBR (siblings in ORU^R01, in different groups of ORM^O01)."""

    orc: Any
    obr: Any


def _orc_obr(group: Any, f: ResultFacts, order_control: str) -> None:
    orc, obr = group.orc, group.obr
    acc = escape(f.accession)
    orc.orc_1 = order_control
    orc.orc_2, orc.orc_3 = acc, acc
    orc.orc_7 = f"^^^^^{f.priority}"
    orc.orc_9 = _stamp(f)
    obr.obr_1 = "1"
    obr.obr_2, obr.obr_3 = acc, acc
    obr.obr_4 = _service(f)
    obr.obr_7 = _stamp(f)
    obr.obr_22 = _stamp(f)
    obr.obr_25 = "C" if f.corrected else "P"
    obr.obr_27 = f"^^^^^{f.priority}"


def _observations(f: ResultFacts) -> list[tuple[str, str, str]]:
    """Return (code key, value in ER7, units in ER7) per OBX row."""
    short = f.model_sha256[:12]
    rows = []
    if f.probability is not None:
        rows.append(("probability", f"{f.probability:.4f}", "1^^UCUM"))
    rows.append(("tier", f"{escape(f.tier)}^{escape(f.tier)}^{LOCAL}", ""))
    rows += [("model", escape(f.model_name), ""), ("model_version", short, ""),
             ("model_sha256", f.model_sha256, ""), ("thresholds", escape(f.thresholds_source), ""),
             ("study_uid", f.study_uid, "")]
    if f.probability is None:
        rows += [("reason", escape(r), "") for r in (f.reasons or ("not scored",))]
    return rows


def _add_obx(group: Any, n: int, key: str, value: str, units: str, f: ResultFacts) -> None:
    code, text, vt = OBX_CODES[key]
    obx = group.add_group("ORU_R01_OBSERVATION").obx
    obx.obx_1 = str(n)
    obx.obx_2 = vt
    obx.obx_3 = f"{code}^{text}^{LOCAL}"
    obx.obx_5 = value
    if units:
        obx.obx_6 = units
    obx.obx_11 = "C" if f.corrected else "P"
    obx.obx_14 = _stamp(f)
    obx.obx_18 = f"{escape(f.model_name)}^{escape(f.software)}"


def _validated(m: Message, structure: bool = True) -> str:
    try:
        if structure:
            m.validate()
        er7 = str(m.to_er7())
        parse_message(er7, find_groups=False)  # and it reads back
        return er7
    except HL7apyException as e:
        raise InputError(f"the HL7 message does not validate: {e}") from e


def build_oru(f: ResultFacts, ends: Endpoints) -> str:
    """Return the ORU^R01 of one result version in ER7 (segments separated by CR).

    Raises InputError when a value does not fit the 2.5.1 structure."""
    try:
        m = Message("ORU_R01", version=VERSION)
        _msh(m, ends, f, "ORU^R01^ORU_R01", f.control_id)
        result = m.add_group("ORU_R01_PATIENT_RESULT")
        _pid(result.add_group("ORU_R01_PATIENT").pid, f)
        order = result.add_group("ORU_R01_ORDER_OBSERVATION")
        _orc_obr(order, f, "RE")
        order.add_group("ORU_R01_TIMING_QTY").tq1.tq1_9 = \
            f"{f.priority}^{PRIORITY_TEXT[f.priority]}^HL70485"
        order.add_segment("NTE").nte_3 = escape(NOT_FOR_DIAGNOSIS)
        for n, (key, value, units) in enumerate(_observations(f), start=1):
            _add_obx(order, n, key, value, units, f)
    except HL7apyException as e:
        raise InputError(f"the HL7 ORU^R01 cannot be built: {e}") from e
    return _validated(m)


def build_orm(f: ResultFacts, ends: Endpoints, control_id: str) -> str:
    """Return an ORM^O01 that changes the order's priority (ORC-1 XO) to the result's.

    Raises InputError when a value does not fit the 2.5.1 structure."""
    try:
        m = Message("ORM_O01", version=VERSION)
        _msh(m, ends, f, "ORM^O01^ORM_O01", control_id)
        _pid(m.add_group("ORM_O01_PATIENT").pid, f)
        order = m.add_group("ORM_O01_ORDER")
        orc = order.add_segment("ORC")
        detail = order.add_group("ORM_O01_ORDER_DETAIL")
        obr = detail.add_group("ORM_O01_OBRRQDRQ1RXOODSODT_SUPPGRP").add_segment("OBR")
        _orc_obr(_Pair(orc, obr), f, "XO")
        detail.add_segment("NTE").nte_3 = escape(NOT_FOR_DIAGNOSIS)
    except HL7apyException as e:
        raise InputError(f"the HL7 ORM^O01 cannot be built: {e}") from e
    # hl7apy's validator reads the 2.5.1 choice group around OBR as "all of RQD, RQ1, RXO,
    # ODS, ODT and OBR required", so the ORM is checked by parsing it back instead.
    return _validated(m, structure=False)


def read_ack(raw: str, control_id: str) -> Outcome:
    """Map an ACK to an outcome: AA/CA delivered; AE/CE retry; AR/CR refused (with its text).

    An answer that is not an ACK of ``control_id`` is a retry: the message may not have
    been taken."""
    try:
        ack = parse_message(raw.replace("\n", "\r").strip("\r"), find_groups=False)
        code = str(ack.msa.msa_1.value or "")
        acked = str(ack.msa.msa_2.value or "")
        text = str(ack.msa.msa_3.value or "")
        err = ack.children.get("ERR")
        if not text and err:
            text = str(err[0].err_8.value or err[0].to_er7())
    except (HL7apyException, AttributeError, IndexError) as e:
        why = f"the answer is not an HL7 ACK ({type(e).__name__})"
        return Outcome(RETRY, why, why)
    if acked != control_id:
        return Outcome(RETRY, "wrong ACK", "the ACK names another message")
    if code in ("AA", "CA"):
        return Outcome(DELIVERED, code, code)
    state = REFUSED if code in ("AR", "CR") else RETRY
    return Outcome(state, code or "no MSA-1", f"{code}: {text or 'no text'}"[:300])
