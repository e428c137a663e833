"""The HL7 builders, read back with the ``hl7`` package (a parser triage does not use)."""

from __future__ import annotations

import hl7
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.messages.facts_for_tests import facts
from triage.messages.facts import DELIVERED, REFUSED, RETRY, priority_letter
from triage.messages.hl7 import Endpoints, build_orm, build_oru, read_ack

ENDS = Endpoints("TRIAGE", "RAD", "RIS", "HOSP")


def _obx(m: hl7.Message) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for seg in m.segments("OBX"):
        out.setdefault(str(seg[3][0][0]), []).append(str(seg[5]))
    return out


def test_oru_carries_patient_order_priority_and_observations() -> None:
    m = hl7.parse(build_oru(facts(), ENDS))
    msh = m.segment("MSH")
    assert [str(msh[i]) for i in (3, 4, 5, 6)] == ["TRIAGE", "RAD", "RIS", "HOSP"]
    assert str(msh[9]) == "ORU^R01^ORU_R01" and str(msh[12]) == "2.5.1"
    assert len(str(msh[10])) == 20
    pid = m.segment("PID")
    assert (str(pid[3][0][0]), str(pid[5]), str(pid[7]), str(pid[8])) == (
        "P-77", "DOE^JANE", "20210304", "F")
    obr = m.segment("OBR")
    assert (str(obr[2]), str(obr[3]), str(obr[25])) == ("ACC-77", "ACC-77", "P")
    assert str(obr[27][0][5]) == "S" and str(m.segment("TQ1")[9][0][0]) == "S"
    assert str(m.segment("ORC")[1]) == "RE" and str(m.segment("ORC")[2]) == "ACC-77"
    assert "not for diagnostic use" in str(m.segment("NTE")[3])
    obx = _obx(m)
    assert obx["TRIAGE-P"] == ["0.8312"] and obx["TRIAGE-TIER"] == ["urgent^urgent^99TRIAGE"]
    assert obx["TRIAGE-MODELSHA"] == ["ab" * 32] and obx["TRIAGE-MODEL"] == ["cxr-net"]
    assert obx["TRIAGE-THRSRC"] == ["model card cxr-net"] and "TRIAGE-UNSCORED" not in obx
    assert [str(s[2]) for s in m.segments("OBX")][:2] == ["NM", "CWE"]
    assert str(m.segments("OBX")[0][6]) == "1^^UCUM"


def test_unscored_oru_has_the_reason_and_no_probability() -> None:
    m = hl7.parse(build_oru(facts(probability=None, tier="unscored", priority="R",
                                  state="unscored", reasons=("image 1: lateral view",)), ENDS))
    obx = _obx(m)
    assert "TRIAGE-P" not in obx and obx["TRIAGE-UNSCORED"] == ["image 1: lateral view"]
    assert str(m.segment("OBR")[27][0][5]) == "R"


def test_a_later_version_is_a_correction_with_its_own_control_id() -> None:
    first, later = build_oru(facts(), ENDS), build_oru(facts(version=2, message_uid="2.25.9"), ENDS)
    assert str(hl7.parse(later).segment("OBR")[25]) == "C"
    assert {str(s[11]) for s in hl7.parse(later).segments("OBX")} == {"C"}
    assert str(hl7.parse(first).segment("MSH")[10]) != str(hl7.parse(later).segment("MSH")[10])
    assert build_oru(facts(), ENDS) == first  # built again, the same message


def test_orm_sets_the_order_priority() -> None:
    m = hl7.parse(build_orm(facts(priority="A", tier="abnormal"), ENDS, "X" * 20))
    assert str(m.segment("MSH")[9]) == "ORM^O01^ORM_O01" and str(m.segment("MSH")[10]) == "X" * 20
    assert str(m.segment("ORC")[1]) == "XO" and str(m.segment("ORC")[7][0][5]) == "A"
    assert str(m.segment("OBR")[3]) == "ACC-77"


@settings(deadline=None, max_examples=60)  # building and validating is slow on a busy machine
@given(st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40))
def test_no_value_can_change_the_message_structure(text: str) -> None:
    m = hl7.parse(build_oru(facts(patient_id=text, accession=text, patient_name=text,
                                  thresholds_source=text), ENDS))
    assert [s[0][0] for s in m] == ["MSH", "PID", "ORC", "OBR", "TQ1", "NTE", *["OBX"] * 7]
    assert len(m.segment("PID")) <= 9 and len(m.segment("OBR")) == 28


def test_priority_letters() -> None:
    points = {"abnormal": 0.3, "urgent": 0.7, "never": None}
    assert [priority_letter(t, points) for t in ("urgent", "abnormal", "routine", "unscored",
                                                 "never")] == ["S", "A", "R", "R", "R"]


def _ack(code: str, control: str, text: str = "") -> str:
    return f"MSH|^~\\&|RIS|H|TRIAGE||20260101||ACK^R01^ACK|1|P|2.5.1\rMSA|{code}|{control}|{text}"


def test_acks() -> None:
    assert read_ack(_ack("AA", "C1"), "C1").state == DELIVERED
    ae = read_ack(_ack("AE", "C1", "busy"), "C1")
    assert (ae.state, ae.code, ae.text) == (RETRY, "AE", "AE: busy")
    assert read_ack(_ack("AR", "C1", "no such order"), "C1").state == REFUSED
    assert read_ack(_ack("AA", "OTHER"), "C1").state == RETRY  # not our message
    assert read_ack("garbage", "C1").state == RETRY
