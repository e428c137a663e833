"""Result → FHIR R4 transaction Bundle: a DiagnosticReport, its Observations and the algorithm's
Device, validated with fhir.resources' R4B models (R4's resources used here are unchanged there).

Every entry is a conditional create keyed on an identifier fixed when the
result was recorded, so a Bundle sent again after a lost answer creates
nothing twice. Nothing here touches the network.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from fhir.resources.R4B.bundle import Bundle
from pydantic import ValidationError

from triage.core.errors import InputError
from triage.messages.facts import NOT_FOR_DIAGNOSIS, ResultFacts

URI = "urn:ietf:rfc:3986"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
LOCAL = "urn:triage:codes"  # triage's own codes (docs/conformance.md)
SHA_SYSTEM = "urn:triage:model-sha256"
SCHEMES = {"LN": "http://loinc.org", "SCT": "http://snomed.info/sct",
           "RADLEX": "http://radlex.org", "RPID": "http://radlex.org"}


def _urn(seed: str, part: str) -> str:
    return f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_OID, f'{seed}/{part}')}"


def _accession(f: ResultFacts) -> dict[str, Any]:
    return {"type": {"coding": [{"system": V2_0203, "code": "ACSN"}]}, "value": f.accession}


def _status(f: ResultFacts) -> str:
    return "amended" if f.corrected else "preliminary"


def _code(f: ResultFacts) -> dict[str, Any]:
    code: dict[str, Any] = {"text": f.study_description or "Chest radiograph"}
    if f.procedure_code is not None:
        value, scheme, meaning = f.procedure_code
        code["coding"] = [{"system": SCHEMES.get(scheme.upper(), f"urn:dicom:scheme:{scheme}"),
                           "code": value, "display": meaning}]
    return code


def _entry(full_url: str, resource: dict[str, Any], if_none_exist: str) -> dict[str, Any]:
    return {"fullUrl": full_url, "resource": resource,
            "request": {"method": "POST", "url": resource["resourceType"],
                        "ifNoneExist": if_none_exist}}


def _device(f: ResultFacts) -> dict[str, Any]:
    return {"resourceType": "Device",
            "identifier": [{"system": SHA_SYSTEM, "value": f.model_sha256}],
            "deviceName": [{"name": f.model_name, "type": "model-name"}],
            "version": [{"value": f.model_sha256[:12]}, {"value": f.software}],
            "note": [{"text": NOT_FOR_DIAGNOSIS}]}


def _observation(f: ResultFacts, part: str, code: str, text: str,
                 value: dict[str, Any], device_url: str) -> dict[str, Any]:
    return {"resourceType": "Observation", "status": _status(f),
            "identifier": [{"system": URI, "value": _urn(f.message_uid, part)}],
            "category": [{"coding": [{"system": OBS_CATEGORY, "code": "imaging"}]}],
            "code": {"coding": [{"system": LOCAL, "code": code, "display": text}], "text": text},
            "subject": {"identifier": {"type": {"coding": [{"system": V2_0203, "code": "MR"}]},
                                       "value": f.patient_id}},
            "effectiveDateTime": f.when.astimezone().isoformat(timespec="seconds"),
            "device": {"reference": device_url}, **value}


def conclusion(f: ResultFacts) -> str:
    """Return the report's conclusion text (tier, probability or the reason, the model)."""
    if f.probability is None:
        why = "; ".join(f.reasons) or "not scored"
        head = f"Not scored: {why}."
    else:
        head = f"Triage tier {f.tier}, P(abnormal) {f.probability:.2f}."
    return f"{head} Model {f.model_name} {f.model_sha256[:12]}. {NOT_FOR_DIAGNOSIS}"


def _observations(f: ResultFacts, device_url: str) -> list[tuple[str, dict[str, Any]]]:
    rows = []
    if f.probability is not None:
        rows.append(("probability", _observation(
            f, "probability", "TRIAGE-P", "Probability abnormal (calibrated)",
            {"valueQuantity": {"value": round(f.probability, 4), "unit": "1",
                               "system": "http://unitsofmeasure.org", "code": "1"}},
            device_url)))
    rows.append(("tier", _observation(
        f, "tier", "TRIAGE-TIER", "Triage tier",
        {"valueCodeableConcept": {"coding": [{"system": LOCAL, "code": f.tier}], "text": f.tier}},
        device_url)))
    return rows


def _report(f: ResultFacts, result_urls: list[str]) -> dict[str, Any]:
    return {"resourceType": "DiagnosticReport", "status": _status(f),
            "identifier": [{"system": URI, "value": _urn(f.message_uid, "report")},
                           _accession(f)],
            "basedOn": [{"type": "ServiceRequest", "identifier": _accession(f)}],
            "category": [{"coding": [{"system": V2_0074, "code": "RAD"}]}],
            "code": _code(f),
            "subject": {"identifier": {"type": {"coding": [{"system": V2_0203, "code": "MR"}]},
                                       "value": f.patient_id}},
            "effectiveDateTime": f.when.astimezone().isoformat(timespec="seconds"),
            "issued": f.when.astimezone().isoformat(timespec="seconds"),
            "imagingStudy": [{"type": "ImagingStudy",
                              "identifier": {"system": URI, "value": f"urn:oid:{f.study_uid}"}}],
            "result": [{"reference": u} for u in result_urls],
            "conclusion": conclusion(f)}


def build_bundle(f: ResultFacts) -> dict[str, Any]:
    """Return the transaction Bundle of one result version as a JSON-ready dict, validated.

    Raises InputError when fhir.resources does not accept it."""
    device_url = _urn(f.model_sha256, "device")
    entries = [_entry(device_url, _device(f), f"identifier={SHA_SYSTEM}|{f.model_sha256}")]
    urls = []
    for part, obs in _observations(f, device_url):
        urls.append(_urn(f.message_uid, part))
        entries.append(_entry(urls[-1], obs, f"identifier={URI}|{urls[-1]}"))
    report_id = _urn(f.message_uid, "report")
    entries.append(_entry(report_id, _report(f, urls), f"identifier={URI}|{report_id}"))
    doc = {"resourceType": "Bundle", "type": "transaction",
           "identifier": {"system": URI, "value": f"urn:oid:{f.message_uid}"}, "entry": entries}
    try:
        Bundle.model_validate(doc)
    except ValidationError as e:
        raise InputError(f"the FHIR Bundle does not validate: {e.error_count()} error(s), "
                         f"first at {'.'.join(str(x) for x in e.errors()[0]['loc'])}") from e
    return doc


def encode(doc: dict[str, Any]) -> str:
    """Return the Bundle as compact JSON text (the bytes that are sent, and stored)."""
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False)
