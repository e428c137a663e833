"""The FHIR Bundle builder, read back with fhir.resources."""

from __future__ import annotations

from fhir.resources.R4B.bundle import Bundle

from tests.messages.facts_for_tests import facts
from triage.messages.fhir import build_bundle, encode


def _resources(doc: dict) -> dict[str, list]:  # type: ignore[type-arg]
    b = Bundle.model_validate_json(encode(doc))
    out: dict[str, list] = {}  # type: ignore[type-arg]
    for e in b.entry:
        out.setdefault(e.resource.get_resource_type(), []).append(e.resource)
    return out


def test_bundle_has_report_observations_and_device() -> None:
    doc = build_bundle(facts())
    assert doc["type"] == "transaction"
    r = _resources(doc)
    [report], [device] = r["DiagnosticReport"], r["Device"]
    assert report.status == "preliminary" and report.category[0].coding[0].code == "RAD"
    assert [i.value for i in report.identifier if i.type] == ["ACC-77"]
    assert report.basedOn[0].identifier.value == "ACC-77"
    assert report.subject.identifier.value == "P-77"
    assert report.imagingStudy[0].identifier.value == "urn:oid:1.2.826.0.1.3680043.8.498.1"
    assert "0.83" in report.conclusion and "not for diagnostic use" in report.conclusion
    prob = [o for o in r["Observation"] if o.valueQuantity is not None]
    tier = [o for o in r["Observation"] if o.valueCodeableConcept is not None]
    assert float(prob[0].valueQuantity.value) == 0.8312 and tier[0].valueCodeableConcept.text == \
        "urgent"
    assert device.identifier[0].value == "ab" * 32 and device.deviceName[0].name == "cxr-net"
    assert {ref.reference for ref in report.result} == {e["fullUrl"] for e in doc["entry"]
                                                       if e["resource"]["resourceType"] ==
                                                       "Observation"}
    # every entry is a conditional create: a resend creates nothing twice
    assert all(e["request"]["method"] == "POST" and e["request"]["ifNoneExist"]
               for e in doc["entry"])


def test_a_later_version_is_amended_and_an_unscored_one_says_why() -> None:
    [report] = _resources(build_bundle(facts(version=2, message_uid="2.25.2")))["DiagnosticReport"]
    assert report.status == "amended"
    r = _resources(build_bundle(facts(probability=None, tier="unscored", reasons=("lateral",))))
    assert all(o.valueQuantity is None for o in r["Observation"])
    assert "Not scored: lateral" in r["DiagnosticReport"][0].conclusion


def test_the_same_result_builds_the_same_bundle() -> None:
    assert encode(build_bundle(facts())) == encode(build_bundle(facts()))
